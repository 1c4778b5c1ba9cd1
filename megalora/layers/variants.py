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


class Dora:
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


PLAIN = PlainLora()
DORA = Dora()


def resolve_variant(config) -> LoraVariant:
    """The variant a :class:`~megalora.config.LoraConfig` asks for (PEFT's ``resolve_lora_variant``)."""
    return DORA if config.use_dora else PLAIN
