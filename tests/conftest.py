"""Shared pytest fixtures: the multi-rank CPU harness."""

from __future__ import annotations

import functools

import pytest

from tests.multirank import run_on_ranks, shutdown_pools


@pytest.fixture(scope="session", autouse=True)
def _multirank_pools():
    """Stops the persistent worker pools when the test session ends."""
    yield
    shutdown_pools()


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
