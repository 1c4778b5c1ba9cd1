"""PEFT's conversion of a PiSSA/OLoRA adapter into a plain LoRA adapter on the *original* base.

PiSSA and OLoRA train ``W_res + s·B@A`` where ``W = W_res + s·B0@A0``, so the
trained model is ``W + s·(B@A - B0@A0) = W + s·[B, -B0]@[A; A0]``: a LoRA
adapter of rank ``2r`` with the same scaling, which needs no rewritten base.
``save_pretrained(out, path_initial_model_for_weight_conversion=init_dir)``
writes that adapter, given ``init_dir`` holding the adapter as saved right
after initialization (PEFT's workflow). As in PEFT:

* ``A' = [A; A0]`` (rows), ``B' = [B, -B0]`` (columns);
* ``r``, ``lora_alpha`` (×√2 with rsLoRA, so ``alpha/√r`` stays), and every
  ``rank_pattern`` / ``alpha_pattern`` value doubled; ``init_lora_weights=True``;
* ``init_dir``'s config is rewritten with ``init_lora_weights=True``, so that
  loading it never re-runs the decomposition on the original base;
* rsLoRA together with ``rank_pattern``/``alpha_pattern`` is refused (PEFT
  does too: doubling an ``alpha_pattern`` entry under rsLoRA would need ×√2).

Differences: tensors other than A and B (``modules_to_save`` copies) are kept
instead of dropped, and DoRA adapters are refused (a magnitude is not a
difference of factors).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

__all__ = ["check_convertible", "converted_config", "converted_state", "initial_state", "mark_initial_config"]


def check_convertible(config, init_dir: Optional[str]) -> Optional[str]:
    """Why ``config``'s adapter cannot be converted against ``init_dir`` (``None`` if it can).

    ``init_dir=None``: the initial factors are the ones kept in memory (the HF export).
    """
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        return ("path_initial_model_for_weight_conversion cannot be used with use_rslora=True together with "
                "rank_pattern or alpha_pattern (as in PEFT); drop the patterns or use_rslora")
    if config.use_dora:
        return ("path_initial_model_for_weight_conversion cannot convert a DoRA adapter (use_dora=True): its "
                "magnitude is not a difference of LoRA factors; save it without the conversion")
    from ..checkpoint import ADAPTER_WEIGHTS_NAME

    if init_dir is not None and not os.path.isfile(os.path.join(init_dir, ADAPTER_WEIGHTS_NAME)):
        return (f"path_initial_model_for_weight_conversion={init_dir!r} holds no {ADAPTER_WEIGHTS_NAME}; save the "
                "adapter there right after get_peft_model, before training")
    return None


def converted_state(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``A' = [A; A0]``, ``B' = [B, -B0]`` for every factor key; other tensors as they are.

    Raises:
        ValueError: When ``initial`` lacks a factor or holds another shape.
    """
    out = {}
    for key, value in trained.items():
        role = key.rsplit(".", 2)[-2] if key.endswith(".weight") else None
        if role not in ("lora_A", "lora_B"):
            out[key] = value
            continue
        start = initial.get(key)
        if start is None or start.shape != value.shape:
            found = None if start is None else tuple(start.shape)
            raise ValueError(f"the initial adapter has {key} of shape {found}, the trained one "
                             f"{tuple(value.shape)}: path_initial_model_for_weight_conversion must hold this "
                             "adapter as saved right after initialization")
        start = start.to(value.dtype)
        out[key] = torch.cat([value, start], 0) if role == "lora_A" else torch.cat([value, -start], 1)
    return out


def converted_config(config):
    """The config of the converted adapter: plain LoRA of doubled rank and the same scaling."""
    out = config.copy()
    out.init_lora_weights = True
    out.r = config.r * 2
    out.lora_alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    out.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    out.alpha_pattern = {k: 2 * v for k, v in (config.alpha_pattern or {}).items()}
    return out


def mark_initial_config(config, init_dir: str) -> None:
    """Rewrite ``init_dir``'s ``adapter_config.json`` with ``init_lora_weights=True`` (PEFT does the same)."""
    initial = config.copy()
    initial.init_lora_weights = True
    initial.inference_mode = True
    initial.save_pretrained(init_dir)


def initial_state(peft_model, adapter: str) -> dict[str, torch.Tensor]:
    """Collective over each TP group: the adapter's factors as initialized, full, PEFT keys (this stage's).

    Base-weight inits keep them on each layer (``initial_factors``); the HF
    export converts with them, since it has no initial adapter directory.
    """
    from ..adapter_entries import PREFIX
    from ..sharding import gather_full

    state = {}
    for _, layer in peft_model.base_model.lora_layers():
        start = layer.__dict__.get("initial_factors", {}).get(adapter)
        for entry in layer.tensors(adapter) if start is not None else ():
            if entry.role in start:
                full = gather_full(start[entry.role], entry.spec, entry.group)
                state[f"{PREFIX}{entry.global_name}.{entry.saved_key}"] = full.to("cpu", copy=True)
    return state
