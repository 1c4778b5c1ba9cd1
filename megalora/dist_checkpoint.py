"""Adapter-only checkpoints through megatron-core's distributed checkpointing.

The LoRA layers' ``sharded_state_dict`` (see :mod:`megalora.layers.parallel`)
gives every factor a ``ShardedTensor`` with its own TP split and replica id, so
megatron-core writes every TP shard once and reads back any slice: an adapter
saved at one TP/PP/VPP layout loads at another. These helpers keep only the
adapters' entries of a model's sharded state dict, and load what comes back
into the parameters.

Layers are keyed one by one (megatron-core's ``non_homogeneous_layers``), not
stacked on a layer axis: LoRA may sit on some layers only
(``layers_to_transform``) or with another ``r`` per layer (``rank_pattern``),
which a stacked tensor cannot hold.

``modules_to_save`` copies are keyed ``<module>.modules_to_save.<adapter>.*``
with the copied module's own TP split (see ``ModulesToSaveWrapper``).
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .collectives import agree_or_raise
from .targeting import ModelChunks


def _chunks(peft_model) -> list[tuple[str, torch.nn.Module]]:
    model = peft_model.base_model.model
    if isinstance(model, ModelChunks):
        return [(f"{i}.", chunk) for i, chunk in enumerate(model)]
    return [("", model)]


def _adapter_key_pattern(adapters: Sequence[str]) -> re.Pattern:
    names = "|".join(re.escape(a) for a in adapters)
    return re.compile(rf"(^|\.)(lora_A|lora_B|lora_magnitude_vector|modules_to_save|trainable_tokens_delta)\.({names})\.")


def adapter_sharded_state_dict(
    peft_model, adapter_names: Optional[Sequence[str]] = None, metadata: Optional[dict] = None
) -> dict:
    """The adapters' part of the model's megatron-core sharded state dict.

    Args:
        peft_model: A megalora ``PeftModel`` on a megatron-core model (or VPP chunks).
        adapter_names: Adapters to include; all of them when ``None``.
        metadata: megatron-core's sharded-state-dict metadata;
            ``non_homogeneous_layers`` defaults to ``True`` here.

    Returns:
        A flat dict whose keys are the local parameter names of
        ``peft_model.base_model.model`` (chunk index first under VPP) and whose
        values are ``ShardedTensor``s (or SwiGLU factories) with global keys.
    """
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    adapters = list(peft_model.peft_config) if adapter_names is None else list(adapter_names)
    unknown = [a for a in adapters if a not in peft_model.peft_config]
    if unknown:
        raise ValueError(f"adapter_names {unknown} do not exist; available: {list(peft_model.peft_config)}")
    metadata = dict(metadata or {})
    metadata.setdefault("non_homogeneous_layers", True)
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    wanted = _adapter_key_pattern(adapters)
    out = {}
    for chunk_prefix, chunk in _chunks(peft_model):
        for key, entry in chunk.sharded_state_dict(prefix="", metadata=metadata).items():
            if not wanted.search(key) or key.endswith("_extra_state"):  # only tensors: no pickled objects
                continue
            out[f"{chunk_prefix}{key}"] = entry
    return out


def save_adapter_dist_checkpoint(
    peft_model, checkpoint_dir: str, adapter_names: Optional[Sequence[str]] = None,
    metadata: Optional[dict] = None, **save_kwargs,
) -> None:
    """Collective: save the adapters alone with ``megatron.core.dist_checkpointing.save``.

    ``checkpoint_dir`` is created if missing and must be empty; every TP shard
    of every factor is written once (by the first data-parallel replica).
    """
    from megatron.core import dist_checkpointing

    sharded = adapter_sharded_state_dict(peft_model, adapter_names, metadata)
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            os.makedirs(checkpoint_dir, exist_ok=True)
            if os.listdir(checkpoint_dir):
                error = f"checkpoint_dir {checkpoint_dir!r} is not empty; give a new or empty directory"
        except OSError as exc:
            error = f"cannot create checkpoint_dir {checkpoint_dir!r}: {exc}"
    agree_or_raise(error)
    dist_checkpointing.save(sharded, checkpoint_dir, **save_kwargs)


def _global_shapes(sharded: dict) -> dict[str, tuple]:
    """Global key → global shape of every tensor a sharded state dict asks for."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    shapes = {}
    for entry in sharded.values():
        parts = entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]
        for part in parts:
            if isinstance(part, ShardedTensor):
                shapes[part.key] = tuple(part.global_shape)
    return shapes


def _check_against(checkpoint_dir: str, sharded: dict) -> Optional[str]:
    """What the checkpoint lacks or holds in another shape, as one message (``None`` if fine)."""
    from megatron.core import dist_checkpointing

    try:
        saved = {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(checkpoint_dir).items()}
    except Exception as exc:  # noqa: BLE001 - not a checkpoint, or a torn one
        return f"cannot read the distributed checkpoint in {checkpoint_dir!r}: {exc}"
    problems = []
    for key, shape in _global_shapes(sharded).items():
        if key not in saved:
            problems.append(f"missing tensor {key} in {checkpoint_dir} (another adapter name or target_modules?)")
        elif saved[key] != shape:
            problems.append(
                f"shape mismatch for {key}: the checkpoint has {saved[key]}, the model needs {shape} "
                "(another r, or another model?)"
            )
    return "; ".join(problems[:5]) if problems else None


def load_adapter_dist_checkpoint(
    peft_model, checkpoint_dir: str, adapter_names: Optional[Sequence[str]] = None,
    metadata: Optional[dict] = None, **load_kwargs,
) -> None:
    """Collective: load adapters saved by :func:`save_adapter_dist_checkpoint`, at any layout.

    The checkpoint's tensor metadata is checked first on every rank; missing
    tensors and shape (``r``) mismatches raise the same error everywhere,
    before anything is read into the model.
    """
    from megatron.core import dist_checkpointing

    sharded = adapter_sharded_state_dict(peft_model, adapter_names, metadata)
    agree_or_raise(_check_against(checkpoint_dir, sharded))
    loaded = dist_checkpointing.load(sharded, checkpoint_dir, **load_kwargs)
    params = dict(peft_model.base_model.model.named_parameters())
    with torch.no_grad():
        for key, value in loaded.items():
            # A trained token row is a view into its layer's rows (see TrainableTokensLayer.sharded_state_dict).
            target = params[key] if key in params else sharded[key].data
            target.copy_(value.to(dtype=target.dtype, device=target.device))
