"""LoRA on single-device layers: ``nn.Linear`` and transformers' ``Conv1D``."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .base import LoraLayer


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight stored ``[in, out]``), matched by name.

    Matching by class name keeps transformers an optional dependency.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class LoraLinear(LoraLayer):
    """LoRA around an ``nn.Linear`` or a ``Conv1D``.

    The base layer runs as is; the adapters' output is added to its result.
    ``fan_in_fan_out`` means the base weight is stored ``[in, out]``.
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False, *, global_name: str = ""):
        super().__init__(base_layer, global_name=global_name)
        if is_conv1d(base_layer) and not fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting it to True.")
            fan_in_fan_out = True
        elif isinstance(base_layer, nn.Linear) and fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting it to False."
            )
            fan_in_fan_out = False
        self.fan_in_fan_out = fan_in_fan_out

    def _full_features(self) -> tuple[int, int]:
        weight = self.get_base_layer().weight
        out_f, in_f = weight.shape
        return (out_f, in_f) if self.fan_in_fan_out else (in_f, out_f)

    def base_weight_oi(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def _to_base_layout(self, weight_oi: torch.Tensor) -> torch.Tensor:
        return weight_oi.T if self.fan_in_fan_out else weight_oi

    def _set_base_weight_oi(self, weight: torch.Tensor) -> None:
        base = self.get_base_layer()
        base.weight.data = self._to_base_layout(weight).to(base.weight.dtype).contiguous()

    def _forward_active(self, x: torch.Tensor, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        return self._apply_adapters(x, result, getattr(self.get_base_layer(), "bias", None))
