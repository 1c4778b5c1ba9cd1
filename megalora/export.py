"""Merged export: the full model with adapters merged, as HF-style safetensors shards.

:func:`export_merged` writes every weight of the model, with the chosen
adapters merged in, as full (unsharded) tensors keyed by megatron-core
*global* names (``decoder.layers.<global index>.mlp.linear_fc1.weight``); an
HF bridge maps them to HF names later. The files are
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``,
as ``transformers`` writes them.

How it streams, so that the extra memory is about one full layer weight
(measured on a 615 MB model whose largest weight is 32 MB: 37 MB extra at
TP=1, 72 MB on the writing rank and 0.3 MB on the other at TP=2):

1. Every rank lists its tensors (name, full shape, dtype); global rank 0
   collects the lists, sorts the names naturally (a layout-independent order)
   and cuts them into shards. Each shard's safetensors header is known up
   front, so it is written first and the tensors' bytes follow one by one.
2. Each tensor is made full where it lives: the TP group of its pipeline
   stage gathers the base shards and the (small) LoRA factors, and the merge
   math runs on the full tensors, exactly as at TP=1. That is what makes an
   export from TP=2 byte-identical to one from TP=1 (a merge of the local
   shards followed by a gather would round differently for DoRA's row norms).
   Gated ``linear_fc1`` shards are put back in the canonical ``[gate; up]``
   order through ``ShardSpec(chunks=2)``.
   Only the TP group's rank 0 receives the shards; the other ranks never hold
   a full tensor.
3. The stage's TP rank 0 sends it to global rank 0, which writes it and drops
   it. Only the first data-parallel replica takes part.

The model itself is not changed: nothing is merged in place. Layers whose
adapters are already merged (``merge_adapter``) are exported as they are.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .collectives import agree_or_raise, all_gather_objects, group_size, recv_tensors, send_tensors
from .parallel_groups import is_first_replica, is_stage_writer, model_tp_group
from .sharding import FULL, ShardSpec, gather_full, param_shard_spec
from .atomic_write import AtomicFile, fsync_dir, write_text
from .checkpoint import _version
from .layers import LoraLayer
from .layers.modules_to_save import ModulesToSaveWrapper
from .targeting import global_module_names

INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class _Entry:
    """One exported tensor as this rank sees it; ``make`` is collective over its TP group."""

    key: str
    shape: tuple
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size; give bytes (int) or e.g. '5GB', '500MB'")
    unit = match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base ** "BKMGT".index(unit[0]))


def _full_shape(local: torch.Tensor, spec: ShardSpec, group) -> tuple:
    shape = list(local.shape)
    if spec.sharded:
        shape[spec.dim] *= group_size(group)
    return tuple(shape)


# ---------------------------------------------------------------------- merge math on full tensors
#
# Collective over a layer's TP group; only its rank 0 (the stage writer) gets
# full tensors and does the math, the others take part in the gathers and get
# ``None``. The ops are LoraLayer.merge's, done in place on fresh buffers where
# that gives the same bits (IEEE + and * commute), so the peak is about one
# layer weight beyond the gathered one.


def _gather(layer: LoraLayer, tensor: torch.Tensor, spec: ShardSpec) -> Optional[torch.Tensor]:
    return gather_full(tensor.detach(), spec, layer.tp_group, dst=0)


def _delta(b: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    """A fresh ``scaling · B @ A``, as :meth:`LoraLayer._delta_oi` computes it."""
    if b.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16):
        return (b.float() @ a.float()).mul_(scaling).to(b.dtype)
    return (b @ a).mul_(scaling)


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    return weight.float().pow(2).sum(dim=1).sqrt().to(weight.dtype)


def _gather_adapter(layer: LoraLayer, adapter: str, norms: bool = False) -> Optional[dict]:
    """Full A, B (and DoRA magnitude / merged norm) of one adapter on the TP group's rank 0."""
    out = {"a": _gather(layer, layer.lora_A[adapter].weight, layer.a_spec),
           "b": _gather(layer, layer.lora_B[adapter].weight, layer.b_spec)}
    if layer.use_dora.get(adapter):
        out["mag"] = _gather(layer, layer.lora_magnitude_vector[adapter].weight, layer.magnitude_spec)
        if norms:
            out["norm"] = _gather(layer, layer._merged_norms[adapter], layer.magnitude_spec)
    return out if out["a"] is not None else None


def _pristine(layer: LoraLayer, weight: torch.Tensor, merged: list) -> torch.Tensor:
    """The full base weight with the already merged adapters taken out (DoRA's norm needs it)."""
    for adapter, f in zip(reversed(layer.merged_adapters), reversed(merged)):
        delta = _delta(f["b"], f["a"], layer.scaling[adapter]).to(weight.dtype)
        if layer.use_dora.get(adapter):
            weight = weight / (f["mag"] / f["norm"]).view(-1, 1) - delta
        else:
            weight = weight - delta
    return weight


def _merged_weight(layer: LoraLayer, adapters: list[str], spec: ShardSpec) -> Optional[torch.Tensor]:
    """The full merged weight in the base layer's layout (``None`` off the TP group's rank 0)."""
    weight = _gather(layer, layer.base_weight_oi(), spec)
    factors = [_gather_adapter(layer, a) for a in adapters]
    needs_pristine = layer.merged_adapters and any(layer.use_dora[a] for a in adapters)
    merged = [_gather_adapter(layer, a, norms=True) for a in layer.merged_adapters] if needs_pristine else []
    if weight is None:
        return None
    pristine = _pristine(layer, weight, merged) if needs_pristine else weight
    for adapter, f in zip(adapters, factors):
        merged_weight = _delta(f["b"], f["a"], layer.scaling[adapter]).to(weight.dtype)
        if layer.use_dora[adapter]:
            norm = _row_norm(pristine + merged_weight)
            merged_weight.add_(weight).mul_((f["mag"] / norm).view(-1, 1).to(weight.dtype))
        else:
            merged_weight.add_(weight)
        weight = merged_weight
    return layer._to_base_layout(weight)


def _merged_bias(layer: LoraLayer, adapters: list[str], spec: ShardSpec) -> Optional[torch.Tensor]:
    bias = _gather(layer, layer.get_base_layer().bias, spec)
    b_spec = layer.b_spec if layer.b_spec.dim == 0 else FULL
    extra = [(a, _gather(layer, layer.lora_B[a].bias, b_spec)) for a in adapters if layer.lora_bias.get(a)]
    if bias is None:
        return None
    for adapter, lora_bias in extra:
        bias = bias + lora_bias * layer.scaling[adapter]
    return bias


# ---------------------------------------------------------------------- what this rank exports


def _is_tied_copy(param: torch.Tensor) -> bool:
    """The last stage's copy of embeddings tied to the output layer: exported once, by the first stage."""
    return bool(getattr(param, "shared", False) and getattr(param, "shared_embedding", False))


def _param_entries(params, prefix: str, gated: bool, group, dtype) -> list[_Entry]:
    """Entries for ``(name, param)`` pairs that are exported as they are, gathered across TP."""
    out = []
    for pname, param in params:
        if _is_tied_copy(param):
            continue
        spec = param_shard_spec(param, 2 if gated else 1)
        out.append(_Entry(f"{prefix}{pname}", _full_shape(param, spec, group), dtype or param.dtype,
                          lambda p=param, s=spec: gather_full(p.detach(), s, group, dst=0)))
    return out


def _is_gated(module, prefix: str) -> bool:
    config = getattr(module, "config", None)
    return prefix.endswith("linear_fc1.") and bool(getattr(config, "gated_linear_unit", False))


def _lora_entries(layer: LoraLayer, prefix: str, adapters, dtype, problems: list) -> list[_Entry]:
    base = layer.get_base_layer()
    todo = [a for a in adapters if a in layer.lora_A and a not in layer.merged_adapters]
    chunks = layer.b_spec.chunks
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
            out.extend(_param_entries([(pname, param)], prefix, chunks == 2, layer.tp_group, dtype))
            continue
        out.append(_Entry(key, shape, dtype or param.dtype, make))
    if any(layer.lora_bias.get(a) for a in todo) and getattr(base, "bias", None) is None:
        problems.append(f"{prefix}: adapters {todo} have lora_bias but the base layer has no bias to merge it into")
    if todo and getattr(base, "weight", None) is None:
        problems.append(f"{prefix}weight is tied to the word embeddings (the layer has no weight of its own); "
                        f"adapters {todo} cannot be merged into it: leave it out of target_modules")
    return out


def _local_entries(peft_model, adapters: list[str], dtype, problems: list) -> list[_Entry]:
    """This rank's exported tensors, sorted naturally by name."""
    model = peft_model.base_model.model
    names = global_module_names(model)
    tp_group = model_tp_group()
    entries, skip = [], []
    for local_name, module in model.named_modules():
        if any(local_name.startswith(p) for p in skip):
            continue
        gname = names[local_name]
        prefix = f"{gname}." if gname else ""
        if isinstance(module, LoraLayer):
            skip.append(f"{local_name}.")
            entries.extend(_lora_entries(module, prefix, adapters, dtype, problems))
            continue
        if isinstance(module, ModulesToSaveWrapper):
            skip.append(f"{local_name}.")
            chosen = next((a for a in adapters if a in module.modules_to_save), None)
            module = module.modules_to_save[chosen] if chosen else module.original_module
            for sub_name, sub in module.named_modules():
                sub_prefix = f"{prefix}{sub_name}." if sub_name else prefix
                params = sub.named_parameters(recurse=False)
                entries.extend(_param_entries(params, sub_prefix, _is_gated(sub, sub_prefix), tp_group, dtype))
            continue
        params = module.named_parameters(recurse=False)
        entries.extend(_param_entries(params, prefix, _is_gated(module, prefix), tp_group, dtype))
    return sorted(entries, key=lambda e: _natural(e.key))


# ---------------------------------------------------------------------- files


def _nbytes(shape: tuple, dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def _header(entries: list[tuple[str, tuple, torch.dtype]]) -> bytes:
    """The safetensors header of a file holding these tensors' bytes in this order."""
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype in entries:
        size = _nbytes(shape, dtype)
        meta[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def _shards(plan: list, max_bytes: int) -> list[list[int]]:
    """Greedy split of the ordered plan into shards of at most ``max_bytes`` (one tensor may exceed it)."""
    shards, current, size = [], [], 0
    for i, (_, shape, dtype, _) in enumerate(plan):
        nbytes = _nbytes(shape, dtype)
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    return shards + ([current] if current else [])


class _ShardWriter:
    """Rank 0's streaming writer: a shard's header first, then each tensor as it arrives."""

    def __init__(self, directory: str, plan: list, max_bytes: int):
        self.directory, self.plan = directory, plan
        self.shards = _shards(plan, max_bytes)
        self.names = [f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors" for i in range(len(self.shards))]
        self.shard_of = {i: s for s, members in enumerate(self.shards) for i in members}
        self.handle, self.error = None, None
        self.total_size = sum(_nbytes(shape, dtype) for _, shape, dtype, _ in plan)

    def write(self, index: int, tensor: torch.Tensor) -> None:
        if self.error:
            return
        try:
            shard = self.shard_of[index]
            if index == self.shards[shard][0]:
                header = _header([self.plan[i][:3] for i in self.shards[shard]])
                self.handle = AtomicFile(os.path.join(self.directory, self.names[shard]), sync_dir=False)
                self.handle.write(header)
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            self.handle.write(memoryview(data))
            if index == self.shards[shard][-1]:
                self.handle.commit()
                self.handle = None
        except OSError as exc:  # keep receiving, so that no sender is left waiting
            self.error = f"writing the merged export to {self.directory!r} failed: {exc}"
            if self.handle is not None:
                self.handle.abort()

    def finish(self, adapters: list[str]) -> None:
        if self.error:
            return
        index = {
            "metadata": {"total_size": self.total_size, "format": "megatron-core", "megalora_version": _version(),
                         "merged_adapters": adapters},
            "weight_map": {key: self.names[self.shard_of[i]] for i, (key, _, _, _) in enumerate(self.plan)},
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        write_text(os.path.join(self.directory, INDEX_NAME), text)
        for name in os.listdir(self.directory):  # shards of an earlier export with another count
            if SHARD_PATTERN.fullmatch(name) and name not in self.names:
                os.unlink(os.path.join(self.directory, name))
        fsync_dir(self.directory)


# ---------------------------------------------------------------------- the API


def export_merged(
    peft_model,
    save_directory: str,
    adapter_names: Optional[Sequence[str]] = None,
    max_shard_size: Union[int, str] = "5GB",
    dtype: Optional[torch.dtype] = None,
    progressbar: bool = True,
) -> Optional[dict]:
    """Collective: write the model with adapters merged as full safetensors shards plus an index.

    Every rank must call it. Global rank 0 writes; the files do not depend on
    the TP/PP/VPP layout (an export from TP=2 equals one from TP=1 byte for
    byte). Peak extra memory on a writing rank is about two copies of the
    largest single weight (its gathered shards and the merged result), never
    a shard file; other ranks hold no full tensor.

    Args:
        peft_model: A megalora ``PeftModel`` (plain, megatron-core, or VPP chunks).
        save_directory: Output directory, created if missing. Shards of an
            earlier export there with another shard count are removed.
        adapter_names: Adapters to merge, in order; the active ones when ``None``.
        max_shard_size: Bytes per shard file (int, or a string like ``"5GB"``).
        dtype: Cast every tensor to this dtype; each keeps its own when ``None``.
        progressbar: Show a tqdm bar on rank 0.

    Returns:
        On rank 0: ``{"files": [...], "total_size": bytes, "num_tensors": n}``;
        ``None`` elsewhere.

    Raises:
        ValueError: On every rank, for an unknown adapter, an adapter merged
            into a weight tied to the embeddings, a bad ``max_shard_size``, an
            unwritable directory, or a tensor name held by two stages.
    """
    adapters = list(peft_model.active_adapters if adapter_names is None else adapter_names)
    unknown = [a for a in adapters if a not in peft_model.peft_config]
    if unknown:
        raise ValueError(f"adapter_names {unknown} do not exist; available: {list(peft_model.peft_config)}")
    max_bytes = _parse_size(max_shard_size)
    rank = dist.get_rank() if dist.is_initialized() else 0
    problems: list[str] = []
    entries = _local_entries(peft_model, adapters, dtype, problems) if is_first_replica() else []
    listed = [(e.key, e.shape, e.dtype, rank) for e in entries] if is_stage_writer() else []
    parts = all_gather_objects(listed)
    plan, error = [], "; ".join(problems[:3]) or None
    if rank == 0:
        plan = sorted((x for part in parts for x in part), key=lambda x: _natural(x[0]))
        keys = [x[0] for x in plan]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            error = error or f"tensors {twice[:3]} are held by two pipeline stages; cannot export them once"
        odd = sorted({str(x[2]) for x in plan if x[2] not in _DTYPES})
        if odd:
            error = error or f"dtypes {odd} have no safetensors name; pass dtype=torch.bfloat16 (or another)"
        try:
            os.makedirs(save_directory, exist_ok=True)
        except OSError as exc:
            error = error or f"cannot create save_directory {save_directory!r}: {exc}"
    agree_or_raise(error)

    if rank != 0:
        for entry in entries:
            full = entry.make()  # None off the TP group's rank 0
            if is_stage_writer():
                send_tensors([full.to(entry.dtype)], 0, None)
            del full
        agree_or_raise(None)
        return None

    writer = _ShardWriter(save_directory, plan, max_bytes)
    mine = iter(entries)
    for i, (key, shape, tensor_dtype, owner) in enumerate(
        tqdm(plan, desc="Exporting merged weights", disable=not progressbar)
    ):
        if owner == 0:
            entry = next(mine)
            full = entry.make().to(entry.dtype)
        else:
            full = recv_tensors([(shape, tensor_dtype)], owner, None)[0]
        writer.write(i, full)
        del full
    if not writer.error:
        try:
            writer.finish(adapters)
        except OSError as exc:
            writer.error = f"writing {INDEX_NAME} to {save_directory!r} failed: {exc}"
    agree_or_raise(writer.error)
    return {"files": writer.names + [INDEX_NAME], "total_size": writer.total_size, "num_tensors": len(plan)}
