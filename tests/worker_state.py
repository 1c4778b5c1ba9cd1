"""The state a long-lived test process keeps between tests, and how to put it back.

The workers of :mod:`tests.multirank` run many tests each, and so does the
pytest process itself. Whatever one test leaves in a module global would
decide the next test's outcome, and the failure would depend on test order.
:func:`capture` records the clean state once; :func:`restore` puts it back
after every test:

* megalora's module state: Megatron's parallel state and the process groups
  ``init_parallel`` made (``destroy_parallel``), the recorded LoRA seed
  (``lora_seed``), user entries of ``register_lora_layer``, the
  ``te_layer_classes`` cache, the Megatron-LM plug-in's pending chunks and
  model, and whether the CPU compatibility layer is on (``cpu_compat``);
* megatron-core's own globals that outlive ``destroy_model_parallel``: the
  CUDA-RNG tracker, the micro-batch calculator and dist-checkpointing's
  results queue (a spawned Manager process, shut down);
* with ``process=True`` (the pool's workers, where no pytest fixture runs):
  the torch / ``random`` / numpy RNG states, torch's default dtype, grad mode
  and thread count, the environment and the working directory.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from typing import Any

import torch

__all__ = ["Baseline", "capture", "restore", "observe"]


@dataclasses.dataclass(frozen=True)
class Baseline:
    """What :func:`restore` goes back to; taken by :func:`capture`."""

    compat_active: bool
    torch_rng: torch.Tensor
    python_rng: Any
    numpy_rng: Any
    default_dtype: torch.dtype
    grad_enabled: bool
    num_threads: int
    environ: dict
    cwd: str


def capture() -> Baseline:
    """Records the clean state of this process (call it before the first test)."""
    compat = sys.modules.get("megalora.cpu_compat")
    numpy = sys.modules.get("numpy")
    return Baseline(
        compat_active=compat is not None and compat.is_active(), torch_rng=torch.get_rng_state(),
        python_rng=random.getstate(), numpy_rng=numpy.random.get_state() if numpy else None,
        default_dtype=torch.get_default_dtype(), grad_enabled=torch.is_grad_enabled(),
        num_threads=torch.get_num_threads(), environ=dict(os.environ), cwd=os.getcwd())


def _restore_modules(baseline: Baseline) -> None:
    # Only modules already imported can hold state; importing the others here
    # would only slow down processes that never needed them.
    loaded = sys.modules.get
    parallel_start = loaded("megalora.parallel_start")
    if parallel_start is not None and parallel_start.is_initialized():
        parallel_start.destroy_parallel()
    seed, dispatch = loaded("megalora.lora_seed"), loaded("megalora.layers.dispatch")
    te, plugin = loaded("megalora.layers.te"), loaded("megalora.integrations.megatron_lm")
    if seed is not None:
        seed.clear_lora_init_seed()
    if dispatch is not None:
        dispatch._USER.clear()  # entries a test registered and did not remove
    if te is not None:
        te.te_layer_classes.cache_clear()
    if plugin is not None:
        plugin._STATE.update(peft_model=None, pending=[])
    compat = loaded("megalora.cpu_compat")
    if compat is not None:
        # disable() puts back every original, also after a test that disabled
        # or re-enabled the layer; enable() then patches from those originals.
        compat.disable()
        if baseline.compat_active:
            compat.enable()
    mrandom = loaded("megatron.core.tensor_parallel.random")
    if mrandom is not None:
        # The tracker keeps its named streams across destroy_model_parallel;
        # these are its import-time values (what initialize_rng_tracker's
        # force_reset sets before it builds a new one).
        mrandom._CUDA_RNG_STATE_TRACKER = None
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    microbatches = loaded("megatron.core.num_microbatches_calculator")
    if microbatches is not None:
        microbatches.destroy_num_microbatches_calculator()
    fs_async = loaded("megatron.core.dist_checkpointing.strategies.filesystem_async")
    if fs_async is not None and fs_async._results_queue is not None:
        # A dist-checkpointing save starts a spawned multiprocessing Manager and keeps it in this
        # global for the process's lifetime; a pool worker's os._exit would orphan that process.
        manager = getattr(fs_async._results_queue, "_manager", None)
        fs_async._results_queue = None
        if manager is not None:
            manager.shutdown()


def _restore_process(baseline: Baseline) -> None:
    torch.set_rng_state(baseline.torch_rng)
    random.setstate(baseline.python_rng)
    numpy = sys.modules.get("numpy")
    if numpy is not None and baseline.numpy_rng is not None:
        numpy.random.set_state(baseline.numpy_rng)
    torch.set_default_dtype(baseline.default_dtype)
    torch.set_grad_enabled(baseline.grad_enabled)
    torch.set_num_threads(baseline.num_threads)
    for key in set(os.environ) - set(baseline.environ):
        del os.environ[key]
    os.environ.update(baseline.environ)
    os.chdir(baseline.cwd)


def restore(baseline: Baseline, process: bool) -> None:
    """Puts back the state :func:`capture` recorded.

    Args:
        baseline: From :func:`capture` in this process.
        process: Also the RNGs, torch's global settings, the environment and
            the working directory. Pool workers pass True; the pytest process
            passes False, since pytest's own fixtures (``monkeypatch``) own
            those there and pytest itself keeps variables in the environment.
    """
    _restore_modules(baseline)
    if process:
        _restore_process(baseline)


def observe() -> dict:
    """Everything :func:`restore` resets, as comparable values (for the tests of this module)."""
    from megatron.core import num_microbatches_calculator as microbatches
    from megatron.core.tensor_parallel import random as mrandom

    from megalora import cpu_compat, lora_seed, parallel_start
    from megalora.integrations import megatron_lm as plugin
    from megalora.layers import dispatch
    from megalora.layers.te import te_layer_classes

    return {
        "parallel": parallel_start.is_initialized(), "lora_seed": lora_seed._SEED["seed"],
        "registered": len(dispatch._USER), "te_cache": te_layer_classes.cache_info().currsize,
        "plugin": (plugin._STATE["peft_model"], len(plugin._STATE["pending"])),
        "compat": cpu_compat.is_active(), "current_device": str(torch.cuda.current_device())
        if cpu_compat.is_active() else None,
        "rng_tracker": mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED,
        "microbatches": microbatches._GLOBAL_NUM_MICROBATCHES_CALCULATOR is None,
        "torch_rng": torch.rand(3).tolist(), "python_rng": random.random(),
        "dtype": str(torch.get_default_dtype()), "grad": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(), "env": os.environ.get("MEGALORA_DIRTY"), "cwd": os.getcwd(),
    }
