"""CPU/gloo patches that let Megatron-LM's unmodified ``pretrain_gpt.py`` (tag core_v0.16.1) run without a GPU.

TEST HARNESS ONLY (``tests/integrations/test_megatron_lm_real.py``). Megatron-LM's
``initialize`` asserts CUDA, so this fakes ``torch.cuda.is_available()``;
that is acceptable for a test of Megatron-LM's training loop and must never
happen in the library. Because CUDA then looks present, megalora's own CPU
compatibility layer (``megalora.runtime``) stays off, and every CUDA-ism it
would redirect is redirected here instead. Each patch below names the
Megatron-LM / megatron-core call that needs it (see also the list in the
project's anchors notes).

:func:`apply` must run before ``megatron.training`` is imported.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import types

import torch

from megalora.cpu_compat import (
    _CudaToCpuMode,
    _get_cpu_rng_state,
    _set_cpu_rng_state,
    _tracker_add,
    _tracker_fork,
)

_STATE: dict = {}


class _TritonAttr:
    """Stands for any triton attribute: ``@triton.jit``, ``@triton.jit(...)``, ``tl.constexpr``, ``x[...]``.

    Only module-level definitions of ``batch_invariant_kernels`` evaluate these;
    its kernels never run on CPU.
    """

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a bare decorator: keep the function
        return _TritonAttr(self._name + "()")

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _TritonAttr(f"{self._name}.{item}")

    def __getitem__(self, item):
        return self

    def __repr__(self):
        return f"<triton stub {self._name}>"


def _import_with_triton_stub(module: str) -> None:
    """Imports ``module`` while stub ``triton`` modules are in ``sys.modules``, then removes them.

    megatron-core's ``custom_layers/batch_invariant_kernels.py`` imports triton
    unconditionally, and CPU torch wheels ship no triton. The stub must not
    outlive that import: torch's dynamo/inductor probe for triton and would
    take the stub for a real one.
    """
    if "triton" in sys.modules or importlib.util.find_spec("triton") is not None:
        __import__(module)  # a real triton: nothing to fake
        return
    names = ("triton", "triton.language", "triton.runtime", "triton.compiler")
    for name in names:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        mod.__path__ = []  # a package, so "import triton.language" resolves from sys.modules
        mod.__version__ = "0.0.0"
        mod.__getattr__ = (lambda prefix: lambda item: _stub_attr(prefix, item))(name)
        sys.modules[name] = mod
    sys.modules["triton"].language = sys.modules["triton.language"]
    sys.modules["triton"].cdiv = lambda x, y: (x + y - 1) // y
    try:
        __import__(module)
    finally:
        for name in names:
            sys.modules.pop(name, None)


def _stub_attr(prefix: str, item: str):
    if item.startswith("__"):
        raise AttributeError(item)
    return _TritonAttr(f"{prefix}.{item}")


# Megatron-LM's grad clipping asserts that gradients are "torch.cuda.FloatTensor".
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor", torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor", torch.bool: "torch.cuda.BoolTensor",
    torch.int8: "torch.cuda.CharTensor",
}


class _NoOpStreamOrEvent:
    """``torch.cuda.Stream`` and ``Event`` (``get_model`` builds DDP inside a side stream; timers record events)."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return lambda *args, **kwargs: None

    def record_event(self, event=None):
        return event or _NoOpStreamOrEvent()

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _FakeProps:
    """``get_device_properties``: read by Megatron-LM's initialize and memory reports."""

    name = "CPU (faked as CUDA by the test harness)"
    major, minor = 8, 0
    total_memory = 16 * 2 ** 30
    multi_processor_count = 1
    uuid = "cpu"
    L2_cache_size = 0


def _patch_torch_cuda() -> None:
    """Makes CUDA look present (Megatron-LM's ``initialize`` asserts it) with CPU-backed answers."""
    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None  # p2p communication and timers
    cuda.get_device_properties = lambda *a, **k: _FakeProps()
    cuda.get_device_capability = lambda *a, **k: (_FakeProps.major, _FakeProps.minor)
    cuda.get_device_name = lambda *a, **k: _FakeProps.name
    # The rerun state machine saves and restores the CUDA RNG state every step.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed already seeds the CPU generator, the only one there is.
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None
    cuda.Stream = cuda.Event = _NoOpStreamOrEvent
    cuda.current_stream = cuda.default_stream = lambda *a, **k: _NoOpStreamOrEvent()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_stream = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved",
                 "device_memory_used"):
        setattr(cuda, name, lambda *a, **k: 0)
    cuda.memory_stats = lambda *a, **k: {}
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.mem_get_info = lambda *a, **k: (_FakeProps.total_memory // 2, _FakeProps.total_memory)
    cuda.is_bf16_supported = lambda *a, **k: True

    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            return _CUDA_TYPE_NAMES.get(self.dtype, original_type(self))
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type


def _patch_spawn_main() -> None:
    """Spawned children must not re-run ``pretrain_gpt.py`` as ``__mp_main__``.

    With ``--save`` (torch_dist format) the async checkpoint writer starts a
    ``spawn`` multiprocessing Manager; its child would re-import the main
    script without these patches and die on ``import triton``. The Manager's
    child needs nothing from the main script.
    """
    import multiprocessing.spawn as mp_spawn

    original = mp_spawn.get_preparation_data

    def get_preparation_data(name):
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    mp_spawn.get_preparation_data = get_preparation_data


def _patch_megatron() -> None:
    """Patches inside megatron-core and Megatron-LM's training package (both must be importable)."""
    import megatron.core.datasets.utils as dataset_utils
    from megatron.core.pipeline_parallel import p2p_communication as p2p
    from megatron.core.tensor_parallel import random as mp_random

    # The library's own CPU versions (megalora.cpu_compat.enable() cannot install them here: with
    # is_available() faked it sees CUDA and does nothing).
    mp_random._get_cuda_rng_state = _get_cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    mp_random.CudaRNGStatesTracker.add = _tracker_add
    mp_random.CudaRNGStatesTracker.fork = _tracker_fork

    # gloo pairs a batch's isends/irecvs in posting order, which the two stages of a PP
    # exchange do not share; Megatron's unbatched path posts them in an order both agree on.
    unbatched = p2p._p2p_ops
    p2p._batched_p2p_ops = lambda **kwargs: list(unbatched(**kwargs).values())

    # The C++ dataset helpers come prebuilt with the megatron-core wheel; compiling needs a toolchain.
    dataset_utils.compile_helpers = lambda: None
    from megatron.legacy import fused_kernels

    fused_kernels.load = lambda args: None  # CUDA kernels; the runs use --no-*-fusion
    from megatron.training import initialize

    initialize._warmup_jit_function = lambda: None  # torch.compile on cuda tensors


def apply() -> None:
    """Installs every patch once per process; call before importing ``megatron.training``."""
    if _STATE:
        return
    # torch's dynamo and megatron.core's own imports probe for triton: import them before the stub exists.
    import megatron.core  # noqa: F401
    import torch._dynamo  # noqa: F401

    _import_with_triton_stub("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    _patch_torch_cuda()
    _patch_spawn_main()
    mode = _CudaToCpuMode()
    mode.__enter__()  # for the whole process: the harness runs one training and exits
    _STATE["mode"] = mode
    _patch_megatron()
