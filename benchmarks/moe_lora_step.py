"""Step time and all-to-alls of LoRA on routed experts at EP=2 on CPU (issue 13, item 6).

Two configurations of the same megatron-core mixture-of-experts GPT (4 routed
experts, top-2, plus a shared expert, SequentialMLP, the alltoall dispatcher
by default; 2 layers, hidden 512, expert ffn 1024, seq 128, micro-batch 4,
fp32) are compared:

* ``frozen``: the frozen MoE base alone, the floor: no weight gradients, but
  the embedding output requires grad so that backward runs through every
  layer, experts and dispatcher included (the same in ``lora``, and both
  models have the same weights, so they route the same tokens);
* ``lora``: megalora's LoRA, r=16, alpha=32, on every routed expert's
  ``linear_fc1`` and ``linear_fc2`` (a regex on global names), with
  ``megalora.sync_lora_grads`` once per step and Adam.

Goal (issue 13): ``lora / frozen`` <= 1.10 in step time, and no all-to-all
beyond the frozen base's (the LoRA path runs inside each expert, on the
tokens the dispatcher already brought).

Usage::

    python benchmarks/moe_lora_step.py [--steps 20 --hidden 512 --ffn 1024 --layers 2 --seq 128 --mbs 4 --ep 2]

The script spawns its own ``--ep`` gloo ranks (one thread each). Method: one
group of ranks builds both models and runs them in turn, one step each,
rotating the order every round; a step (zero_grad, forward, backward, grad
sync, Adam) is timed between two barriers; the median over rounds of the
slower rank is printed, as wall time and as CPU time. Collectives: one more
step of each (after training: LoRA's experts have moved, so tokens may route
differently and message sizes differ; the number of calls does not) under ``megalora.testing.collective_counter.count_collectives``, by name and shape.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402

CONFIGS = ("frozen", "lora")
RANK, ALPHA = 16, 32
EXPERT_TARGETS = r".*\.mlp\.experts\.local_experts\.\d+\.linear_fc[12]"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed rounds (one step of each configuration per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024, help="ffn size of each routed and the shared expert")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--ep", type=int, default=2, help="expert-parallel size (= number of ranks spawned)")
    p.add_argument("--dispatcher", default="alltoall", choices=("alltoall", "allgather"))
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def build(args):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megalora.megatron_config import cpu_friendly_config_kwargs

    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, ffn_hidden_size=args.ffn,
        expert_model_parallel_size=args.ep, hidden_dropout=0.0, attention_dropout=0.0,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.ffn,
        moe_shared_expert_intermediate_size=args.ffn, moe_token_dispatcher_type=args.dispatcher,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_grouped_gemm=False,
        **cpu_friendly_config_kwargs())
    spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False)
    return GPTModel(config, spec, vocab_size=args.vocab, max_sequence_length=args.seq,
                    share_embeddings_and_output_weights=False)


def _embedding_output_requires_grad(module, inputs, output):
    # Every weight frozen: make the block input need a gradient, so backward runs.
    return output.detach().requires_grad_(True)


class Setup:
    def __init__(self, name, model, sync=None):
        self.name, self.model, self.sync = name, model, sync
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=1e-4) if self.params else None


def make_setup(name: str, args) -> Setup:
    import megalora
    from megatron.core import tensor_parallel

    # The same seeds, so both models have the same weights and route the same tokens.
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    model = build(args)
    model.requires_grad_(False)
    # Both run backward through every layer (router and dispatcher included), so the
    # step pair differs by LoRA's own work alone.
    model.embedding.register_forward_hook(_embedding_output_requires_grad)
    if name == "frozen":
        return Setup(name, model)
    config = megalora.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=EXPERT_TARGETS)
    peft = megalora.get_peft_model(model, config)
    return Setup(name, peft.get_base_model(), sync=megalora.sync_lora_grads)


def make_batch(args):
    gen = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), generator=gen)
    pos = torch.arange(args.seq).unsqueeze(0).expand(args.mbs, args.seq)
    mask = torch.triu(torch.ones(1, 1, args.seq, args.seq, dtype=torch.bool), diagonal=1)
    return tokens[:, :-1].contiguous(), pos, mask, tokens[:, 1:].contiguous()


def train_step(setup: Setup, batch) -> float:
    tokens, pos, mask, labels = batch
    if setup.opt is not None:
        setup.opt.zero_grad(set_to_none=True)
    loss = setup.model(tokens, pos, mask, labels=labels).float().mean()
    loss.backward()
    if setup.sync is not None:
        setup.sync(setup.model)
    if setup.opt is not None:
        setup.opt.step()
    return loss.item()


def worker(rank: int, args, out_path: str) -> None:
    import megalora

    torch.set_num_threads(1)
    megalora.init_parallel(expert_model_parallel_size=args.ep)
    setups = [make_setup(n, args) for n in CONFIGS]
    batch = make_batch(args)
    steps = {s.name: (lambda s=s: train_step(s, batch)) for s in setups}
    times, cpu, losses = measure.time_interleaved(steps, args.steps, args.warmup, barrier=dist.barrier)
    collectives = {s.name: measure.step_collectives(steps[s.name]) for s in setups}
    params = {s.name: measure.param_counts(s.model) for s in setups}
    measure.write_gathered(dict(times=times, cpu=cpu, collectives=collectives, params=params, losses=losses),
                           out_path)
    megalora.parallel_start.destroy_parallel()
    dist.destroy_process_group()


def report(args, ranks: list, load: tuple) -> dict:
    wall = {n: measure.median_of_slowest(ranks, "times", n) for n in CONFIGS}
    cpu = {n: measure.median_of_slowest(ranks, "cpu", n) for n in CONFIGS}
    rank0 = ranks[0]
    a2a = {n: rank0["collectives"][n]["calls"].get("all_to_all_single", 0) for n in CONFIGS}
    calls = {n: rank0["collectives"][n]["calls"] for n in CONFIGS}
    extra = measure.diff_counts(calls["lora"], calls["frozen"])
    print(f"\nMoE GPT: {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-{args.topk} + shared "
          f"(ffn {args.ffn}), seq {args.seq}, micro-batch {args.mbs}, fp32; EP={args.ep} on CPU (gloo, 1 thread "
          f"per rank), {args.dispatcher} dispatcher; {args.steps} timed rounds; LoRA r={RANK} on routed experts")
    print(f"load average (1 min) before/after: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores\n")
    print(f"{'config':<8}{'params/rank':>13}{'trainable':>11}{'step (wall)':>13}{'step (CPU)':>12}{'all-to-alls':>13}")
    for n in CONFIGS:
        total, trainable = rank0["params"][n]
        print(f"{n:<8}{total:>13,}{trainable:>11,}{wall[n] * 1e3:>10.1f} ms{cpu[n] * 1e3:>9.1f} ms{a2a[n]:>13}")
    ratio_wall, ratio_cpu = wall["lora"] / wall["frozen"], cpu["lora"] / cpu["frozen"]
    print(f"\nlora / frozen: wall {ratio_wall:.3f}, CPU {ratio_cpu:.3f}   (goal: <= 1.10)")
    print(f"all-to-alls per step: frozen {a2a['frozen']}, lora {a2a['lora']} (goal: no extra)")
    print("collectives of lora beyond frozen, by name: "
          + (", ".join(f"{k}: {v:+d}" for k, v in sorted(extra.items())) or "none"))
    return dict(median_step_s=wall, median_cpu_s=cpu, ratio_wall=ratio_wall, ratio_cpu=ratio_cpu,
                all_to_alls=a2a, extra_collectives=extra)


def main(argv=None) -> None:
    args = parse_args(argv)
    t0, load0 = time.time(), os.getloadavg()[0]
    ranks = measure.spawn_ranks(worker, args.ep, (args,), env=measure.ONE_THREAD_ENV)
    out = report(args, ranks, (load0, os.getloadavg()[0]))
    print(f"(wall time of the whole run: {time.time() - t0:.0f} s)")
    measure.write_json(args.json, args, out)


if __name__ == "__main__":
    sys.exit(main())
