"""Copies of a replicated layer share base weights until a merge writes into them.

``layer_replication`` (:mod:`megalora.replication`) gives layer copies on one
stage the same base ``Parameter`` objects, marked with :data:`SHARED_ATTR`.
Copies have different LoRA deltas, so a merge first gives the copy private
weights (copy-on-merge) and an unmerge or unload puts the shared ones back.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

# Set on a base parameter that several layer copies use.
SHARED_ATTR = "megalora_replica_shared"


def unshare_for_merge(layer: nn.Module, adapter_names: Optional[Sequence[str]] = None) -> None:
    """Give a LoRA layer's base private copies of its shared weights (copy-on-merge).

    Called before ``layer.merge(adapter_names=...)``; does nothing when that
    merge would not write (no unmerged adapter to merge) or the weights are not
    shared. The shared originals are kept on the layer for :func:`restore_shared`.
    """
    names = layer.active_adapters if adapter_names is None else list(adapter_names)
    names = [n for n in names if n in layer.lora_A and n not in layer.merged_adapters]
    if not names:
        return
    base = layer.get_base_layer()
    kept = layer.__dict__.setdefault("_megalora_shared_base", {})
    for name in ["weight"] + (["bias"] if any(layer.lora_bias.get(n) for n in names) else []):
        param = base._parameters.get(name)
        if param is None or not getattr(param, SHARED_ATTR, False) or name in kept:
            continue
        private = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        private.__dict__.update({k: v for k, v in param.__dict__.items() if k != SHARED_ATTR})
        kept[name] = param
        base._parameters[name] = private


def restore_shared(layer: nn.Module) -> None:
    """Put back the shared base weights that :func:`unshare_for_merge` set aside.

    Only on a fully unmerged layer: the originals were never written, so this
    also drops the rounding an unmerge leaves behind.
    """
    if layer.merged:
        return
    kept = layer.__dict__.pop("_megalora_shared_base", {})
    base = layer.get_base_layer()
    for name, param in kept.items():
        base._parameters[name] = param
