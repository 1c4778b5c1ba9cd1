"""Init time of the base-weight LoRA initializers on SmolLM2-135M: megalora at TP=1 and TP=3 vs HF PEFT.

Every linear type of SmolLM2 is targeted: megatron-core's ``linear_qkv``
(q, k, v fused), ``linear_proj``, ``linear_fc1`` (gate, up fused) and
``linear_fc2`` on the megalora side, PEFT's seven projections on the other.
The SVDs of a fused matrix cost what its parts' SVDs cost (``m·n²`` with
``n`` = 576 the hidden size), so both sides do about the same arithmetic.

What is timed is ``get_peft_model`` alone (wall time, and each rank's CPU
time, which other load on the machine disturbs less) (the model is built or loaded
before, untimed), between two barriers, for each of ``--methods``:

* megalora: ``--tps`` layouts, each in its own spawned gloo ranks. At TP=t
  the decompositions are dealt round-robin to the t ranks
  (:mod:`megalora.initializers.distributed`): each rank gathers, decomposes
  and scatters its share, so the work spreads over the ranks' cores. Each
  rank runs ``max(1, cores // t)`` torch threads.
* PEFT 0.21.2 on one process (``transformers``' ``LlamaForCausalLM``, torch's
  default threads). PEFT's LoftQ needs bitsandbytes on CUDA/XPU, so LoftQ is
  compared against megalora's own TP=1.

Usage::

    python benchmarks/init_methods.py [--methods pissa pissa_niter_4 olora loftq] [--tps 1 3] [--r 16]

The goal (issue 12): PiSSA at TP=3 no slower than PEFT on one process on a
2-core machine. Run it on a quiet machine; the load average is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402

MCORE_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["pissa", "pissa_niter_4", "olora", "loftq"])
    p.add_argument("--tps", nargs="*", type=int, default=[1, 3])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--peft-threads", type=int, default=None, help="torch threads of the PEFT process (default torch's)")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def lora_kwargs(method: str, r: int) -> dict:
    kwargs = dict(r=r, lora_alpha=r if method == "loftq" else 2 * r, lora_dropout=0.0, init_lora_weights=method)
    if method == "loftq":
        kwargs["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1}
    return kwargs


# --------------------------------------------------------------------------
# megalora ranks


def megalora_worker(rank: int, args, tp: int, out_path: str) -> None:
    import torch.distributed as dist

    import megalora
    import megalora.hf as H
    from megalora.collectives import all_gather_objects

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    megalora.init_parallel(tensor_model_parallel_size=tp, seed=1234)
    times, cpu = {}, {}
    for method in args.methods:
        model = H.build_gpt_from_hf(None)
        config = megalora.LoraConfig(target_modules=MCORE_TARGETS, **lora_kwargs(method, args.r))
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        megalora.get_peft_model(model, config)
        spent = time.process_time() - start_cpu
        dist.barrier()
        times[method] = time.perf_counter() - start
        cpu[method] = all_gather_objects(spent)  # every rank's CPU seconds: how the work was spread
        del model
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"times": times, "cpu": cpu, "threads": torch.get_num_threads()}, f)


def run_megalora(args, tp: int) -> dict:
    # No ONE_THREAD_ENV: each rank sets its own share of the cores for LAPACK.
    return measure.spawn_ranks(megalora_worker, tp, (args, tp))


# --------------------------------------------------------------------------
# PEFT on one process


def run_peft(args) -> dict:
    import peft

    import megalora.hf as H

    if args.peft_threads:
        torch.set_num_threads(args.peft_threads)
    hf = H.load_hf_model(None)
    times, cpu = {}, {}
    for method in args.methods:
        if method == "loftq":
            continue  # PEFT's LoftQ needs bitsandbytes on CUDA/XPU
        model = copy.deepcopy(hf)
        config = peft.LoraConfig(target_modules=HF_TARGETS, **lora_kwargs(method, args.r))
        start, start_cpu = time.perf_counter(), time.process_time()
        peft.get_peft_model(model, config)
        times[method] = time.perf_counter() - start
        cpu[method] = [time.process_time() - start_cpu]
        del model
    return {"times": times, "cpu": cpu, "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    args = parse_args(argv)
    results = {f"megalora tp={tp}": run_megalora(args, tp) for tp in args.tps}
    if not args.skip_peft:
        results["peft (1 process)"] = run_peft(args)
    print(f"init time of get_peft_model on SmolLM2-135M, r={args.r}, all linear types "
          f"(load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores)")
    print("wall seconds (CPU seconds of the busiest rank / all ranks); [threads per rank]")
    print(f"{'method':<16}" + "".join(f"{name + ' [' + str(r['threads']) + 't]':>34}" for name, r in results.items()))
    for method in args.methods:
        cells = []
        for r in results.values():
            if method not in r["times"]:
                cells.append(f"{'-':>34}")
                continue
            ranks = r["cpu"][method]
            cells.append(f"{r['times'][method]:>10.1f}s ({max(ranks):6.1f} / {sum(ranks):6.1f} cpu)")
        print(f"{method:<16}" + "".join(f"{c:>34}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
