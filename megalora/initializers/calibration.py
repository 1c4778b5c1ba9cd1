"""What the data-driven initializers (CorDA, EVA) share: a target layer's full input.

A forward hook on a tensor-parallel layer sees this rank's piece of the
layer's input: a row-parallel layer gets ``[s, b, in/tp]``, a column-parallel
layer under sequence parallelism ``[s/tp, b, in]``. PEFT's statistics are over
the whole input, so the hook first rebuilds it (:func:`full_input`), on one
rank of the TP group or on all of them.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from ..collectives import group_size
from ..sharding import FULL, ShardSpec, gather_full, param_shard_spec


def _base(module: nn.Module) -> nn.Module:
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def input_split(module: nn.Module) -> tuple[ShardSpec, object]:
    """How a layer's forward input is split over its TP group, and that group.

    Row-parallel (weight split on ``in``): the last dimension. Column-parallel
    under sequence parallelism: the first (sequence) dimension. Otherwise whole.
    """
    base = _base(module)
    weight = getattr(base, "weight", None)
    if weight is None or not getattr(weight, "tensor_model_parallel", False):
        return FULL, None
    from ..layers.parallel import _tp_group

    group = _tp_group(base)
    if group_size(group) == 1:
        return FULL, None
    if param_shard_spec(weight).dim == 1:
        return ShardSpec(dim=-1), group
    sequence_parallel = getattr(base, "sequence_parallel", False) and not getattr(base, "explicit_expert_comm", False)
    return (ShardSpec(dim=0), group) if sequence_parallel else (FULL, None)


def full_input(module: nn.Module, x: torch.Tensor, dst: Optional[int] = None) -> Optional[torch.Tensor]:
    """Collective over the layer's TP group (when its input is split): the whole input ``x``.

    Args:
        module: The layer (or a LoRA layer around it) whose forward saw ``x``.
        x: This rank's forward input.
        dst: A rank of the TP group that alone receives it (the others get
            ``None``); ``None``: every rank gets it.
    """
    spec, group = input_split(module)
    if not spec.sharded:
        return x
    spec = ShardSpec(dim=x.dim() - 1) if spec.dim == -1 else spec
    return gather_full(x.detach(), spec, group, dst=dst)


def check_supported(name: str, module: nn.Module, method: str) -> Optional[str]:
    """Why ``method`` cannot calibrate this layer (``None`` if it can)."""
    base = _base(module)
    kind = type(base).__name__
    if "LayerNorm" in kind:
        return (f"init_lora_weights={method!r} cannot calibrate {name} ({kind}): its forward input is before the "
                "fused layer norm; use megatron's local (non-TE) layer spec, or remove it from target_modules")
    if getattr(base, "weight", None) is None:
        return (f"init_lora_weights={method!r} needs the weight of {name}, which has none of its own (tied to the "
                "embeddings); remove it from target_modules")
    return None


@contextlib.contextmanager
def eval_mode(chunks):
    """Calibrate without dropout; put each chunk's training flag back afterwards."""
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        yield
    finally:
        for c, mode in zip(chunks, modes):
            c.train(mode)
