"""LoRA's weight math, once, as pure functions on tensors.

Every place that needs ΔW or a merged weight calls these: a LoRA layer on its
local shards, the merged export on gathered full tensors, ``add_weighted_adapter``
and the HF bridge. Because the export runs the same functions on the full
tensors at every layout, its output is byte-identical at every TP/PP layout.

All weights are in ``[out, in]`` layout (``fan_in_fan_out`` bases are
transposed by :func:`to_out_in` / :func:`from_out_in`). A gated ``linear_fc1``
is an ordinary ``[2·ffn, in]`` weight here; only its *sharding* differs, and
that lives in the shard specs.

DoRA's row norm runs over the whole input dimension. On a row-parallel shard
that dimension is split, so the norm functions take a ``reduce`` callable
that sums the per-row squares over the TP group (identity elsewhere).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scale: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def alpha_for_scaling(scale: float, r: int, use_rslora: bool) -> float:
    """The ``lora_alpha`` that gives ``scale`` at rank ``r`` (the inverse of :func:`scaling`)."""
    return scale * (math.sqrt(r) if use_rslora else r)


def to_out_in(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """A base weight in ``[out, in]`` layout (transformers' Conv1D stores ``[in, out]``)."""
    return weight.T if fan_in_fan_out else weight


def from_out_in(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """Back to the base layer's own layout."""
    return weight.T if fan_in_fan_out else weight


def delta_weight(
    a: torch.Tensor, b: torch.Tensor, scale: float, groups: Optional[tuple[int, int]] = None
) -> torch.Tensor:
    """A fresh ``scale · B @ A`` (``[out, in]``).

    CPU half-precision matmuls are slow and lossy, so they run in fp32 and the
    result is cast back. The scale multiplies the product (PEFT's order), so
    results match PEFT's bit for bit.

    Args:
        groups: QALoRA's ``(group_size, n_groups)``, with ``n_groups`` the
            *full* layer's ``in_features / group_size``. QALoRA feeds A the
            mean of each group of ``group_size`` contiguous input features
            times ``n_groups``, so ΔW is ``B @ A`` with every column repeated
            ``group_size`` times and scaled by ``n_groups / group_size``:
            constant within each input group, hence mergeable exactly (a
            group-wise quantized base stays group-wise structured).
    """
    if b.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16):
        delta = (b.float() @ a.float()).mul_(scale)
        return delta.to(b.dtype) if groups is None else expand_groups(delta, groups).to(b.dtype)
    delta = (b @ a).mul_(scale)
    return delta if groups is None else expand_groups(delta, groups)


def expand_groups(delta: torch.Tensor, groups: tuple[int, int]) -> torch.Tensor:
    """QALoRA's ``[out, in / g]`` pooled ΔW as the ``[out, in]`` weight it equals (see :func:`delta_weight`)."""
    group_size, n_groups = groups
    return delta.repeat_interleave(group_size, dim=1).mul_(n_groups / group_size)


def pool_groups(x: torch.Tensor, group_size: int, n_groups: int) -> torch.Tensor:
    """QALoRA's input: the mean of each ``group_size`` contiguous features, times ``n_groups``.

    ``n_groups`` is the full layer's group count, also on a row-parallel
    shard that sees only some groups (PEFT's ``x_pooled * pooled_features``).
    """
    shape = x.shape
    pooled = x.reshape(-1, shape[-1] // group_size, group_size).mean(dim=2) * n_groups
    return pooled.view(*shape[:-1], pooled.shape[-1])


def row_norm(weight: torch.Tensor, reduce: Reduce = _identity, inplace: bool = False) -> torch.Tensor:
    """Per-output-row L2 norm over the full input dimension, in fp32, cast back to ``weight``'s dtype.

    ``inplace`` squares in ``weight``'s own buffer (for a temporary the caller
    drops), sparing a weight-sized allocation; the bits are the same.
    """
    square = weight.float()
    square = square.pow_(2) if inplace or square is not weight else square.pow(2)
    return reduce(square.sum(dim=1)).sqrt().to(weight.dtype)


def dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """DoRA's per-row factor ``m / ‖W + ΔW‖`` as a ``[out, 1]`` column."""
    return (magnitude / norm).view(-1, 1)


def merged_weight(
    weight: torch.Tensor,
    delta: torch.Tensor,
    magnitude: Optional[torch.Tensor] = None,
    pristine: Optional[torch.Tensor] = None,
    reduce: Reduce = _identity,
    inplace: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``W + ΔW``, or DoRA's ``m / ‖W₀ + ΔW‖ · (W + ΔW)``; returns ``(merged, dora_norm)``.

    Args:
        weight: The current base weight ``[out, in]`` (other adapters may be merged into it).
        delta: This adapter's :func:`delta_weight`, any dtype (cast to ``weight``'s).
        magnitude: DoRA's magnitude vector, or ``None`` for plain LoRA.
        pristine: The base weight with no adapter merged (DoRA's norm is defined
            on it); defaults to ``weight``.
        reduce: Sums per-row squares over a sharded input dimension.
        inplace: Build the result in ``delta``'s buffer (when it already has
            ``weight``'s dtype), sparing a weight-sized allocation; the bits
            are the same, since IEEE ``+`` and ``*`` commute.

    Returns:
        The merged weight (a new tensor) and, for DoRA, the norm that
        :func:`unmerged_weight` needs to take it out again.
    """
    delta = delta.to(weight.dtype)
    if magnitude is None:
        return (delta.add_(weight) if inplace else weight + delta), None
    norm = row_norm((weight if pristine is None else pristine) + delta, reduce, inplace=True).detach()
    scale = dora_scale(magnitude, norm).to(weight.dtype)
    return (delta.add_(weight).mul_(scale) if inplace else scale * (weight + delta)), norm


def unmerged_weight(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: Optional[torch.Tensor] = None,
    norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The inverse of :func:`merged_weight` (``norm`` is the one it returned, for DoRA)."""
    delta = delta.to(weight.dtype)
    if magnitude is None:
        return weight - delta
    return weight / dora_scale(magnitude, norm) - delta


def merged_bias(bias: torch.Tensor, lora_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """A base bias with an adapter's ``lora_bias`` merged in."""
    return bias + lora_bias * scale
