"""Overhead of trainable tokens over plain LoRA: step time, peak memory, collectives (TP=2, CPU).

Two configurations of one tied megatron-core GPTModel (Megatron's default:
the output layer uses the embedding weight, so the token rows act on both
ends; 4 layers, hidden 512, vocab 16384, seq 256, micro-batch 4, fp32):

* ``lora``: LoRA r=16 on linear_qkv, linear_proj, linear_fc1, linear_fc2;
* ``tokens``: the same LoRA plus ``trainable_token_indices`` (``--tokens``
  ids spread over the vocabulary, so both TP ranks own some).

Usage::

    python benchmarks/trainable_tokens_step.py [--steps 10 --tokens 32 --vocab 16384 --tp 2]

The method is ``tp_lora_step.py``'s, whose helpers it uses: interleaved
rounds (median of the slower rank, wall and CPU time), peak RSS above the
post-import baseline with each configuration in its own processes, the bytes
autograd saves for backward, and the collectives of one step counted by
``megalora.testing.collective_counter``. The target (issue 14): at most 2%
over plain LoRA in time and memory, and no collective added.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402
import tp_lora_step as base  # noqa: E402

CONFIGS = ("lora", "tokens")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each configuration per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=32, help="number of trainable token ids")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def token_ids(args) -> list[int]:
    step = args.vocab // args.tokens
    return [i * step + 1 for i in range(args.tokens)]


def make_setup(name: str, args) -> base.Setup:
    import megalora
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    model = GPTModel(base.gpt_config(args), get_gpt_layer_local_spec(), vocab_size=args.vocab,
                     max_sequence_length=args.seq, share_embeddings_and_output_weights=True)
    extra = dict(trainable_token_indices=token_ids(args)) if name == "tokens" else {}
    config = megalora.LoraConfig(r=base.RANK, lora_alpha=base.ALPHA, target_modules=base.TARGETS, **extra)
    peft_model = megalora.get_peft_model(model, config)
    return base.Setup(name, peft_model, sync=lambda: megalora.sync_lora_grads(peft_model))


def main(argv=None) -> None:
    args = parse_args(argv)
    timing, memory, (load0, load1) = base.run_all(args, make_setup, list(CONFIGS), progress=False)
    rank0 = timing[0]
    wall = {n: measure.median_of_slowest(timing, "times", n) for n in CONFIGS}
    cpu = {n: measure.median_of_slowest(timing, "cpu_times", n) for n in CONFIGS}
    saved = {n: max(r["saved_mib"][n] for r in timing) for n in CONFIGS}
    print(f"\ntied GPT: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, seq {args.seq}, "
          f"micro-batch {args.mbs}, fp32, TP={args.tp} (gloo, 1 thread per rank); LoRA r={base.RANK}; "
          f"{args.tokens} trainable tokens; {args.steps} timed rounds")
    print(f"load average (1 min) before/after timing: {load0:.2f} / {load1:.2f} on {os.cpu_count()} cores")
    print(f"\n{'config':<8}{'trainable':>11}{'step (wall)':>13}{'step (CPU)':>12}{'peak mem':>12}{'saved act':>12}"
          f"{'collectives':>13}{'MiB moved':>11}")
    for n in CONFIGS:
        col = rank0["collectives"][n]
        mem = f"{memory[n]:.1f} MiB" if n in memory else "n/a"
        print(f"{n:<8}{rank0['params'][n][1]:>11,}{wall[n] * 1e3:>10.1f} ms{cpu[n] * 1e3:>9.1f} ms{mem:>12}"
              f"{saved[n]:>8.1f} MiB{sum(col['calls'].values()):>13}{sum(col['bytes'].values()) / 2**20:>11.3f}")
    ratios = dict(wall=wall["tokens"] / wall["lora"], cpu=cpu["tokens"] / cpu["lora"],
                  saved=saved["tokens"] / saved["lora"],
                  memory=memory["tokens"] / memory["lora"] if memory else None)
    print("\ntokens / lora: " + ", ".join(f"{k} {v:.4f}" for k, v in ratios.items() if v is not None)
          + "   (target <= 1.02)")
    added = measure.diff_counts(rank0["collectives"]["tokens"]["shapes"], rank0["collectives"]["lora"]["shapes"])
    print("collectives added by trainable tokens (+ more, - fewer): "
          + (", ".join(f"{v:+d} {k}" for k, v in added.items()) or "none"))
    measure.write_json(args.json, args, dict(wall=wall, cpu=cpu, memory=memory, saved=saved, ratios=ratios,
                                             added_collectives=added))


if __name__ == "__main__":
    sys.exit(main())
