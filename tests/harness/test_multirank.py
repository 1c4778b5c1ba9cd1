"""Tests of the multi-rank CPU harness (tests/multirank.py): results, failures, stuck ranks, respawns."""

from __future__ import annotations

import pytest
import torch

from tests import multirank
from tests.multirank import MultiRankError, run_on_ranks


def _all_reduce_rank(offset):
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank() + offset, t.item()


def _raise_on_rank_1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom from rank 1")
    return "fine"


def _raise_then_stuck():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank 1 gave up before the collective")
    dist.all_reduce(torch.ones(1))


def _stuck_collective():
    import torch.distributed as dist

    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    return "left"


def _mark_then_stuck(marker: str):
    """:func:`_stuck_collective`, after writing ``marker.rank<r>``: a watcher knows the task has started."""
    import torch.distributed as dist

    open(f"{marker}.rank{dist.get_rank()}", "w").close()
    return _stuck_collective()


def test_all_reduce_returns_per_rank_values():
    assert run_on_ranks(2, _all_reduce_rank, 10) == [(10, 3.0), (11, 3.0)]


def test_exception_reports_rank_traceback_and_pool_survives():
    run_on_ranks(2, _all_reduce_rank, 0)
    pool = multirank._POOLS[2]
    with pytest.raises(MultiRankError) as info:
        run_on_ranks(2, _raise_on_rank_1)
    msg = str(info.value)
    assert "rank 1 failed" in msg and "ValueError: boom from rank 1" in msg
    assert "_raise_on_rank_1" in msg and "rank 0 failed" not in msg
    # Every rank answered, so nobody can be stuck: the same pool is reused.
    assert run_on_ranks(2, _all_reduce_rank, 0) == [(0, 3.0), (1, 3.0)]
    assert multirank._POOLS[2] is pool


def test_failure_leaving_a_rank_stuck_respawns(monkeypatch):
    monkeypatch.setattr(multirank, "_GRACE_AFTER_FAILURE_S", 1.0)
    with pytest.raises(MultiRankError) as info:
        run_on_ranks(2, _raise_then_stuck, timeout_s=60)
    msg = str(info.value)
    assert "rank 1 gave up" in msg and "ranks [0] did not answer after another rank" in msg
    assert run_on_ranks(2, _all_reduce_rank, 0) == [(0, 3.0), (1, 3.0)]


def test_stuck_collective_times_out_then_recovers():
    import time

    start = time.monotonic()
    with pytest.raises(MultiRankError, match=r"ranks \[0\] did not answer within timeout_s=4"):
        run_on_ranks(2, _stuck_collective, timeout_s=4)
    assert time.monotonic() - start < 15
    assert run_on_ranks(2, _all_reduce_rank, 0) == [(0, 3.0), (1, 3.0)]


def test_local_function_is_rejected():
    def local():
        return 1

    with pytest.raises(TypeError, match="module-level"):
        run_on_ranks(2, local)


_KEPT: list = []


def _pid_keeping_groups(count: int) -> int:
    """This worker's pid; it keeps ``count`` new gloo groups alive past the task's cleanup (a leaking test)."""
    import os

    import torch.distributed as dist

    _KEPT.extend(dist.new_group([0, 1]) for _ in range(count))
    return os.getpid()


def test_a_pool_left_with_live_groups_is_replaced():
    """Each live gloo group runs a 100 Hz socket thread: workers a task left holding many are not reused."""
    first = run_on_ranks(2, _pid_keeping_groups, 0)
    assert run_on_ranks(2, _pid_keeping_groups, 0) == first  # a clean task: the same workers next time
    assert run_on_ranks(2, _pid_keeping_groups, 10) == first
    assert set(run_on_ranks(2, _pid_keeping_groups, 0)).isdisjoint(first)
