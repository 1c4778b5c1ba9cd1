"""Merged export: the full model with adapters merged, streamed to safetensors files.

:func:`stream_merged` hands every weight of the model, with the chosen
adapters merged in, as a full (unsharded) tensor keyed by its megatron-core
*global* name (``decoder.layers.<global index>.mlp.linear_fc1.weight``) to a
name mapping (:class:`MegatronNames` here; HF names in
:mod:`megalora.hf.export`) and on to a sink on global rank 0, one tensor at a
time. :func:`export_merged` writes them as transformers' ``save_pretrained``
does (:mod:`megalora.shard_files`); ``megalora.hf.save_hf_pretrained``,
``megalora merge`` and ``megalora export --format hf`` are the same stream.

How it streams, so that the extra memory is about one full layer weight
(measured on a GPT whose largest weight is 16.8 MB, RSS with glibc's dynamic
mmap threshold off: 16.8 MB extra at TP=1 for LoRA, 33.6 MB for DoRA, whose
norm needs one temporary more; at TP=2 the writing rank also holds the
gathered weight, 33.9 / 50.7 MB, and the other rank 0.04 MB):

1. Every rank lists its tensors (name, full shape, dtype); global rank 0
   collects the lists, sorts the names naturally (a layout-independent order),
   maps them to output names and plans the files. Each file's safetensors
   header is known up front, so it is written first and the tensors' bytes
   follow one by one.
2. Each tensor is made full where it lives: the TP group of its pipeline
   stage gathers the base shards and the (small) LoRA factors to the group's
   rank 0, and :mod:`megalora.lora_math` merges the full tensors, exactly as
   at TP=1. That is what makes an export from TP=3 byte-identical to one from
   TP=1 (a merge of the local shards followed by a gather would round DoRA's
   row norms differently). Gated ``linear_fc1`` shards are put back in the
   canonical ``[gate; up]`` order through ``ShardSpec(chunks=2)``.
3. The stage's TP rank 0 sends it to global rank 0, which maps, writes and
   drops it. Only the first data-parallel replica takes part. Routed experts
   live on the expert-parallel ranks: their tensors are gathered over the
   expert-TP group by the first expert-data-parallel replica and sent by its
   expert-TP rank 0 (:func:`megalora.experts.is_expert_writer`).

The model itself is not changed: nothing is merged in place. Layers whose
adapters are already merged (``merge_adapter``) are exported as they are. The
last pipeline stage's copy of embeddings tied to the output layer is never
exported, so the key set does not depend on the layout.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .collectives import agree_or_raise, all_gather_objects, group_size, recv_tensors, send_tensors
from .experts import expert_module_test, is_expert_writer, is_first_expert_replica
from .parallel_groups import is_first_replica, is_stage_writer, model_tp_group
from .sharding import ShardSpec, gather_full, param_shard_spec
from . import lora_math
from .checkpoint import _version
from .layers import LoraLayer, gated_chunks
from .layers.modules_to_save import ModulesToSaveWrapper
from .layers.trainable_tokens import TrainableTokensLayer, merged_table
from .shard_files import DTYPES, Planned, ShardWriter, parse_size
from .targeting import ModelChunks, global_module_names


@dataclass
class _Entry:
    """One exported tensor as this rank sees it; ``make`` is collective over its TP group."""

    key: str
    shape: tuple
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    expert: bool = False


def _natural(key: str) -> list:
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


def _param_entries(params, prefix: str, chunks: int, group, dtype) -> list[_Entry]:
    """Entries for ``(name, param)`` pairs that are exported as they are, gathered across TP."""
    out = []
    for pname, param in params:
        if _is_tied_copy(param):
            continue
        spec = param_shard_spec(param, chunks)
        out.append(_Entry(f"{prefix}{pname}", _full_shape(param, spec, group), dtype or param.dtype,
                          lambda p=param, s=spec: gather_full(p.detach(), s, group, dst=0)))
    return out


def _lora_entries(layer: LoraLayer, prefix: str, adapters, dtype, problems: list) -> list[_Entry]:
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
        out.append(_Entry(key, shape, dtype or param.dtype, make))
    if any(layer.lora_bias.get(a) for a in todo) and getattr(base, "bias", None) is None:
        problems.append(f"{prefix}: adapters {todo} have lora_bias but the base layer has no bias to merge it into")
    if todo and getattr(layer, "tied_output", False):
        problems.append(f"{prefix}weight: the output layer is tied to these embeddings, so merging {todo} into "
                        "them would change the output layer too: export the adapter unmerged, or untie them")
    if todo and getattr(base, "weight", None) is None:
        problems.append(f"{prefix}weight is tied to the word embeddings (the layer has no weight of its own); "
                        f"adapters {todo} cannot be merged into it: leave it out of target_modules")
    return out


def _token_entries(layer: TrainableTokensLayer, prefix: str, adapters, dtype, problems: list) -> list[_Entry]:
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
    return out + [_Entry(f"{prefix}weight", shape, dtype or weight.dtype, lambda: merged_table(layer, todo))]


def _local_entries(model: nn.Module, adapters: list[str], dtype, problems: list) -> list[_Entry]:
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
    return sorted(entries, key=lambda e: _natural(e.key))


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


# ---------------------------------------------------------------------- the stream


class MegatronNames:
    """The identity name mapping: full tensors under their megatron-core global names.

    A name mapping turns the stream of megatron tensors (natural name order,
    so one layer's tensors come together) into output tensors. ``outputs``
    lists, from a tensor's name, shape and dtype alone, what ``feed`` will
    emit when that tensor arrives; a mapping that needs several megatron
    tensors for one output keeps them until the last one arrives and lists
    the output there, so it holds at most one layer.
    """

    format = "megatron-core"

    def check(self, keys: list[str]) -> Optional[str]:
        """A problem with the set of megatron tensors (one line), or ``None``."""
        return None

    def outputs(self, key: str, shape: tuple, dtype: torch.dtype) -> list[Planned]:
        return [(key, shape, dtype)]

    def feed(self, key: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        return [(key, tensor)]


def _root_and_adapters(model, adapter_names: Optional[Sequence[str]]) -> tuple[nn.Module, list[str]]:
    """The megatron module(s) to walk and the adapters to merge, checked."""
    from .model import PeftModel

    if isinstance(model, PeftModel):
        adapters = list(model.active_adapters if adapter_names is None else adapter_names)
        unknown = [a for a in adapters if a not in model.peft_config]
        if unknown:
            raise ValueError(f"adapter_names {unknown} do not exist; available: {list(model.peft_config)}")
        return model.base_model.model, adapters
    if adapter_names:
        raise ValueError(f"adapter_names={list(adapter_names)} given, but the model is not a megalora PeftModel")
    if isinstance(model, (list, tuple, nn.ModuleList)) and not isinstance(model, ModelChunks):
        model = ModelChunks(list(model))
    return model, []


def stream_merged(model, adapter_names: Optional[Sequence[str]], names, open_sink, dtype=None,
                  progressbar: bool = False):
    """Collective: every full merged tensor, mapped by ``names``, into one sink on global rank 0.

    Args:
        model: A megalora ``PeftModel``, a megatron model, or a list of virtual chunks.
        adapter_names: Adapters to merge, in order; a ``PeftModel``'s active ones when ``None``.
        names: The name mapping (:class:`MegatronNames` or the HF bridge's).
        open_sink: Called on global rank 0 with the planned outputs ``[(name,
            shape, dtype)]`` and the adapters merged; returns an object with ``put(name, tensor)``,
            ``fail(message)`` and ``finish() -> error or None``. It may raise
            ``OSError`` or ``ValueError``, which every rank then raises.
        dtype: Cast every tensor to this dtype; each keeps its own when ``None``.
        progressbar: Show a tqdm bar on rank 0.

    Returns:
        ``(sink, adapters)`` on global rank 0, ``(None, adapters)`` elsewhere.

    Raises:
        ValueError: On every rank, for an unknown adapter, an adapter merged
            into a weight tied to the embeddings, a tensor name held by two
            stages, a dtype safetensors cannot name, a tensor the mapping
            rejects, or a sink that fails.
    """
    root, adapters = _root_and_adapters(model, adapter_names)
    rank = dist.get_rank() if dist.is_initialized() else 0
    problems: list[str] = []
    entries = _local_entries(root, adapters, dtype, problems)
    writes = {False: is_stage_writer(), True: is_expert_writer()}
    listed = [(e.key, e.shape, e.dtype, rank) for e in entries if writes[e.expert]]
    parts = all_gather_objects(listed)
    plan, sink, error = [], None, "; ".join(problems[:3]) or None
    if rank == 0:
        plan = sorted((x for part in parts for x in part), key=lambda x: _natural(x[0]))
        keys = [x[0] for x in plan]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        odd = sorted({str(x[2]) for x in plan if x[2] not in DTYPES})
        if twice:
            error = error or f"tensors {twice[:3]} are held by two pipeline stages; cannot export them once"
        if odd:
            error = error or f"dtypes {odd} have no safetensors name; pass dtype=torch.bfloat16 (or another)"
        error = error or names.check(keys)
        if error is None:
            try:
                outputs = [out for key, shape, dt, _ in plan for out in names.outputs(key, shape, dt)]
                sink = open_sink(outputs, adapters)
            except (OSError, ValueError) as exc:
                error = str(exc)
    agree_or_raise(error)

    if rank != 0:
        for entry in entries:
            full = entry.make()  # None off the TP group's rank 0
            if writes[entry.expert]:
                send_tensors([full.to(entry.dtype)], 0, None)
            del full
        agree_or_raise(None)
        return None, adapters

    mine = iter(entries)
    for key, shape, tensor_dtype, owner in tqdm(plan, desc="Exporting merged weights", disable=not progressbar):
        if owner == 0:
            full = next(mine).make().to(tensor_dtype)
        else:
            full = recv_tensors([(shape, tensor_dtype)], owner, None)[0]
        try:
            for out_key, tensor in names.feed(key, full):
                sink.put(out_key, tensor)
        except ValueError as exc:  # keep receiving, so that no sender is left waiting
            sink.fail(str(exc))
        del full
    agree_or_raise(sink.finish())
    return sink, adapters


def write_merged(model, save_directory: str, names, adapter_names=None, max_shard_size: Union[int, str] = "5GB",
                 dtype=None, progressbar: bool = True) -> Optional[dict]:
    """Collective: :func:`stream_merged` into safetensors files in ``save_directory`` (see :func:`export_merged`)."""
    max_bytes = parse_size(max_shard_size)

    def open_sink(outputs: list[Planned], adapters: list[str]) -> ShardWriter:
        try:
            os.makedirs(save_directory, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create save_directory {save_directory!r}: {exc}") from exc
        metadata = {"format": names.format, "megalora_version": _version(), "merged_adapters": adapters}
        return ShardWriter(save_directory, outputs, max_bytes, metadata)

    writer, _ = stream_merged(model, adapter_names, names, open_sink, dtype, progressbar)
    if writer is None:
        return None
    return {"files": writer.files, "total_size": writer.total_size, "num_tensors": len(writer.plan),
            "dtype": writer.plan[0][2] if writer.plan else None}


def export_merged(
    peft_model,
    save_directory: str,
    adapter_names: Optional[Sequence[str]] = None,
    max_shard_size: Union[int, str] = "5GB",
    dtype: Optional[torch.dtype] = None,
    progressbar: bool = True,
) -> Optional[dict]:
    """Collective: write the model with adapters merged as full safetensors files, megatron names.

    Every rank must call it. Global rank 0 writes ``model.safetensors``, or
    several ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``; the files do not depend on the
    TP/PP/VPP/DP layout (byte for byte). Peak extra memory on the writing
    rank is about one gathered weight and one merged weight (one more
    temporary for DoRA), never a file; other ranks hold no full tensor.

    Args:
        peft_model: A megalora ``PeftModel`` (plain, megatron-core, or VPP
            chunks), or a megatron model / list of chunks with nothing to merge.
        save_directory: Output directory, created if missing. Files of an
            earlier export there with another shard count are removed.
        adapter_names: Adapters to merge, in order; the active ones when ``None``.
        max_shard_size: Bytes per file (int, or a string like ``"5GB"``).
        dtype: Cast every tensor to this dtype; each keeps its own when ``None``.
        progressbar: Show a tqdm bar on rank 0.

    Returns:
        On rank 0: ``{"files": [...], "total_size": bytes, "num_tensors": n,
        "dtype": the first tensor's}``; ``None`` elsewhere.

    Raises:
        ValueError: On every rank, for an unknown adapter, an adapter merged
            into a weight tied to the embeddings, a bad ``max_shard_size``, an
            unwritable directory, or a tensor name held by two stages.
    """
    return write_merged(peft_model, save_directory, MegatronNames(), adapter_names, max_shard_size, dtype,
                        progressbar)
