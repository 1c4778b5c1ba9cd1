"""Which tensors make up an adapter on disk, under which PEFT key, sharded how.

One place for the rule: LoRA factors by their layer's
:class:`~megalora.sharding.ShardSpec`, ``modules_to_save`` copies and the
model biases that ``bias="all"`` / ``"lora_only"`` save by megatron-core's own
TP attributes (:func:`~megalora.sharding.param_shard_spec`). Keys are PEFT's,
on global module names.
"""

from __future__ import annotations

from typing import Optional

import torch

from .parallel_groups import model_tp_group
from .sharding import FULL, ShardSpec, param_shard_spec
from .layers import LoraLayer
from .targeting import global_module_names

PREFIX = "base_model.model."


def _fc1_chunks(module, global_name: str) -> int:
    """2 for a gated ``linear_fc1`` (or a module inside it: its base layer, a saved copy), else 1.

    Rank ``k`` of a gated fc1 holds ``[gate_k; up_k]``, so its dim-0 tensors are
    two blocks sharded separately (see :class:`~megalora.sharding.ShardSpec`).
    """
    config = getattr(module, "config", None)
    return 2 if "linear_fc1" in global_name.split(".") and bool(getattr(config, "gated_linear_unit", False)) else 1


def _base_tensor_spec(module, global_name: str, tensor: torch.Tensor) -> ShardSpec:
    """How a model (non-LoRA) tensor is sharded: megatron-core's own TP attributes on it."""
    return param_shard_spec(tensor, _fc1_chunks(module, global_name))


def _saved_module_entries(wrapper, adapter: str, global_name: str) -> list[tuple[str, torch.Tensor, ShardSpec]]:
    """``(saved suffix, local tensor, spec)`` for a ``modules_to_save`` copy's parameters."""
    copy = wrapper.modules_to_save[adapter]
    return [(pname, p, _base_tensor_spec(copy, global_name, p)) for pname, p in copy.named_parameters()]


def _layer_entries(layer: LoraLayer, adapter: str) -> list[tuple[str, torch.Tensor, ShardSpec]]:
    """``(saved suffix, local tensor, spec)`` for each of one adapter's tensors on a layer."""
    out = [
        ("lora_A.weight", layer.lora_A[adapter].weight, layer.a_spec),
        ("lora_B.weight", layer.lora_B[adapter].weight, layer.b_spec),
    ]
    bias = layer.lora_B[adapter].bias
    if bias is not None:
        out.append(("lora_B.bias", bias, layer.b_spec if layer.b_spec.dim == 0 else FULL))
    if adapter in layer.lora_magnitude_vector:
        out.append(("lora_magnitude_vector", layer.lora_magnitude_vector[adapter].weight, layer.magnitude_spec))
    return out


def _own_bias(module) -> Optional[torch.Tensor]:
    """The tensor a state dict lists as ``<module>.bias``: a parameter or a persistent buffer."""
    bias = module._parameters.get("bias")
    if bias is None and "bias" not in module._non_persistent_buffers_set:
        bias = module._buffers.get("bias")
    return bias


def _strip_adapter_name(key: str, adapter: str) -> str:
    """PEFT's ``_remove_adapter_name_from_state_dict_key``: ``x.lora_B.<adapter>.bias`` -> ``x.lora_B.bias``."""
    if key.endswith(f".{adapter}"):
        return key[: -len(adapter) - 1]
    head, _, leaf = key.rpartition(".")
    return f"{head[: -len(adapter) - 1] if head.endswith(f'.{adapter}') else head}.{leaf}"


def _bias_entries(peft_model, adapter: str, names: dict):
    """Yield ``(PEFT key, local tensor, spec, TP group)`` for the model biases ``bias`` saves with an adapter.

    PEFT 0.21's rule (``BaseTuner._get_learnable_bias_state_dict``), on global
    names: ``"all"`` saves every state-dict entry named ``*.bias`` (LoRA
    factors' and ``modules_to_save`` copies' included) except other adapters',
    with the adapter name removed; ``"lora_only"`` saves ``<layer>.base_layer.bias``
    of each LoRA layer. Full tensors: a base bias is gathered by its megatron-core
    TP attributes.
    """
    mode = peft_model.peft_config[adapter].bias
    if mode == "none":
        return
    others = [a for a in peft_model.peft_config if a != adapter]
    model = peft_model.base_model.model
    for local_name, module in model.named_modules():
        if mode == "lora_only":
            if not isinstance(module, LoraLayer):
                continue
            module, name = module.base_layer, f"{names[local_name]}.base_layer"
        else:
            name = names[local_name]
        bias = _own_bias(module)
        key = f"{name}.bias" if name else "bias"
        if bias is None or any(f".{a}." in f".{key}" or key.endswith(f".{a}") for a in others):
            continue
        group = getattr(module, "tp_group", None)
        group = model_tp_group() if group is None else group
        yield PREFIX + _strip_adapter_name(key, adapter), bias, _base_tensor_spec(module, name, bias), group


def _adapter_entries(peft_model, adapter: str):
    """Yield ``(PEFT key, local tensor, spec, TP group)`` for this rank's tensors of ``adapter``.

    The order is the module order, the same on every rank of a TP group. Each
    key appears once (``bias="all"`` also lists the LoRA biases).
    """
    from .layers.modules_to_save import ModulesToSaveWrapper

    model = peft_model.base_model.model
    names = global_module_names(model)
    seen = set()
    for local_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            for suffix, tensor, spec in _layer_entries(module, adapter):
                seen.add(f"{PREFIX}{names[local_name]}.{suffix}")
                yield f"{PREFIX}{names[local_name]}.{suffix}", tensor, spec, module.tp_group
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            for suffix, tensor, spec in _saved_module_entries(module, adapter, names[local_name]):
                seen.add(f"{PREFIX}{names[local_name]}.{suffix}")
                yield f"{PREFIX}{names[local_name]}.{suffix}", tensor, spec, model_tp_group()
    for key, tensor, spec, group in _bias_entries(peft_model, adapter, names):
        if key not in seen:
            seen.add(key)
            yield key, tensor, spec, group
