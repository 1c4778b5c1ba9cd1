"""LoRA layers: one base class and the variants that declare their sharding.

:func:`create_lora_layer` picks the variant for a base module.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

from torch import nn

from ..config import check_megatron_core
from .base import LoraFactor, LoraLayer, LoraMagnitude
from .plain import LoraLinear, is_conv1d

__all__ = [
    "LoraLayer",
    "LoraLinear",
    "LoraFactor",
    "LoraMagnitude",
    "create_lora_layer",
    "megatron_core_module",
    "is_supported_linear",
]


def megatron_core_module(name: Optional[str]):
    """The megatron-core module a config names, or ``None`` if it is not installed.

    The name is checked against the ``megatron.`` allowlist before anything is
    imported, because an adapter config read from disk could otherwise import
    any module.
    """
    if not name:
        return None
    check_megatron_core(name)
    if "megatron" not in sys.modules:
        # No megatron-core layer can exist before megatron is imported; skip
        # the (slow) import for plain models.
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _parallel_classes(mcore) -> tuple[tuple, tuple]:
    if mcore is None:
        return (), ()
    tp = mcore.tensor_parallel
    return (tp.ColumnParallelLinear,), (tp.RowParallelLinear,)


def _te_classes(mcore) -> tuple[tuple, tuple, tuple]:
    if mcore is None:
        return (), (), ()
    from .te import te_layer_classes

    return te_layer_classes()


def is_supported_linear(module: nn.Module, mcore=None) -> bool:
    """Whether megalora can put LoRA on ``module``."""
    column, row = _parallel_classes(mcore)
    te = sum(_te_classes(mcore), ())
    return isinstance(module, (nn.Linear, *column, *row, *te)) or is_conv1d(module)


def _is_gated_fc1(module: nn.Module, name: str) -> bool:
    config = getattr(module, "config", None)
    return name.split(".")[-1] == "linear_fc1" and bool(getattr(config, "gated_linear_unit", False))


def create_lora_layer(target: nn.Module, name: str, fan_in_fan_out: bool = False, mcore=None) -> LoraLayer:
    """Wrap ``target`` in the LoRA layer that matches its type.

    Args:
        target: The base module.
        name: Its (global) module name, used to recognise a gated ``linear_fc1``.
        fan_in_fan_out: The config's flag, for plain layers.
        mcore: The megatron-core module from :func:`megatron_core_module`.

    Raises:
        TypeError: If the module type is not supported.
    """
    te_column, te_row, te_norm_column = _te_classes(mcore)
    chunks = 2 if _is_gated_fc1(target, name) else 1
    if te_norm_column and isinstance(target, te_norm_column):
        from .te import LoraColumnCallingBase, layernorm_of

        return LoraColumnCallingBase(target, out_chunks=chunks, input_norm=layernorm_of(target))
    if te_column and isinstance(target, te_column):
        from .te import LoraColumnCallingBase

        return LoraColumnCallingBase(target, out_chunks=chunks)
    if te_row and isinstance(target, te_row):
        from .te import LoraRowCallingBase

        return LoraRowCallingBase(target)
    column, row = _parallel_classes(mcore)
    if column and isinstance(target, column):
        from .parallel import LoraColumnParallelLinear

        return LoraColumnParallelLinear(target, out_chunks=chunks)
    if row and isinstance(target, row):
        from .parallel import LoraRowParallelLinear

        return LoraRowParallelLinear(target)
    if isinstance(target, nn.Linear) or is_conv1d(target):
        return LoraLinear(target, fan_in_fan_out=fan_in_fan_out)
    raise TypeError(
        f"Target module {name} ({type(target).__name__}) is not supported. megalora supports torch.nn.Linear, "
        "transformers' Conv1D, megatron-core's ColumnParallelLinear / RowParallelLinear and their Transformer "
        "Engine counterparts; "
        "adjust target_modules to select only those."
    )
