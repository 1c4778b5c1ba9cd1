"""A test that leaves the process dirty does not leak into the next one (tests/worker_state.py).

``_dirty`` changes every piece of state the reset covers and returns without
cleaning up, as a failing or careless test would; the next task on the same
workers must see exactly what a task on fresh workers sees.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from tests import worker_state
from tests.multirank import run_on_ranks


def _dirty() -> dict:
    import random

    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    import megalora
    from megalora import cpu_compat, parallel_start
    from megalora.integrations import megatron_lm
    from megalora.layers.te import te_layer_classes

    parallel_start.init_parallel(tensor_model_parallel_size=2, seed=99)  # records LoRA seed 99 too
    get_cuda_rng_tracker().add("leftover-stream", 5)
    init_num_microbatches_calculator(0, None, global_batch_size=4, micro_batch_size=1, data_parallel_size=1)
    megalora.register_lora_layer(lambda m: isinstance(m, nn.Identity), lambda m, ctx: None)  # never removed
    te_layer_classes()
    megatron_lm._STATE["pending"].append("a chunk of a half-built model")
    cpu_compat.disable()
    torch.manual_seed(123)
    random.seed(123)
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    os.environ["MEGALORA_DIRTY"] = "1"
    os.chdir("/")
    return worker_state.observe()


def _observe() -> dict:
    return worker_state.observe()


def test_dirty_task_does_not_leak_into_the_next(ranks):
    clean = ranks(2, _observe)
    dirty = ranks(2, _dirty)
    # The dirtying took: otherwise equality below would prove nothing.
    for before, after in zip(clean, dirty):
        assert {k for k in before if before[k] != after[k]} >= {
            "parallel", "lora_seed", "registered", "te_cache", "plugin", "compat", "rng_tracker",
            "microbatches", "dtype", "grad", "threads", "env", "cwd"}
    assert ranks(2, _observe) == clean


def test_state_before_any_test_is_clean():
    """The baseline itself: no parallel state, seed or registration survives from the worker's start-up."""
    (state, _) = run_on_ranks(2, _observe)
    assert not state["parallel"] and state["lora_seed"] is None and state["registered"] == 0
    assert state["compat"] and state["current_device"] == "cpu"
    assert not state["rng_tracker"] and state["microbatches"]


@pytest.fixture
def dirty_here():
    """Dirties this (the pytest) process's module state inside one test."""
    import megalora
    from megalora import lora_seed

    lora_seed.set_lora_init_seed(7)
    megalora.register_lora_layer(lambda m: isinstance(m, nn.Identity), lambda m, ctx: None)


def test_in_process_restore_puts_module_state_back(dirty_here, _clean_state):
    from megalora import lora_seed
    from megalora.layers import dispatch

    assert lora_seed._SEED["seed"] == 7 and len(dispatch._USER) == 1
    worker_state.restore(_clean_state, process=False)  # what the autouse fixture does after each test
    assert lora_seed._SEED["seed"] is None and dispatch._USER == []


def _start_megatron_results_manager() -> int:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return filesystem_async._get_write_results_queue()._manager._process.pid  # what a dist-checkpoint save does


def _live_children() -> list[int]:
    from tests import procs

    return [pid for pid in procs.descendants() if not procs.mp_helper(pid)]


def test_dist_checkpointing_manager_process_ends_with_the_task():
    """megatron keeps a spawned Manager for its write results; the worker's exit would orphan it."""
    managers = run_on_ranks(2, _start_megatron_results_manager)
    assert all(pid > 0 for pid in managers)
    assert run_on_ranks(2, _live_children) == [[], []]
