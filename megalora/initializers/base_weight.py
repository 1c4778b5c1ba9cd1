"""The initializers that read (and rewrite) the base weight: which they are, and running them on a model.

``init_lora_weights`` = ``"pissa"``, ``"pissa_niter_N"``, ``"olora"`` or
``"loftq"``: the layer first gets placeholder factors (PEFT's default draw,
B = 0), then :func:`init_adapter_from_base` runs the method's math
(:mod:`~megalora.initializers.svd`, :mod:`~megalora.initializers.loftq`) on
each layer's full weight through :mod:`~megalora.initializers.distributed`
and rewrites the base weight: to ``W - scaling·B@A`` (PiSSA, OLoRA) or to the
dequantized weight (LoftQ).
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

from ..collectives import agree_or_raise
from .distributed import Decompose, Decomposition, init_from_full_weights
from .loftq import loftq
from .svd import olora, pissa, pissa_niter

__all__ = ["decomposer", "init_adapter_from_base", "reads_base_weight"]


def reads_base_weight(init: Any) -> bool:
    """Whether ``init_lora_weights`` is computed from (and rewrites) the base weight."""
    return init in ("pissa", "olora", "loftq") or pissa_niter(init) is not None


def _niter_seed(seed: int, global_name: str, adapter: str) -> int:
    """The seed of one layer's randomized SVD: from the base seed and the names only (layout-free)."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{global_name}|{adapter}|svd_lowrank".encode())) % (2**63 - 1)


def decomposer(init: Any, loftq_config: dict, seed: int) -> Decompose:
    """The :data:`~megalora.initializers.distributed.Decompose` callable of a base-weight init."""
    niter = pissa_niter(init)

    def run(layer, adapter: str, weight) -> Decomposition:
        r, scaling = layer.r[adapter], layer.scaling[adapter]
        if init == "olora":
            a, b, base = olora(weight, r, scaling)
        elif init == "loftq":
            a, b, base = loftq(weight, r, int(loftq_config.get("loftq_bits", 4)),
                               int(loftq_config.get("loftq_iter", 1)))
        else:
            a, b, base = pissa(weight, r, scaling, niter, _niter_seed(seed, layer.global_name, adapter))
        return Decomposition(a, b, base)

    return run


def init_adapter_from_base(lora_layers, adapter: str, config, seed: int) -> None:
    """Collective over the world: run ``config``'s base-weight init for ``adapter`` on every layer that has it.

    Args:
        lora_layers: This rank's LoRA layers.
        adapter: The adapter just injected (its placeholder factors exist).
        config: Its :class:`~megalora.config.LoraConfig`.
        seed: The base seed (seeds ``pissa_niter_N``'s randomized SVD).
    """
    jobs = [(layer, adapter) for layer in lora_layers if adapter in layer.lora_A]
    # Checked on every rank before the first message: a bad rank would otherwise hang the others.
    agree_or_raise(next(filter(None, (_rank_problem(layer, adapter, config) for layer, adapter in jobs)), None))
    init_from_full_weights(jobs, decomposer(config.init_lora_weights, config.loftq_config or {}, seed))
    for layer, _ in jobs:
        # Kept (adapter-sized, never saved) for exports that must apply to the original base.
        layer.__dict__.setdefault("initial_factors", {})[adapter] = {
            "A": layer.lora_A[adapter].weight.detach().clone(), "B": layer.lora_B[adapter].weight.detach().clone()}


def _rank_problem(layer, adapter: str, config) -> Optional[str]:
    """Why ``layer`` cannot take this init at its rank (``None`` if it can)."""
    r, limit = layer.r[adapter], min(layer.in_features, layer.out_features)
    if r > limit:
        return (f"init_lora_weights={config.init_lora_weights!r} needs r <= min(in_features, out_features) = {limit} "
                f"on {layer.global_name or type(layer.get_base_layer()).__name__}, got r={r}; lower r or set a "
                "smaller rank_pattern entry for it")
    return None
