"""A megatron-core model back to an HF state dict and HF files that transformers loads.

Both are the merged export's stream (:func:`megalora.export.stream_merged`)
with HF names (:class:`megalora.hf.convert.HFNames`): every tensor is made
full on its pipeline stage (adapters merged on the full tensors), sent to
global rank 0 and split into its HF tensors there, one at a time. The files
are therefore byte-identical at every TP/PP/VPP layout.

A megalora ``PeftModel`` may be passed: with ``merge_adapters=True`` (the
default) its active adapters are merged into what is exported (the model
itself is not changed); otherwise the bare base weights are exported. A model
already merged (``merge_and_unload``) is just a megatron model.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

from ..collectives import broadcast_object
from ..export import stream_merged, write_merged
from .arch import arch_from_hf
from .convert import EMBEDDING, HFNames
from .models import clean_hf_config


def _is_peft_model(model) -> bool:
    from ..model import PeftModel

    return isinstance(model, PeftModel)


def model_chunks(model) -> list[nn.Module]:
    """The megatron modules of a model, a list of virtual chunks, or a megalora ``PeftModel``."""
    if _is_peft_model(model):
        return list(model)
    if isinstance(model, (list, tuple, nn.ModuleList)):
        return list(model)
    return [model]


def find_hf_config(model, hf_config=None):
    """``hf_config``, else the one :func:`~megalora.hf.build_gpt_from_hf` attached to the model."""
    if hf_config is not None:
        return hf_config
    for chunk in model_chunks(model):
        found = getattr(chunk, "hf_config", None)
        if found is not None:
            return found
    raise ValueError(
        "no HF config: pass hf_config=..., or build the model with megalora.hf.build_gpt_from_hf, "
        "which records it as model.hf_config"
    )


class _StateDict:
    """A sink of the merged stream that keeps every tensor (for :func:`export_hf_state_dict`)."""

    def __init__(self):
        self.state, self.error = {}, None

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if self.error is None:
            self.state[key] = tensor.to("cpu", copy=True).contiguous()

    def fail(self, message: str) -> None:
        self.error = self.error or message

    def finish(self) -> Optional[str]:
        return self.error


def export_hf_state_dict(model, hf_config=None, merge_adapters: bool = True) -> Optional[dict[str, torch.Tensor]]:
    """Collective: the HF state dict of a megatron model, on global rank 0 (``None`` elsewhere).

    It is :func:`megalora.export_merged`'s stream kept in memory instead of
    written, so it holds the whole model on rank 0; :func:`save_hf_pretrained`
    streams to files instead.

    Args:
        model: A ``GPTModel`` (this rank's stage), its virtual chunks, or a
            megalora ``PeftModel`` over either. Every rank passes its own.
        hf_config: The HF config; default the one recorded by ``build_gpt_from_hf``.
        merge_adapters: For a ``PeftModel``: export base weights with the
            active adapters merged (``True``) or the bare base weights.

    Returns:
        ``{HF name: full tensor}`` with the keys of the HF model's
        ``state_dict()`` (a tied ``lm_head.weight`` is the embedding tensor).
    """
    arch = arch_from_hf(find_hf_config(model, hf_config))
    names = HFNames(arch)
    sink, _ = stream_merged(model, _adapters(model, merge_adapters), names, lambda *_: _StateDict())
    if sink is None:
        return None
    state = sink.state
    if arch.tied and not names.untied:
        _, hprefix, rule = arch.rule_for_mcore(EMBEDDING)
        state["lm_head.weight"] = state[f"{hprefix}{rule.hf[0]}.weight"]
    return state


def _adapters(model, merge_adapters: bool) -> Optional[list]:
    """The adapters to merge: a ``PeftModel``'s active ones (``None``), or none."""
    return None if merge_adapters or not _is_peft_model(model) else []


def share_files(directory: str) -> None:
    """Make the files in ``directory`` ``rw-r--r--``: some writers (safetensors) create them ``rw-------``."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, 0o644)


def _save_generation_config(config, directory: str) -> None:
    """``generation_config.json`` from the model config (its bos/eos/pad ids), as transformers would write it."""
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(config).save_pretrained(directory)


def save_hf_pretrained(model, directory: str, hf_config=None, tokenizer=None, merge_adapters: bool = True,
                       max_shard_size: Union[int, str] = "5GB") -> str:
    """Collective: write ``config.json``, ``generation_config.json`` and the weights for transformers.

    Global rank 0 writes, streaming tensor by tensor; every rank returns once
    the files exist. The weights are ``model.safetensors``, or shards plus an
    index beyond ``max_shard_size``, as transformers' ``save_pretrained``
    writes them; they do not depend on the layout, byte for byte. A GGUF
    source's ``quantization_config`` is dropped (the weights are dequantized),
    and a tied ``lm_head.weight`` is left out, as transformers does.

    Args:
        model: As for :func:`export_hf_state_dict`.
        directory: The output directory (created).
        hf_config: The HF config; default the one recorded by ``build_gpt_from_hf``.
        tokenizer: An optional tokenizer to save alongside.
        merge_adapters: As for :func:`export_hf_state_dict`.
        max_shard_size: Bytes per weights file (int, or a string like ``"5GB"``).
    """
    hf_config = find_hf_config(model, hf_config)
    names = HFNames(arch_from_hf(hf_config))
    written = write_merged(model, directory, names, _adapters(model, merge_adapters), max_shard_size,
                           progressbar=False)
    error = None
    if written is not None:
        try:
            config = clean_hf_config(hf_config)
            if names.untied:  # an untied output-layer copy was trained: lm_head is its own tensor
                config.tie_word_embeddings = False
            if written["dtype"] is not None:
                config.dtype = written["dtype"]
            config.save_pretrained(directory)
            _save_generation_config(config, directory)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
            share_files(directory)
        except Exception as exc:  # re-raised on every rank below
            error = f"writing the HF model to {directory} failed: {type(exc).__name__}: {exc}"
    error = broadcast_object(error)
    if error is not None:
        raise RuntimeError(error)
    return directory
