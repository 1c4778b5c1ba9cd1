"""Merged export: the full model with adapters merged, streamed to safetensors files.

:func:`stream_merged` hands every weight of the model, with the chosen
adapters merged in, as a full (unsharded) tensor keyed by its megatron-core
*global* name (``decoder.layers.<global index>.mlp.linear_fc1.weight``) to a
name mapping (:class:`MegatronNames` here; HF names in
:mod:`megalora.hf.export`) and on to a sink on global rank 0, one tensor at a
time. :func:`export_merged` writes them as transformers' ``save_pretrained``
does (:mod:`megalora.shard_files`); ``megalora.hf.save_hf_pretrained``,
``megalora merge`` and ``megalora export --format hf`` are the same stream.

What each rank exports, and how each tensor is made full and merged, is
:mod:`megalora.export_entries`. How it streams, so that the extra memory is about one full layer weight
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
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import _version
from .collectives import agree_or_raise, all_gather_objects, recv_tensors, send_tensors
from .experts import is_expert_writer
from .export_entries import local_entries, natural_key
from .parallel_groups import is_stage_writer
from .shard_files import DTYPES, Planned, ShardWriter, parse_size
from .targeting import ModelChunks


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
    entries = local_entries(root, adapters, dtype, problems)
    writes = {False: is_stage_writer(), True: is_expert_writer()}
    listed = [(e.key, e.shape, e.dtype, rank) for e in entries if writes[e.expert]]
    parts = all_gather_objects(listed)
    plan, sink, error = [], None, "; ".join(problems[:3]) or None
    if rank == 0:
        plan = sorted((x for part in parts for x in part), key=lambda x: natural_key(x[0]))
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
