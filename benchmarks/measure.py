"""Measuring helpers shared by the benchmarks: timing, memory, collectives, rank launch.

Every benchmark measures the same way, so the figures of one script compare
with another's: steps of several configurations interleaved and timed between
barriers (:func:`time_interleaved`), the kernel's RSS high-water mark above a
baseline (:func:`reset_peak_rss`, :func:`peak_rss_kib`), the exact bytes
autograd saves for backward (:func:`saved_activation_mib`), the collectives of
one step by name and shape (:func:`step_collectives`), and fresh gloo ranks
spawned from a plain ``python benchmarks/X.py`` (:func:`spawn_ranks`).

Benchmarks import this file as ``measure`` (their own folder is on
``sys.path``); it imports nothing from megalora at module level, so a script
can set its environment before megalora or torch's extras load.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from typing import Callable

import torch

# The ranks share the machine's cores: one thread each, or they oversubscribe it.
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --------------------------------------------------------------------------
# Time


def time_interleaved(steps: dict, rounds: int, warmup: int, barrier: Callable[[], None] | None = None):
    """Run one step of every configuration per round, the order rotated every round.

    Rotating the order makes drift (thermal, other processes) fall on every
    configuration alike. With ``barrier`` (``dist.barrier`` on several ranks)
    a step is timed between two barriers, so every rank's figure covers the
    same collective work; the CPU time is read before the closing barrier,
    so it stays the step's own.

    Args:
        steps: configuration name -> a function that runs one training step
            and returns its loss.
        rounds: timed rounds.
        warmup: untimed rounds first.
        barrier: called before and after each step, or None in one process.

    Returns:
        ``(wall, cpu, losses)``: per name, the wall and CPU seconds of each
        timed step, and the loss of every step, warm-up included.
    """
    names = list(steps)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    losses = {n: [] for n in names}
    for round_ in range(warmup + rounds):
        k = round_ % len(names)
        for name in names[k:] + names[:k]:
            if barrier is not None:
                barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = steps[name]()
            c1 = time.process_time()
            if barrier is not None:
                barrier()
            if round_ >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(c1 - c0)
            losses[name].append(loss)
    return wall, cpu, losses


def median_of_slowest(ranks: list, key: str, name: str) -> float:
    """Median over rounds of the slowest rank's time in that round.

    The slowest rank is the step's real length: the others wait for it at
    the next collective.

    Args:
        ranks: every rank's result dict, each with ``result[key][name]`` a
            list of per-round seconds.
        key: which times (for example wall or CPU).
        name: the configuration.
    """
    rounds = len(ranks[0][key][name])
    return statistics.median(max(r[key][name][i] for r in ranks) for i in range(rounds))


# --------------------------------------------------------------------------
# Memory


def status_kib(field: str) -> int:
    """A KiB field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Reset the kernel's RSS high-water mark to the current RSS; return that RSS in KiB, the baseline.

    The high-water mark counts what the process really touched (weights,
    grads, optimizer state, activations, allocator slack), which tracemalloc
    cannot see: torch allocates tensor memory outside Python's allocator.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset VmHWM to the current RSS
    return status_kib("VmRSS")


def peak_rss_kib() -> int:
    """The RSS high-water mark in KiB since :func:`reset_peak_rss` (or the process start)."""
    return status_kib("VmHWM")


def saved_activation_mib(model: torch.nn.Module, forward: Callable[[], torch.Tensor], opt=None) -> float:
    """MiB of tensors autograd saves for backward in one forward, parameters left out.

    Counted by storage, once each, through ``saved_tensors_hooks``: what a
    configuration keeps alive between forward and backward, free of the
    allocator's slack that an RSS figure includes.

    Args:
        model: the module whose parameters are left out of the count.
        forward: computes the scalar loss.
        opt: its gradients are cleared afterwards (None when nothing trains).
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()  # run (and free) the graph, so that no collective is left pending
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    return sum(storages.values()) / 2**20


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """``(all, trainable)`` parameter counts of ``model`` on this rank."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# --------------------------------------------------------------------------
# Collectives


def step_collectives(step: Callable[[], object]) -> dict:
    """The collectives ``step()`` issues: calls and bytes per name, and calls per name and first tensor's shape.

    Returns:
        ``dict(calls=..., bytes=..., shapes=...)``, ``shapes`` keyed like
        ``"all_reduce[16, 1, 64]"`` so that two configurations can be
        compared with :func:`diff_counts`.
    """
    from megalora.testing.collective_counter import count_collectives

    with count_collectives() as log:
        step()
    shapes = {}
    for label, shape in log.shapes:
        key = f"{label}{list(shape)}"
        shapes[key] = shapes.get(key, 0) + 1
    return dict(calls=dict(log.calls), bytes=dict(log.bytes), shapes=shapes)


def diff_counts(a: dict, b: dict) -> dict:
    """Counts in ``a`` beyond those in ``b``, by sorted key; negative counts are fewer, equal keys left out."""
    keys = sorted(set(a) | set(b))
    return {k: a.get(k, 0) - b.get(k, 0) for k in keys if a.get(k, 0) != b.get(k, 0)}


# --------------------------------------------------------------------------
# Ranks and results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable, fn_args: tuple, out_path: str) -> None:
    # torch's launchers export these; megalora.init_parallel reads them.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    fn(rank, *fn_args, out_path)


def spawn_ranks(fn: Callable, nprocs: int, fn_args: tuple = (), env: dict | None = None):
    """Run ``fn(rank, *fn_args, out_path)`` on ``nprocs`` fresh processes; return the JSON rank 0 wrote.

    Fresh processes for every call, so a memory run starts from the same
    imports, and no ``torchrun`` is needed. The rendezvous goes through a
    free local port; ``RANK`` and ``LOCAL_RANK`` are set in each process
    before ``fn`` runs.

    Args:
        fn: a module-level function (it is pickled by name).
        nprocs: the world size.
        fn_args: passed after the rank.
        env: more environment variables for the ranks (for example
            :data:`ONE_THREAD_ENV`).
    """
    import torch.multiprocessing as mp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(nprocs),
                      CUDA_DEVICE_MAX_CONNECTIONS="1", **(env or {}))
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        mp.spawn(_rank_main, args=(fn, tuple(fn_args), out_path), nprocs=nprocs, join=True)
        with open(out_path) as f:
            return json.load(f)


def write_gathered(result: dict, out_path: str) -> None:
    """Gather every rank's ``result`` and write the list, in rank order, from rank 0 to ``out_path`` as JSON.

    A collective: every rank must call it.
    """
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)


def write_json(path: str | None, args, figures: dict) -> None:
    """``--json``: write the arguments and the figures to ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(args=vars(args), **figures), f, indent=1)
