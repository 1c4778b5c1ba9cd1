"""Shared pytest fixtures: the multi-rank CPU harness, and a check that the session leaves no process behind."""

from __future__ import annotations

import functools
import os
import time

import pytest

from tests import procs, worker_state
from tests.multirank import run_on_ranks, shutdown_pools


# Seconds a test's leftover processes get to exit before they count as left behind (the harness's own
# tests run sessions that start no launcher, and set it lower).
STRAY_GRACE_ENV = "MEGALORA_TEST_STRAY_GRACE_S"
# What each test left running, found and ended right after it (named, so the culprit is known).
_LEFT_BY_TESTS: list[str] = []
_SHOWN = 400  # characters of a command line: enough for a long checkout path and the command


def _pool_workers() -> set[int]:
    from tests import multirank

    return {proc.pid for pool in list(multirank._POOLS.values()) for proc in pool.procs}


@pytest.fixture(autouse=True)
def _no_process_left_by_the_test(request):
    """Ends the processes a test started and left running; the session then fails, naming the test."""
    before = set(procs.descendants())
    yield
    procs.reap_zombies()

    def strays() -> list[int]:
        keep = before | _pool_workers()
        return [pid for pid in procs.descendants()
                if pid not in keep and not procs.mp_helper(pid)]

    # A launcher's children exit a moment after it returns (SIGTERM handling): give them that moment.
    deadline = time.monotonic() + float(os.environ.get(STRAY_GRACE_ENV, "10"))
    while strays() and time.monotonic() < deadline:
        time.sleep(0.2)
        procs.reap_zombies()
    left = strays()
    if left:
        _LEFT_BY_TESTS.extend(f"  {pid} {procs.cmdline(pid)[:_SHOWN]}  (left by {request.node.nodeid})"
                              for pid in left)
        procs.end(left)


def pytest_sessionstart(session):
    # Orphans (ranks of a torchrun killed on timeout, workers whose pool was
    # lost) become this process's children, so the check below sees them.
    procs.become_subreaper()


def pytest_sessionfinish(session, exitstatus):
    """Ends whatever the session started and fails a passing session that left processes behind.

    Runs also when a test failed, timed out or the session was interrupted
    (Ctrl-C): pytest calls this hook on every way out but a kill.
    """
    shutdown_pools()
    procs.reap_zombies()
    left = [pid for pid in procs.descendants() if not procs.mp_helper(pid)]
    lines = _LEFT_BY_TESTS + [f"  {pid} {procs.cmdline(pid)[:_SHOWN]}" for pid in left]
    if not lines:
        return
    procs.end(left)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    text = "the test session left processes running (now ended):\n" + "\n".join(lines)
    if reporter is not None:
        reporter.write_line(text, red=True)
    if session.exitstatus == 0:
        session.exitstatus = 1


@pytest.fixture(scope="session", autouse=True)
def _multirank_pools():
    """Stops the persistent worker pools when the test session ends."""
    yield
    shutdown_pools()


@pytest.fixture(scope="session")
def _clean_state():
    """This process's state before any test ran (the pool's workers keep their own)."""
    return worker_state.capture()


@pytest.fixture(autouse=True)
def _restore_state(_clean_state):
    """Puts back megalora's and megatron-core's module state after each test run in this process."""
    yield
    worker_state.restore(_clean_state, process=False)


@pytest.fixture
def ranks():
    """``ranks(world_size, fn, *args, **kwargs)``: run ``fn`` on that many ranks."""
    return run_on_ranks


@pytest.fixture
def dist2():
    """``dist2(fn, *args, **kwargs)``: run a module-level ``fn`` on 2 gloo ranks."""
    return functools.partial(run_on_ranks, 2)


@pytest.fixture
def dist4():
    """``dist4(fn, *args, **kwargs)``: run a module-level ``fn`` on 4 gloo ranks."""
    return functools.partial(run_on_ranks, 4)
