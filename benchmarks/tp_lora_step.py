"""Step time, peak memory and collectives of LoRA at TP=2 on CPU (issue 3, item 7).

Four configurations of the same megatron-core GPTModel (17M parameters by
default: 4 layers, hidden 512, seq 256, micro-batch 4, fp32) are compared:

* ``full``: full fine-tune, Adam over every parameter;
* ``frozen``: the frozen base alone, the floor: no weight gradients, but the
  embedding output requires grad so that backward runs through every layer;
* ``megalora``: megalora's LoRA, r=16 on linear_qkv, linear_proj, linear_fc1
  and linear_fc2, with ``megalora.sync_lora_grads`` once per step;
* ``peft``: PEFT's ``LoraParallelLinear`` (peft.tuners.lora.tp_layer) on the
  same targets, with the three smallest patches that make it run on
  megatron-core 0.16.1 (see :func:`patch_peft`; they live here, never in
  megalora).

Usage::

    python benchmarks/tp_lora_step.py [--steps N --hidden 512 --layers 4 --seq 256 --mbs 4 --tp 2]

The script spawns its own gloo ranks (``--tp`` of them, one thread each).

Method:

* Step time: one group of ranks builds all four models and runs them in turn,
  one step each, rotating the order every round, so that drift (thermal,
  other processes) hits every configuration alike. A step is zero_grad,
  forward, backward, the grad sync a plain loop needs, and Adam's step; it is
  timed between two barriers. The median over rounds (of the slower rank) is
  reported, as wall time and as the process's CPU time, which other load on
  the machine disturbs less.
* Peak memory: every configuration runs in its own fresh group of processes.
  After the imports and the process-group set-up, each rank resets the
  kernel's RSS high-water mark (``/proc/self/clear_refs``, value 5) and reads
  its RSS as the baseline; it then builds the model and optimizer and runs a
  few steps, and reads ``VmHWM``. The figure is the high-water mark above the
  baseline, the larger of the ranks. It counts what the process really touched
  (weights, grads, Adam state, saved activations, allocator slack), which
  tracemalloc cannot see for torch tensors. Beside it, "saved act" is the
  exact size of the tensors autograd keeps for backward in one forward.
* Collectives: one more step per configuration under
  ``megalora.testing.collective_counter.count_collectives``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402

CONFIGS = ("full", "frozen", "megalora", "peft")
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
RANK, ALPHA = 16, 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed rounds (one step of each configuration per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--mem-steps", type=int, default=3, help="steps per configuration in the memory runs")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=4, help="micro-batch size")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (= number of ranks spawned)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--skip-memory", action="store_true", help="time and count collectives only")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose from {','.join(CONFIGS)}")
    return args


# --------------------------------------------------------------------------
# The model (a copy of what tests/gpt_utils.py does: benchmarks do not import tests)


def gpt_config(args):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    from megalora.megatron_config import cpu_friendly_config_kwargs

    return TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden,
        tensor_model_parallel_size=args.tp,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_func=F.gelu,
        add_bias_linear=True,
        **cpu_friendly_config_kwargs(),
    )


def build_gpt(args):
    """The same weights on every call: megatron's CPU init draws the full tensor from the seed."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    return GPTModel(
        gpt_config(args),
        get_gpt_layer_local_spec(),
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
        share_embeddings_and_output_weights=False,
    )


def make_batch(args):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), generator=gen)
    return dict(
        input_ids=tokens[:, :-1].contiguous(),
        labels=tokens[:, 1:].contiguous(),
        position_ids=torch.arange(args.seq).unsqueeze(0).expand(args.mbs, args.seq),
        attention_mask=torch.triu(torch.ones(1, 1, args.seq, args.seq, dtype=torch.bool), diagonal=1),
    )


# --------------------------------------------------------------------------
# PEFT's LoraParallelLinear, patched just enough to run on megatron-core 0.16.1


def _first(module, inputs, output):
    # Megatron's parallel linears return (output, bias); PEFT's forward expects a tensor.
    return output[0] if isinstance(output, tuple) else output


def patch_peft() -> None:
    """The three smallest patches that make PEFT 0.21.2's Megatron LoRA run.

    1. ``dispatch_megatron`` reads ``kwargs["fan_in_fan_out"]``, which its
       caller no longer passes: supply the config's value.
    2. ``LoraParallelLinear.update_layer`` never sets ``lora_bias[adapter]``,
       which later code reads: set it to ``False`` (PEFT refuses lora_bias on
       these layers anyway).
    3. Its Megatron A (row-parallel) and B (column-parallel) layers return
       ``(output, bias)`` tuples that its forward feeds to the next layer as if
       they were tensors: a forward hook on each returns the output alone.
    """
    from peft.tuners.lora import model as lora_model
    from peft.tuners.lora import tp_layer

    if getattr(tp_layer, "_bench_patched", False):
        return
    dispatch = tp_layer.dispatch_megatron

    def dispatch_megatron(target, adapter_name, config, **kwargs):
        kwargs.setdefault("fan_in_fan_out", config.fan_in_fan_out)
        return dispatch(target, adapter_name, config, **kwargs)

    lora_model.dispatch_megatron = tp_layer.dispatch_megatron = dispatch_megatron
    update_layer = tp_layer.LoraParallelLinear.update_layer

    def patched_update_layer(self, adapter_name, *args, **kwargs):
        self.lora_bias[adapter_name] = False
        update_layer(self, adapter_name, *args, **kwargs)
        for factor in (self.lora_A[adapter_name], self.lora_B[adapter_name]):
            if isinstance(factor, (self.backend.RowParallelLinear, self.backend.ColumnParallelLinear)):
                factor.register_forward_hook(_first)

    tp_layer.LoraParallelLinear.update_layer = patched_update_layer
    tp_layer._bench_patched = True


# --------------------------------------------------------------------------
# The four configurations


class Setup:
    """A model, its optimizer (None when nothing trains) and the per-step grad sync."""

    def __init__(self, name, model, sync=None):
        self.name = name
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=1e-4) if self.params else None
        self.sync = sync


def _embedding_output_requires_grad(module, inputs, output):
    # With every weight frozen nothing would need a backward; the floor is the
    # input-gradient pass through every layer, so make the block input need one.
    return output.detach().requires_grad_(True)


def make_setup(name: str, args) -> Setup:
    import megalora

    model = build_gpt(args)
    if name == "full":
        return Setup(name, model)
    if name == "frozen":
        model.requires_grad_(False)
        model.embedding.register_forward_hook(_embedding_output_requires_grad)
        return Setup(name, model)
    if name == "megalora":
        config = megalora.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, megatron_config=model.config)
        peft_model = megalora.get_peft_model(model, config)
        return Setup(name, peft_model, sync=lambda: megalora.sync_lora_grads(peft_model))
    if name == "peft":
        import copy

        import peft

        patch_peft()
        config = peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
            megatron_config=copy.copy(model.config), megatron_core="megatron.core",
        )
        return Setup(name, peft.get_peft_model(model, config))
    raise ValueError(f"unknown configuration {name!r}; choose from {CONFIGS}")


def loss_of(setup: Setup, batch) -> torch.Tensor:
    return setup.model(**batch).float().mean()


def train_step(setup: Setup, batch) -> float:
    if setup.opt is not None:
        setup.opt.zero_grad(set_to_none=True)
    loss = loss_of(setup, batch)
    loss.backward()
    if setup.sync is not None:
        setup.sync()
    if setup.opt is not None:
        setup.opt.step()
    return loss.item()


# --------------------------------------------------------------------------
# Rank bodies


def _init(args) -> None:
    import megalora

    torch.set_num_threads(1)
    megalora.init_parallel(tensor_model_parallel_size=args.tp, seed=1234)


def time_worker(rank: int, args, make, names: list, out_path: str) -> None:
    """Build every configuration with ``make(name, args)``, time interleaved steps, count collectives."""
    _init(args)
    batch = make_batch(args)
    setups = [make(name, args) for name in names]
    steps = {s.name: (lambda s=s: train_step(s, batch)) for s in setups}
    times, cpu_times, losses = measure.time_interleaved(steps, args.steps, args.warmup, barrier=dist.barrier)
    collectives = {s.name: measure.step_collectives(steps[s.name]) for s in setups}
    saved = {s.name: measure.saved_activation_mib(s.model, lambda s=s: loss_of(s, batch), s.opt) for s in setups}
    measure.write_gathered(dict(saved_mib=saved, times=times, cpu_times=cpu_times, collectives=collectives,
                                losses=losses, params={s.name: measure.param_counts(s.model) for s in setups}),
                           out_path)


def memory_worker(rank: int, args, make, name: str, out_path: str) -> None:
    """One configuration alone: RSS high-water mark above the post-import baseline."""
    import megalora  # noqa: F401  (every run imports the same modules before the baseline)
    import peft  # noqa: F401

    _init(args)
    batch = make_batch(args)
    dist.barrier()
    baseline = measure.reset_peak_rss()
    setup = make(name, args)
    for _ in range(args.mem_steps):
        train_step(setup, batch)
    measure.write_gathered(dict(baseline_kib=baseline, peak_kib=measure.peak_rss_kib()), out_path)


# --------------------------------------------------------------------------
# Driver


def spawn(fn, args, *extra) -> list:
    """Run ``fn(rank, args, *extra, out_path)`` on ``args.tp`` fresh ranks, one thread each; every rank's result."""
    return measure.spawn_ranks(fn, args.tp, (args, *extra), env=measure.ONE_THREAD_ENV)


def run_all(args, make, names: list, progress: bool) -> tuple:
    """Time ``names`` together, then (unless ``--skip-memory``) each alone for its peak memory.

    Returns:
        ``(timing, memory, load)``: every rank's timing result, peak MiB per
        name, and the 1-minute load average before and after the timing.
    """
    load0 = os.getloadavg()[0]
    if progress:
        print(f"timing {', '.join(names)}, interleaved, on {args.tp} ranks ...", flush=True)
    timing = spawn(time_worker, args, make, names)
    load1 = os.getloadavg()[0]
    memory = {}
    if not args.skip_memory:
        for name in names:
            if progress:
                print(f"peak memory of {name}, in its own processes ...", flush=True)
            ranks = spawn(memory_worker, args, make, name)
            memory[name] = max(r["peak_kib"] - r["baseline_kib"] for r in ranks) / 1024
    return timing, memory, (load0, load1)


GOALS = {("megalora", "frozen"): "time <= 1.07", ("megalora", "full"): "time <= 0.80, mem <= 0.85",
         ("megalora", "peft"): "time <= 0.86"}


def report(args, timing: list, memory: dict, load: tuple) -> dict:
    """Print the tables; return the figures as a dict."""
    rank0 = timing[0]
    names = [n for n in CONFIGS if n in rank0["times"]]
    wall = {n: measure.median_of_slowest(timing, "times", n) for n in names}
    cpu = {n: measure.median_of_slowest(timing, "cpu_times", n) for n in names}
    saved = {n: max(r["saved_mib"][n] for r in timing) for n in names}
    out = dict(median_step_s=wall, median_cpu_s=cpu, peak_memory_mib=memory, saved_activation_mib=saved, ratios={},
               collectives={n: rank0["collectives"][n] for n in names}, added_vs_frozen={})
    print(f"\nGPT: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, "
          f"micro-batch {args.mbs}, vocab {args.vocab}, fp32; TP={args.tp} on CPU (gloo, 1 thread per rank); "
          f"{args.steps} timed rounds; LoRA r={RANK}, alpha={ALPHA} on {', '.join(TARGETS)}")
    print(f"load average (1 min) before/after: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores")
    print(f"\n{'config':<10}{'params/rank':>13}{'trainable':>11}{'step (wall)':>13}{'step (CPU)':>12}"
          f"{'peak mem':>11}{'saved act':>11}{'collectives':>13}{'MiB moved':>11}")
    for n in names:
        total, trainable = rank0["params"][n]
        col = rank0["collectives"][n]
        mem_s = f"{memory[n]:.1f} MiB" if n in memory else "n/a"
        print(f"{n:<10}{total:>13,}{trainable:>11,}{wall[n] * 1e3:>10.1f} ms{cpu[n] * 1e3:>9.1f} ms"
              f"{mem_s:>11}{saved[n]:>7.1f} MiB{sum(col['calls'].values()):>13}"
              f"{sum(col['bytes'].values()) / 2**20:>11.2f}")
    print("step: median over rounds of the slower rank; CPU: this process's CPU time in the step "
          "(less sensitive to other load).\npeak mem: RSS high-water mark above the post-import baseline, "
          "own processes per configuration, larger rank.\nsaved act: tensors autograd keeps for backward "
          "(parameters left out). Collectives and bytes: per step, per rank.")

    pairs = [("frozen", "full"), ("megalora", "frozen"), ("megalora", "full"), ("megalora", "peft"),
             ("peft", "full"), ("peft", "frozen")]
    print(f"\n{'ratio':<21}{'wall':>8}{'CPU':>8}{'peak mem':>10}{'saved act':>11}   goal (issue 3)")
    for a, b in pairs:
        if a not in wall or b not in wall:
            continue
        mem = memory[a] / memory[b] if a in memory and b in memory else None
        act = saved[a] / saved[b] if saved[b] else None
        out["ratios"][f"{a}/{b}"] = dict(wall=wall[a] / wall[b], cpu=cpu[a] / cpu[b], memory=mem, saved=act)
        mem_s = f"{mem:.3f}" if mem is not None else "n/a"
        act_s = f"{act:.3f}" if act is not None else "n/a"
        print(f"{a + ' / ' + b:<21}{wall[a] / wall[b]:>8.3f}{cpu[a] / cpu[b]:>8.3f}{mem_s:>10}{act_s:>11}"
              f"   {GOALS.get((a, b), '')}")

    print("\ncollectives per step (forward, backward, grad sync, optimizer), by name and first tensor's shape:")
    for n in names:
        print(f"  {n}: " + ", ".join(f"{v}x {k}" for k, v in sorted(rank0["collectives"][n]["shapes"].items())))
    if "frozen" in names:
        print("against the frozen base (+ more, - fewer):")
        for n in names:
            if n != "frozen":
                diff = measure.diff_counts(rank0["collectives"][n]["shapes"], rank0["collectives"]["frozen"]["shapes"])
                out["added_vs_frozen"][n] = diff
                print(f"  {n}: " + (", ".join(f"{v:+d} {k}" for k, v in diff.items()) or "none"))
    print("\nloss, first and last round: "
          + ", ".join(f"{n} {rank0['losses'][n][0]:.4f} -> {rank0['losses'][n][-1]:.4f}" for n in names))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    timing, memory, load = run_all(args, make_setup, args.configs, progress=True)
    out = report(args, timing, memory, load)
    print(f"\n(wall time of the whole run: {time.time() - t0:.0f} s)")
    measure.write_json(args.json, args, out)


if __name__ == "__main__":
    sys.exit(main())
