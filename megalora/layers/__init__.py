"""LoRA layers: one base class and the layer types that declare their sharding.

:func:`create_lora_layer` picks the layer type for a base module from an
ordered list that :func:`register_lora_layer` extends
(:mod:`megalora.layers.dispatch`); what an adapter adds beyond ``B @ A``
(DoRA, QALoRA) is a variant object (:mod:`megalora.layers.variants`).
Embeddings have their own layers (:mod:`megalora.layers.embedding`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

from ..config import check_megatron_core
from .base import LoraLayer
from .dispatch import LayerContext, create_lora_layer, is_supported_linear, register_lora_layer
from .init import LoraFactor, LoraMagnitude
from .plain import LoraLinear
from .tensors import AdapterTensor, gated_chunks
from .variants import LoraVariant, resolve_variant

__all__ = [
    "LoraLayer",
    "LoraLinear",
    "LoraFactor",
    "LoraMagnitude",
    "create_lora_layer",
    "register_lora_layer",
    "LayerContext",
    "AdapterTensor",
    "gated_chunks",
    "LoraVariant",
    "resolve_variant",
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
