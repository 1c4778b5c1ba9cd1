"""LoRA variants: what an adapter adds on top of ``B @ A``, as small objects.

As PEFT's ``LoraVariant`` (``peft/tuners/lora/variants.py``): a
:class:`~megalora.layers.base.LoraLayer` keeps one variant per adapter and
calls it for the adapter's extra parameters, its forward contribution and its
merge / unmerge math. The layer itself has no ``if use_dora`` branch, so a new
variant (QALoRA, ...) is one more class here and one line in
:func:`resolve_variant`.

A variant works on the layer's *local* tensors; the weight math is
:mod:`megalora.lora_math`'s, the same functions the merged export runs on
full tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import lora_math
from .init import LoraMagnitude
from .tensors import AdapterTensor

if TYPE_CHECKING:
    from .base import LoraLayer


class LoraVariant(Protocol):
    """What a LoRA variant provides to the layer that composes it.

    Attributes:
        fusable: Whether the adapter's forward is plain ``s · B(A(x))``, so a
            layer may run it fused with the base GEMM.
    """

    fusable: bool

    def check(self, layer: "LoraLayer", adapter: str) -> None:
        """Raise if ``layer`` cannot carry this variant (before anything is created)."""

    def a_features(self, in_features: int) -> int:
        """The full input size of A, for a layer of ``in_features`` inputs."""

    def groups(self, layer: "LoraLayer") -> Optional[tuple[int, int]]:
        """QALoRA's ``(group_size, n_groups)`` for :func:`~megalora.lora_math.delta_weight`; ``None`` else."""

    def init(self, layer: "LoraLayer", adapter: str, like: dict) -> None:
        """Create the variant's own parameters once A and B exist (``like``: dtype/device)."""

    def tensors(self, layer: "LoraLayer", adapter: str) -> list[AdapterTensor]:
        """The variant's own entries of :meth:`LoraLayer.tensors`."""

    def merged_weight(
        self, layer: "LoraLayer", adapter: str, weight_oi: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(merged local weight, state unmerge needs)`` for ``[out, in]`` ``weight_oi``."""

    def unmerged_weight(
        self, layer: "LoraLayer", adapter: str, weight_oi: torch.Tensor, state: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The inverse of :meth:`merged_weight`."""

    def forward(
        self, layer: "LoraLayer", adapter: str, x: torch.Tensor, result: torch.Tensor,
        base_bias: Optional[torch.Tensor], inplace: bool,
    ) -> torch.Tensor:
        """``result`` plus the adapter's contribution, for ``x`` in the adapter's dtype."""


class PlainLora:
    """LoRA itself: ``W + s · B @ A``."""

    fusable = True

    def check(self, layer: "LoraLayer", adapter: str) -> None:
        return None

    def a_features(self, in_features: int) -> int:
        return in_features

    def groups(self, layer: "LoraLayer") -> Optional[tuple[int, int]]:
        return None

    def init(self, layer: "LoraLayer", adapter: str, like: dict) -> None:
        return None

    def tensors(self, layer: "LoraLayer", adapter: str) -> list[AdapterTensor]:
        return []

    def merged_weight(self, layer, adapter, weight_oi):
        return lora_math.merged_weight(weight_oi, layer._delta_oi(adapter))

    def unmerged_weight(self, layer, adapter, weight_oi, state):
        return lora_math.unmerged_weight(weight_oi, layer._delta_oi(adapter))

    def forward(self, layer, adapter, x, result, base_bias, inplace):
        with layer._dropout_context(adapter):
            xd = layer.lora_dropout[adapter](x)
        return layer._add_lora_out(result, adapter, xd, layer.scaling[adapter], inplace)


class Dora(PlainLora):
    """DoRA: ``m / ‖W + s · B @ A‖ · (W + s · B @ A)`` with a trained magnitude ``m`` per output row.

    The norm runs over the full input dimension; a layer whose input is
    sharded reduces it (:meth:`LoraLayer._reduce_row_norm_sq`). The magnitude
    is split like B's output rows (:meth:`LoraLayer.out_spec`).
    """

    fusable = False

    def check(self, layer: "LoraLayer", adapter: str) -> None:
        if not layer.reads_base_weight:
            raise NotImplementedError(
                f"use_dora=True is not supported on {type(layer.get_base_layer()).__name__}: its weight norm needs "
                "the base weight outside Transformer Engine's fused GEMM; set use_dora=False or use the local spec"
            )

    def init(self, layer: "LoraLayer", adapter: str, like: dict) -> None:
        with torch.no_grad():
            magnitude = layer._row_norm(layer._unmerged_weight_oi() + layer._delta_oi(adapter))
        layer.lora_magnitude_vector[adapter] = LoraMagnitude(magnitude.to(**like))

    def tensors(self, layer: "LoraLayer", adapter: str) -> list[AdapterTensor]:
        return [layer._tensor("magnitude", layer.lora_magnitude_vector[adapter].weight, layer.out_spec,
                              f"lora_magnitude_vector.{adapter}.weight", "lora_magnitude_vector")]

    def _magnitude(self, layer: "LoraLayer", adapter: str) -> torch.Tensor:
        return layer.lora_magnitude_vector[adapter].weight

    def merged_weight(self, layer, adapter, weight_oi):
        # DoRA's norm is defined on the base weight as forward sees it (no adapter merged).
        return lora_math.merged_weight(
            weight_oi, layer._delta_oi(adapter), self._magnitude(layer, adapter),
            pristine=layer._unmerged_weight_oi(), reduce=layer._reduce_row_norm_sq,
        )

    def unmerged_weight(self, layer, adapter, weight_oi, state):
        return lora_math.unmerged_weight(weight_oi, layer._delta_oi(adapter), self._magnitude(layer, adapter), state)

    def forward(self, layer, adapter, x, result, base_bias, inplace):
        dropout = layer.lora_dropout[adapter]
        if isinstance(dropout, nn.Identity) or not layer.training:
            base_result = result if base_bias is None else result - base_bias
            xd = x
        else:
            with layer._dropout_context(adapter):
                xd = dropout(x)
            base_result = F.linear(xd, layer.base_weight_oi().to(xd.dtype))
        return result + self._output(layer, adapter, xd, base_result, layer.scaling[adapter])

    def _output(self, layer, adapter: str, x: torch.Tensor, base_result: torch.Tensor, scaling: float):
        """DoRA's addition to the output: ``(m/‖W+sBA‖ − 1)·base + (m/‖W+sBA‖)·s·BAx``.

        The norm is detached (DoRA paper, section 4.3), as PEFT does.
        """
        with torch.no_grad():
            lora_w = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight
            norm = layer._row_norm(layer.base_weight_oi().to(x.dtype) + scaling * lora_w.to(x.dtype))
        magnitude = layer._factor_weight(layer.lora_magnitude_vector[adapter], layer.out_spec)
        mag_norm_scale = (magnitude / norm).view(1, -1) if x.dim() > 1 else magnitude / norm
        lora_result = layer._lora_out(adapter, x)
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


class QaLora(PlainLora):
    """QALoRA: A reads the mean of each group of ``group_size`` contiguous inputs, times the group count.

    PEFT's ``QALoraLinearVariant`` (``x_pooled * pooled_features``, A
    ``[r, in / group_size]``), on every layer type that runs its adapters
    through :meth:`LoraLayer._apply_adapters`. The group count is the *full*
    layer's; a row-parallel layer sees whole groups only (checked), and its A
    is split along the pooled dimension like the input. Unlike PEFT, merge and
    unmerge work: ΔW is constant within each input group
    (:func:`~megalora.lora_math.delta_weight` with ``groups``).
    """

    fusable = False

    def __init__(self, group_size: int):
        self.group_size = int(group_size)

    def a_features(self, in_features: int) -> int:
        return in_features // self.group_size

    def groups(self, layer: "LoraLayer") -> tuple[int, int]:
        return self.group_size, layer.in_features // self.group_size

    def check(self, layer: "LoraLayer", adapter: str) -> None:
        name = layer.global_name or type(layer.get_base_layer()).__name__
        if not layer.runs_variants:
            raise NotImplementedError(
                f"use_qalora=True is not supported on {name} ({type(layer.get_base_layer()).__name__}): its LoRA "
                "path runs outside megalora's variant forward; set use_qalora=False or use the local spec")
        g, in_full = self.group_size, layer.in_features
        if in_full % g:
            raise ValueError(
                f"qalora_group_size={g} does not divide in_features={in_full} of {name}; pick a divisor of "
                f"{in_full} or leave {name} out of target_modules")
        in_local = layer.local_in_features
        if in_local % g:
            tp = in_full // in_local
            fits = [t for t in range(1, in_full // g + 1) if in_full % (t * g) == 0]
            raise ValueError(
                f"qalora_group_size={g} does not divide {name}'s input shard in_features/TP = {in_full}/{tp} = "
                f"{in_local}: groups would straddle TP shards; use a TP size in {fits} or a qalora_group_size "
                f"dividing {in_local}")

    def forward(self, layer, adapter, x, result, base_bias, inplace):
        with layer._dropout_context(adapter):
            xd = layer.lora_dropout[adapter](x)
        pooled = lora_math.pool_groups(xd, *self.groups(layer))
        return layer._add_lora_out(result, adapter, pooled, layer.scaling[adapter], inplace)


PLAIN = PlainLora()
DORA = Dora()


def resolve_variant(config) -> LoraVariant:
    """The variant a :class:`~megalora.config.LoraConfig` asks for (PEFT's ``resolve_lora_variant``)."""
    if config.use_qalora:
        # PEFT's config accepts these pairs (so files round-trip) but its QALoRA
        # forward has no DoRA and drops lora_bias: refused here, never ignored.
        for other in ("use_dora", "lora_bias"):
            if getattr(config, other):
                raise ValueError(f"use_qalora=True cannot be combined with {other}=True; set one of them to False")
        return QaLora(config.qalora_group_size)
    return DORA if config.use_dora else PLAIN
