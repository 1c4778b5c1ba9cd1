"""The table of an adapter's tensors on one layer, and the gated-``linear_fc1`` rule.

Every consumer that needs to know how an adapter tensor is sharded (gradient
tagging, ``sharded_state_dict``, adapter files, the merged export, init) reads
:meth:`LoraLayer.tensors <megalora.layers.base.LoraLayer.tensors>` or
:meth:`ModulesToSaveWrapper.tensors
<megalora.layers.modules_to_save.ModulesToSaveWrapper.tensors>`, so each rule is
written here or on the layer, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..sharding import ShardSpec, param_shard_spec


@dataclass(frozen=True)
class AdapterTensor:
    """One tensor an adapter owns on a layer.

    Attributes:
        role: ``"A"``, ``"B"``, ``"B_bias"``, ``"magnitude"`` (DoRA) or
            ``"saved"`` (a ``modules_to_save`` copy's parameter).
        param: The local parameter (this rank's shard).
        spec: How the full tensor is split across ``group``.
        group: The tensor-parallel group ``spec`` refers to.
        global_name: The layer's global module name (layout-independent).
        local_key: The key below the layer in its state dict
            (``lora_A.<adapter>.weight``).
        saved_key: The key below the layer in PEFT's adapter file
            (``lora_A.weight``, ``lora_magnitude_vector``).
    """

    role: str
    param: nn.Parameter
    spec: ShardSpec
    group: Any
    global_name: str
    local_key: str
    saved_key: str


def gated_chunks(module: nn.Module, global_name: str) -> int:
    """2 for a gated ``linear_fc1`` or a module inside one (its base layer, a saved copy), else 1.

    Rank ``k`` of a gated (SwiGLU) fc1 holds ``[gate_k; up_k]``, so its dim-0
    tensors are two blocks sharded separately (see
    :class:`~megalora.sharding.ShardSpec`). The one place this is decided.
    """
    config = getattr(module, "config", None)
    gated = bool(getattr(config, "gated_linear_unit", False))
    return 2 if gated and "linear_fc1" in global_name.split(".") else 1


def model_tensor_spec(module: nn.Module, global_name: str, tensor: torch.Tensor) -> ShardSpec:
    """How a model (non-LoRA) tensor is sharded: megatron-core's own TP attributes on it."""
    return param_shard_spec(tensor, gated_chunks(module, global_name))
