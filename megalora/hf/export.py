"""A megatron-core model back to an HF state dict and HF files that transformers loads.

Each parameter is gathered along its own TP split dimension (a gated
``linear_fc1`` as ``[gate; up]`` blocks), keyed by its global name, and every
pipeline stage's tensors are sent to global rank 0, which converts them to HF
names with :func:`megalora.hf.convert.hf_state_from_mcore`.

A megalora ``PeftModel`` may be passed: with ``merge_adapters=True`` (the
default) the active, unmerged adapters are merged for the export and the
base weights are restored bit for bit afterwards; otherwise the bare base
weights are exported. A model already merged (``merge_and_unload``) is just
a megatron model.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import nn

from ..collectives import broadcast_object, gather_objects
from ..parallel_groups import is_stage_writer
from ..sharding import gather_full
from ..layers import LoraLayer
from .arch import arch_from_hf
from .build import global_param_names, param_spec
from .convert import hf_state_from_mcore
from .models import clean_hf_config

HF_WEIGHTS_NAME = "model.safetensors"


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


@contextlib.contextmanager
def adapters_merged(model):
    """Inside the block, the active unmerged adapters of a ``PeftModel`` are merged.

    On exit they are unmerged and the original base tensors copied back, so
    the base weights are bit-identical to before (unmerging alone would leave
    rounding noise).
    """
    layers = []
    if _is_peft_model(model):
        for chunk in model_chunks(model):
            for module in chunk.modules():
                if (isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters
                        and any(a in module.lora_A for a in module.active_adapters)):
                    layers.append(module)
    saved = []
    for layer in layers:
        base = layer.get_base_layer()
        bias = getattr(base, "bias", None)
        saved.append((layer, base.weight.detach().clone(), None if bias is None else bias.detach().clone()))
    try:
        for layer in layers:
            layer.merge()
        yield
    finally:
        with torch.no_grad():
            for layer, weight, bias in saved:
                if layer.merged:
                    layer.unmerge()
                base = layer.get_base_layer()
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)


def gather_stages(state: dict) -> Optional[dict]:
    """Collective: every pipeline stage's tensors merged on global rank 0 (``None`` elsewhere).

    Only one rank per stage (TP rank 0 of the first data-parallel replica) sends.
    """
    parts = gather_objects(state if is_stage_writer() else {})
    if parts is None:
        return None
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def _stage_state(chunks: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Collective over TP: this stage's full base tensors, by global megatron name."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    state = {}
    for chunk in chunks:
        gated = bool(getattr(getattr(chunk, "config", None), "gated_linear_unit", False))
        names = global_param_names(chunk)
        for local, param in chunk.named_parameters():
            parts = local.split(".")
            if any(p.startswith("lora_") for p in parts):
                continue
            if "modules_to_save" in parts or "original_module" in parts:
                raise NotImplementedError(
                    "exporting modules_to_save to HF is not supported; call merge_and_unload() and export the result"
                )
            name = ".".join(p for p in names[local].split(".") if p != "base_layer")
            full = gather_full(param.detach(), param_spec(name, param, gated), group)
            state[name] = full.to("cpu", copy=True).contiguous()
    return state


def export_hf_state_dict(model, hf_config=None, merge_adapters: bool = True) -> Optional[dict[str, torch.Tensor]]:
    """Collective: the HF state dict of a megatron model, on global rank 0 (``None`` elsewhere).

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
    context = adapters_merged(model) if merge_adapters else contextlib.nullcontext()
    with context:
        state = _stage_state(model_chunks(model))
    merged = gather_stages(state)
    if merged is None:
        return None
    return hf_state_from_mcore(arch, merged)


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


def save_hf_pretrained(model, directory: str, hf_config=None, tokenizer=None, merge_adapters: bool = True) -> str:
    """Collective: write ``config.json``, ``generation_config.json`` and ``model.safetensors`` for transformers.

    Global rank 0 writes; every rank returns once the files exist. A GGUF
    source's ``quantization_config`` is dropped (the weights are dequantized),
    and a tied ``lm_head.weight`` is left out, as transformers does.

    Args:
        model: As for :func:`export_hf_state_dict`.
        directory: The output directory (created).
        hf_config: The HF config; default the one recorded by ``build_gpt_from_hf``.
        tokenizer: An optional tokenizer to save alongside.
        merge_adapters: As for :func:`export_hf_state_dict`.
    """
    from safetensors.torch import save_file

    hf_config = find_hf_config(model, hf_config)
    state = export_hf_state_dict(model, hf_config, merge_adapters=merge_adapters)
    error = None
    if state is not None:
        try:
            if arch_from_hf(hf_config).tied:
                state.pop("lm_head.weight", None)
            os.makedirs(directory, exist_ok=True)
            save_file(state, os.path.join(directory, HF_WEIGHTS_NAME), metadata={"format": "pt"})
            config = clean_hf_config(hf_config)
            config.dtype = next(iter(state.values())).dtype
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
