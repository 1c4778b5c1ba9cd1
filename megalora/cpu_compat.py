"""The CPU compatibility layer: megatron-core 0.16 on a CPU-only torch with gloo.

It lets the parallel code paths (TP, SP, PP, VPP) run and be tested without a
GPU. It is explicit and reversible: ``enable()`` patches, ``disable()`` puts
back every original object, and ``enabled()`` does both around a block.
``megalora.parallel_start.init_parallel`` enables it on a CPU-only torch.
Nothing is patched when ``torch.cuda.is_available()`` is True.

What is patched, and why that way
---------------------------------
megatron-core hard-codes CUDA in two kinds of places. ``torch.cuda.*``
helpers (``current_device()`` used as a tensor device in some thirty call
sites, ``synchronize()`` in p2p communication, the RNG tracker's state
functions) are plain Python functions, so a ``TorchFunctionMode`` never sees
them; and a handful of literal ``device="cuda"`` / ``Tensor.cuda()`` calls
(the causal masks, the schedules' ``total_num_tokens``, the tied-embedding
copy under PP).

* ``torch.cuda.current_device`` and ``torch.cuda.synchronize`` are replaced
  while the layer is enabled: on a machine without CUDA the originals can only raise, so
  the only code whose behaviour changes is code that would have crashed.
  ``torch.cuda.is_available()`` is never faked, so user code that asks still
  learns the truth.
* The literal-``cuda`` sites are patched one by one: each megatron function
  that contains one is wrapped so that it runs inside ``_CudaToCpuMode``, a
  ``TorchFunctionMode`` that maps a CUDA ``device=`` argument (and
  ``Tensor.cuda()``) to the CPU. The mode is active only inside those
  functions, so it costs nothing anywhere else and never rewrites a user's
  own ``device="cuda"`` outside a Megatron schedule call.
* The RNG tracker keeps CPU generator states: ``add`` seeds a CPU state,
  ``fork`` swaps it into the default CPU generator and swaps the caller's
  state back afterwards, and the module's ``_get/_set_cuda_rng_state`` (used
  by activation checkpointing) read and write the CPU generator.
* Mixture of experts: ``moe_utils`` names ``te_general_gemm`` only when
  Transformer Engine imports, yet the router reads it unconditionally
  (a ``NameError`` without TE); while enabled it is defined as ``None``,
  which selects the router's own ``torch.mm`` path. The alltoall dispatcher
  creates a ``torch.cuda.Stream`` for its device-to-host copies and syncs on
  an event; on the CPU there is nothing to copy, so its class-level stream
  is a placeholder and ``_maybe_dtoh_and_synchronize`` only turns the split
  sizes into numpy arrays at the same point the GPU path does. gloo has no
  uneven all-gather or reduce-scatter, which the dispatchers use under
  TP > 1 with expert-TP 1 (``output_split_sizes`` / ``input_split_sizes``):
  those two calls in ``tensor_parallel.mappings`` take an equal-size
  all-gather of padded rows, or an all-reduce and a slice, instead; every
  even call goes to Megatron's own code.
* Batched pipeline p2p (``batch_p2p_comm=True``, the default) is routed to
  Megatron's unbatched ``_p2p_ops``: gloo matches a pair's messages in
  posting order, and the batched order swaps activations and gradients at
  PP=2 under the interleaved schedule.

Version
-------
The patched sites are those of megatron-core 0.16.x (``SUPPORTED_MEGATRON``).
``enable()`` warns in one line when another version is installed, and raises
when a site it patches no longer exists there.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Callable, Iterator

import torch

__all__ = ["SUPPORTED_MEGATRON", "enable", "disable", "enabled", "is_active",
           "check_megatron_version"]

# The megatron-core release series whose CUDA sites this module patches.
SUPPORTED_MEGATRON = ("0.16",)

# (owner, attribute name, original object) for every patched attribute, in
# patch order; None while the layer is off.
_SAVED: dict[str, list | None] = {"patches": None}


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    # A bare int as a device means a CUDA ordinal.
    return isinstance(value, int) and not isinstance(value, bool)


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Maps CUDA ``device=`` arguments, ``Tensor.cuda()`` and ``.to("cuda")`` to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], bool) \
                and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


# megatron-core's optimizer asserts ``param.type() == 'torch.cuda.FloatTensor'``.
_CPU_TO_CUDA_TYPE = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
                     "torch.HalfTensor": "torch.cuda.HalfTensor"}


class _CudaNamesOnCpu(_CudaToCpuMode):
    """:class:`_CudaToCpuMode`, plus ``Tensor.type()`` answering CUDA names for CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CPU_TO_CUDA_TYPE.get(name, name)
        return super().__torch_function__(func, types, args, kwargs)


@contextlib.contextmanager
def cuda_names_on_cpu() -> Iterator[None]:
    """The scope in which megatron-core's optimizer runs on CPU tensors (a no-op with CUDA).

    Scoped rather than part of :func:`enable`: faking tensor type names for the
    whole process would mislead user code that asks what a tensor is.
    """
    if torch.cuda.is_available():
        yield
        return
    with _CudaNamesOnCpu():
        yield


def _on_cpu(fn: Callable) -> Callable:
    """Wraps a megatron function that hard-codes CUDA so it runs on CPU."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaToCpuMode():
            return fn(*args, **kwargs)

    return wrapper


def _get_cpu_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()  # already a fresh copy, so `clone` needs nothing


def _set_cpu_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _tracker_add(self, name: str, seed: int) -> None:
    """``CudaRNGStatesTracker.add`` with a CPU generator state."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


@contextlib.contextmanager
def _tracker_fork(self, name: str = "model-parallel-rng"):
    """``CudaRNGStatesTracker.fork`` on the default CPU generator.

    Megatron's own fork warns when the CPU state changes inside it; here the
    CPU generator *is* the forked one, so that check is left out.
    """
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(f"current state name {self._current_state_name} is not the same "
                            f"as the desired state name {name}.")
        self.states_[name] = torch.get_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_name


def _moe_dtoh_on_cpu(self, point: str, tokens_per_expert: torch.Tensor | None = None):
    """``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`` with nothing on a device.

    The GPU path copies the split sizes to the host as numpy arrays at
    ``cuda_dtoh_point`` (on a side stream); the same arrays, made here at the
    same point, keep the dispatcher's later steps on the types they expect.
    """
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name, None)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


def _uneven_gather(original: Callable) -> Callable:
    """``mappings._gather_along_first_dim`` whose uneven case pads to equal rows (gloo has none)."""

    @functools.wraps(original)
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        rows = max(sizes)
        padded = input_.new_zeros((rows, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((rows * len(sizes), *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[i * rows: i * rows + n] for i, n in enumerate(sizes)])

    return gather


def _uneven_reduce_scatter(original: Callable) -> Callable:
    """``mappings._reduce_scatter_along_first_dim`` whose uneven case all-reduces and slices."""

    @functools.wraps(original)
    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        return list(torch.split(total, [int(n) for n in input_split_sizes]))[group.rank()].clone()

    return reduce_scatter


class _HostStream:
    """Stands for the alltoall dispatcher's D2H stream, which a CPU run never uses."""


# Attributes that may not exist in the patched module: set while enabled, deleted after.
_MAY_BE_ABSENT = frozenset({"te_general_gemm"})
_ABSENT = object()


def check_megatron_version(installed: str | None = None) -> str | None:
    """Compares megatron-core's version with the ones this layer was written for.

    Args:
        installed: The version to check; the installed megatron-core's when None.

    Returns:
        None when it is supported, else a one-line message saying what differs.
    """
    if installed is None:
        from megatron.core import package_info

        installed = package_info.__version__
    if any(installed == s or installed.startswith(s + ".") for s in SUPPORTED_MEGATRON):
        return None
    wanted = ", ".join(f"{s}.x" for s in SUPPORTED_MEGATRON)
    return (f"megalora.cpu_compat was written for megatron-core {wanted} but {installed} is "
            f"installed; CPU runs may fail or be wrong: pin megatron-core=={SUPPORTED_MEGATRON[-1]}.* "
            "or run on a GPU.")


def _patches() -> list[tuple[Any, str, Any]]:
    """The (owner, attribute, replacement) triples ``enable`` applies, in order."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.language_module import language_module
    from megatron.core.pipeline_parallel import p2p_communication as p2p
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils

    patches: list[tuple[Any, str, Any]] = [
        (torch.cuda, "current_device", lambda: torch.device("cpu")),
        (torch.cuda, "synchronize", lambda device=None: None),  # CPU ops are synchronous
        (mrandom, "_get_cuda_rng_state", _get_cpu_rng_state),
        (mrandom, "_set_cuda_rng_state", _set_cpu_rng_state),
        (mrandom.CudaRNGStatesTracker, "add", _tracker_add),
        (mrandom.CudaRNGStatesTracker, "fork", _tracker_fork),
    ]
    # Literal device="cuda" sites. fused_softmax imported the mask helpers by
    # name, so its references are replaced too.
    for module, names in (
        (tutils, ("get_default_causal_mask", "get_sliding_window_causal_mask")),
        (fused_softmax, ("get_default_causal_mask", "get_sliding_window_causal_mask")),
        (schedules, ("forward_backward_no_pipelining",
                     "forward_backward_pipelining_without_interleaving",
                     "forward_backward_pipelining_with_interleaving")),
    ):
        patches += [(module, name, _on_cpu(_original(module, name))) for name in names]
    # gloo pairs a rank's isends with its peer's irecvs in posting order.
    # The batched path posts send_prev before send_next, so at PP=2 (prev and
    # next stage are the same rank) the interleaved schedule's activations
    # and gradients arrive swapped, silently. Megatron's unbatched path posts
    # in an order both parities agree on; use it.
    unbatched = _original(p2p, "_p2p_ops")
    patches.append((p2p, "_batched_p2p_ops", lambda **kw: list(unbatched(**kw).values())))
    patches += _moe_patches()
    lm = language_module.LanguageModule
    patches.append((lm, "setup_embeddings_and_output_layer",
                    _on_cpu(_original(lm, "setup_embeddings_and_output_layer"))))
    return patches


def _moe_patches() -> list[tuple[Any, str, Any]]:
    """The MoE sites (see the module docstring): the router's GEMM choice, the dispatcher's stream."""
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe import token_dispatcher as td

    patches = []
    if "te_general_gemm" not in vars(moe_utils):  # Transformer Engine absent
        patches.append((moe_utils, "te_general_gemm", None))
    dispatcher = td.MoEAlltoAllTokenDispatcher
    _original(dispatcher, "_maybe_dtoh_and_synchronize")
    patches += [(dispatcher, "cuda_dtoh_stream", _HostStream()),
                (dispatcher, "_maybe_dtoh_and_synchronize", _moe_dtoh_on_cpu),
                (mappings, "_gather_along_first_dim",
                 _uneven_gather(_original(mappings, "_gather_along_first_dim"))),
                (mappings, "_reduce_scatter_along_first_dim",
                 _uneven_reduce_scatter(_original(mappings, "_reduce_scatter_along_first_dim")))]
    return patches


def _original(owner: Any, name: str) -> Any:
    """The attribute as stored on ``owner`` (a class's own ``__dict__`` entry, not a bound lookup)."""
    stored = owner.__dict__ if isinstance(owner, type) else vars(owner)
    if name not in stored:
        raise RuntimeError(
            f"megalora.cpu_compat: {getattr(owner, '__name__', owner)}.{name} is missing in this "
            f"megatron-core; the layer supports {', '.join(SUPPORTED_MEGATRON)}.x only."
        )
    return stored[name]


def enable() -> None:
    """Patches megatron-core and ``torch.cuda`` so Megatron runs on CPU with gloo.

    Idempotent: a second call while enabled does nothing. Does nothing at all
    when ``torch.cuda.is_available()``. Warns once per call that patches when
    the installed megatron-core is not a supported version. See the module
    docstring for what is patched and why it is scoped that way.

    Raises:
        RuntimeError: When a site it patches does not exist in the installed
            megatron-core; nothing is patched then.
    """
    if torch.cuda.is_available() or _SAVED["patches"] is not None:
        return
    message = check_megatron_version()
    if message:
        warnings.warn(message, stacklevel=2)
    patches = _patches()  # everything is looked up before anything is changed
    saved = []
    for owner, name, replacement in patches:
        absent = name in _MAY_BE_ABSENT and name not in vars(owner)
        saved.append((owner, name, _ABSENT if absent else _original(owner, name)))
        setattr(owner, name, replacement)
    _SAVED["patches"] = saved


def disable() -> None:
    """Puts back every object ``enable`` replaced; does nothing when off."""
    saved = _SAVED["patches"]
    if saved is None:
        return
    for owner, name, original in reversed(saved):
        if original is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _SAVED["patches"] = None


def is_active() -> bool:
    """Whether ``enable`` has patched this process (and ``disable`` has not undone it)."""
    return _SAVED["patches"] is not None


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Enables the layer for a block; disables it after unless it was on before."""
    was_active = is_active()
    enable()
    try:
        yield
    finally:
        if not was_active:
            disable()
