"""Which tensors make up an adapter on disk, under which PEFT key, sharded how.

LoRA tensors and ``modules_to_save`` copies come from their module's table
(:meth:`LoraLayer.tensors <megalora.layers.base.LoraLayer.tensors>`,
:meth:`ModulesToSaveWrapper.tensors
<megalora.layers.modules_to_save.ModulesToSaveWrapper.tensors>`); the model
biases that ``bias="all"`` / ``"lora_only"`` save are split by megatron-core's
own TP attributes (:func:`~megalora.layers.tensors.model_tensor_spec`). Keys are
PEFT's, on global module names.
"""

from __future__ import annotations

from typing import Optional

import torch

from .parallel_groups import model_tp_group
from .layers import LoraLayer
from .layers.tensors import model_tensor_spec
from .targeting import global_module_names

PREFIX = "base_model.model."


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
        yield PREFIX + _strip_adapter_name(key, adapter), bias, model_tensor_spec(module, name, bias), group


def _adapter_entries(peft_model, adapter: str):
    """Yield ``(PEFT key, local tensor, spec, TP group)`` for this rank's tensors of ``adapter``.

    The order is the module order, the same on every rank of a TP group. Each
    key appears once (``bias="all"`` also lists the LoRA biases).
    """
    from .layers.modules_to_save import ModulesToSaveWrapper
    from .layers.trainable_tokens import TrainableTokensLayer

    model = peft_model.base_model.model
    names = global_module_names(model)
    seen = set()
    for module in model.modules():
        owned = (isinstance(module, LoraLayer) and adapter in module.lora_A) or (
            isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save) or (
            isinstance(module, TrainableTokensLayer))
        for entry in module.tensors(adapter) if owned else ():
            key = f"{PREFIX}{entry.global_name}.{entry.saved_key}"
            seen.add(key)
            yield key, entry.param, entry.spec, entry.group
    for key, tensor, spec, group in _bias_entries(peft_model, adapter, names):
        if key not in seen:
            seen.add(key)
            yield key, tensor, spec, group
