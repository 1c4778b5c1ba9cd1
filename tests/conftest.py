"""Shared pytest fixtures: the multi-rank CPU harness, and a check that the session leaves no process behind."""

from __future__ import annotations

import functools

import pytest

from tests import procs, worker_state
from tests.multirank import run_on_ranks, shutdown_pools


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
    left = [pid for pid in procs.descendants() if procs.TRACKER not in procs.cmdline(pid)]
    if not left:
        return
    lines = [f"  {pid} {procs.cmdline(pid)[:160]}" for pid in left]
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
