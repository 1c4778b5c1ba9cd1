"""What each rank exports: its tensors as entries whose full value is made on demand, adapters merged.

The first half of :mod:`megalora.export`'s stream. An entry knows its global
name, full shape and dtype up front (so the files can be planned before any
tensor is gathered); ``make()`` is collective over the tensor's TP group and
returns the full tensor on the group's rank 0 only. LoRA layers' weights are
merged by :mod:`megalora.lora_math` on full tensors, reading each adapter's
tensors from the layer's table (``LoraLayer.tensors``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from . import lora_math
from .collectives import group_size
from .experts import expert_module_test, is_first_expert_replica
from .layers import LoraLayer, gated_chunks
from .layers.modules_to_save import ModulesToSaveWrapper
from .layers.trainable_tokens import TrainableTokensLayer, merged_table
from .parallel_groups import is_first_replica, model_tp_group
from .sharding import ShardSpec, gather_full, param_shard_spec
from .targeting import global_module_names


@dataclass
class Entry:
    """One exported tensor as this rank sees it; ``make`` is collective over its TP group."""

    key: str
    shape: tuple
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    expert: bool = False


def natural_key(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _full_shape(local: torch.Tensor, spec: ShardSpec, group) -> tuple:
    return spec.full_shape(local.shape, group_size(group))


# ---------------------------------------------------------------------- full tensors, merged
#
# Collective over a layer's TP group; only its rank 0 (the stage writer) gets
# full tensors and runs lora_math on them, the others take part in the
# gathers and get ``None``.


def _gather(layer: LoraLayer, tensor: torch.Tensor, spec: ShardSpec) -> Optional[torch.Tensor]:
    return gather_full(tensor.detach(), spec, layer.tp_group, dst=0)


def _gather_adapter(layer: LoraLayer, adapter: str, norms: bool = False) -> Optional[dict]:
    """Full A, B (and DoRA magnitude / merged norm) of one adapter on the TP group's rank 0, from its table."""
    table = {e.role: e for e in layer.tensors(adapter)}
    out = {"a": _gather(layer, table["A"].param, table["A"].spec),
           "b": _gather(layer, table["B"].param, table["B"].spec),
           "scale": layer.scaling[adapter], "magnitude": None, "norm": None,
           "groups": layer.lora_variant[adapter].groups(layer)}
    if "magnitude" in table:
        out["magnitude"] = _gather(layer, table["magnitude"].param, table["magnitude"].spec)
        if norms:
            out["norm"] = _gather(layer, layer._merged_norms[adapter], table["magnitude"].spec)
    return out if out["a"] is not None else None


def _delta(f: dict) -> torch.Tensor:
    return lora_math.delta_weight(f["a"], f["b"], f["scale"], f["groups"])


def _merged_weight(layer: LoraLayer, adapters: list[str], spec: ShardSpec) -> Optional[torch.Tensor]:
    """The full merged weight in the base layer's layout (``None`` off the TP group's rank 0).

    One ΔW at a time, built into its own buffer: the extra memory is about
    one full weight (DoRA's norm needs two more, briefly).
    """
    # Gathered in the base layer's own layout (``spec`` is its), then viewed as
    # [out, in]: an embedding's table is [vocab, dim], split on the vocabulary.
    weight = _gather(layer, layer.get_base_layer().weight, spec)
    weight = None if weight is None else layer._to_base_layout(weight)
    factors = [_gather_adapter(layer, a) for a in adapters]
    needs_pristine = layer.merged_adapters and any(not layer.lora_variant[a].fusable for a in adapters)
    merged = [_gather_adapter(layer, a, norms=True) for a in layer.merged_adapters] if needs_pristine else []
    if weight is None:
        return None
    pristine = weight  # DoRA's norm is defined on the weight with no adapter merged
    for f in reversed(merged):
        pristine = lora_math.unmerged_weight(pristine, _delta(f), f["magnitude"], f["norm"])
    for f in factors:
        weight, _ = lora_math.merged_weight(weight, _delta(f), f["magnitude"], pristine, inplace=True)
    return layer._to_base_layout(weight)


def _merged_bias(layer: LoraLayer, adapters: list[str], spec: ShardSpec) -> Optional[torch.Tensor]:
    bias = _gather(layer, layer.get_base_layer().bias, spec)
    extra = [(a, _gather(layer, e.param, e.spec)) for a in adapters for e in layer.tensors(a) if e.role == "B_bias"]
    if bias is None:
        return None
    for adapter, lora_bias in extra:
        bias = lora_math.merged_bias(bias, lora_bias, layer.scaling[adapter])
    return bias


# ---------------------------------------------------------------------- what this rank exports


def _is_tied_copy(param: torch.Tensor) -> bool:
    """The last stage's copy of embeddings tied to the output layer: exported once, by the first stage."""
    return bool(getattr(param, "shared", False) and getattr(param, "shared_embedding", False))


def _param_entries(params, prefix: str, chunks: int, group, dtype) -> list[Entry]:
    """Entries for ``(name, param)`` pairs that are exported as they are, gathered across TP."""
    out = []
    for pname, param in params:
        if _is_tied_copy(param):
            continue
        spec = param_shard_spec(param, chunks)
        out.append(Entry(f"{prefix}{pname}", _full_shape(param, spec, group), dtype or param.dtype,
                          lambda p=param, s=spec: gather_full(p.detach(), s, group, dst=0)))
    return out


def _lora_entries(layer: LoraLayer, prefix: str, adapters, dtype, problems: list) -> list[Entry]:
    base = layer.get_base_layer()
    todo = [a for a in adapters if a in layer.lora_A and a not in layer.merged_adapters]
    chunks = layer.out_chunks
    out = []
    for pname, param in base.named_parameters(recurse=False):
        spec = param_shard_spec(param, chunks)
        key = f"{prefix}{pname}"
        if _is_tied_copy(param):
            if todo and pname == "weight":
                problems.append(f"{key} is tied to the word embeddings; merging {todo} into it would change "
                                "them too: untie the output layer or leave it out of target_modules")
            continue
        if pname == "weight":
            shape = _full_shape(param, spec, layer.tp_group)
            make = lambda s=spec: _merged_weight(layer, todo, s)  # noqa: E731
        elif pname == "bias" and any(layer.lora_bias.get(a) for a in todo):
            shape = _full_shape(param, spec, layer.tp_group)
            make = lambda s=spec: _merged_bias(layer, todo, s)  # noqa: E731
        else:
            out.extend(_param_entries([(pname, param)], prefix, chunks, layer.tp_group, dtype))
            continue
        out.append(Entry(key, shape, dtype or param.dtype, make))
    if any(layer.lora_bias.get(a) for a in todo) and getattr(base, "bias", None) is None:
        problems.append(f"{prefix}: adapters {todo} have lora_bias but the base layer has no bias to merge it into")
    if todo and getattr(layer, "tied_output", False):
        problems.append(f"{prefix}weight: the output layer is tied to these embeddings, so merging {todo} into "
                        "them would change the output layer too: export the adapter unmerged, or untie them")
    if todo and getattr(base, "weight", None) is None:
        problems.append(f"{prefix}weight is tied to the word embeddings (the layer has no weight of its own); "
                        f"adapters {todo} cannot be merged into it: leave it out of target_modules")
    return out


def _token_entries(layer: TrainableTokensLayer, prefix: str, adapters, dtype, problems: list) -> list[Entry]:
    """The table with the token rows written in (a tied output layer's rows live in the embedding's table)."""
    base = layer.get_base_layer()
    todo = [a for a in adapters if a in layer.trainable_tokens_delta and a not in layer.merged_adapters]
    weight = getattr(base, "weight", None)
    others = [(n, p) for n, p in base.named_parameters(recurse=False) if n != "weight"]
    out = _param_entries(others, prefix, 1, layer.tp_group, dtype)
    if todo and layer.tied_to is None and weight is None:
        problems.append(f"{prefix}: trainable tokens {todo} of an output layer tied to the embeddings cannot be "
                        "merged (they would change the embeddings too): give it the embedding's ids")
    if weight is None or _is_tied_copy(weight):
        return out
    if not todo or layer.tied_to is not None:
        return out + _param_entries([("weight", weight)], prefix, 1, layer.tp_group, dtype)
    shape = _full_shape(weight, param_shard_spec(weight), layer.tp_group)
    return out + [Entry(f"{prefix}weight", shape, dtype or weight.dtype, lambda: merged_table(layer, todo))]


def local_entries(model: nn.Module, adapters: list[str], dtype, problems: list) -> list[Entry]:
    """This rank's exported tensors, sorted naturally by name.

    Dense tensors on the first data-parallel replica, routed experts' on the
    first expert-data-parallel replica (each gathered over its own TP group).
    """
    names = global_module_names(model)
    dense_group = model_tp_group()
    in_experts = expert_module_test(model)
    take_dense, take_experts = is_first_replica(), is_first_expert_replica()
    entries, skip = [], []
    for local_name, module in model.named_modules():
        if any(local_name.startswith(p) for p in skip):
            continue
        expert = in_experts(local_name)
        if not (take_experts if expert else take_dense):
            continue
        tp_group = (getattr(module, "tp_group", None) or dense_group) if expert else dense_group
        start = len(entries)
        _module_entries(module, local_name, names, adapters, dtype, problems, tp_group, skip, entries)
        for entry in entries[start:]:
            entry.expert = expert
    return sorted(entries, key=lambda e: natural_key(e.key))


def _module_entries(module, local_name, names, adapters, dtype, problems, tp_group, skip, entries) -> None:
    """Appends the entries of one module's own tensors (a LoRA layer's or a saved copy's: all of them)."""
    gname = names[local_name]
    prefix = f"{gname}." if gname else ""
    skip.extend(f"{local_name}.{child}" for child in getattr(module, "export_skips", ()))  # grouped experts
    if isinstance(module, LoraLayer):
        skip.append(f"{local_name}.")
        entries.extend(_lora_entries(module, prefix, adapters, dtype, problems))
        return
    if isinstance(module, TrainableTokensLayer):
        skip.append(f"{local_name}.")
        entries.extend(_token_entries(module, prefix, adapters, dtype, problems))
        return
    if isinstance(module, ModulesToSaveWrapper):
        skip.append(f"{local_name}.")
        chosen = next((a for a in adapters if a in module.modules_to_save), None)
        module = module.modules_to_save[chosen] if chosen else module.original_module
        for sub_name, sub in module.named_modules():
            sub_prefix = f"{prefix}{sub_name}." if sub_name else prefix
            params = sub.named_parameters(recurse=False)
            chunks = gated_chunks(sub, sub_prefix[:-1])
            entries.extend(_param_entries(params, sub_prefix, chunks, tp_group, dtype))
        return
    params = module.named_parameters(recurse=False)
    entries.extend(_param_entries(params, prefix, gated_chunks(module, gname), tp_group, dtype))
