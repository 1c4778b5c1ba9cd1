"""Delta-weight arithmetic: ``add_weighted_adapter`` and the task-merging methods.

Every method works on *full* tensors: each factor is gathered across its
TP group first (``[r, in]`` or ``[out, r]``: small), the math runs identically
on every rank, and each rank keeps its slice of the result. So TP=2 gives the
same adapter as TP=1, and a random mask (DARE) is the same on every rank of a
group because all ranks draw it from the same generator state on the same full
shape: with DARE, every rank first takes its TP (and DP) group's rank-0 global
RNG state.

Which methods need a layer's full ``ΔW = Σ scale·B@A``:

* ``svd`` does not: ΔW is the product of two concatenated factors, so it is
  decomposed through a QR of each factor and the SVD of a small ``R×R`` core
  (``R`` = the sum of the ranks). With ``svd_clamp`` it does, because the
  clamp's quantile depends on the singular vectors' signs, which then must be
  LAPACK's on the full ΔW, as in PEFT.
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd`` and
  ``magnitude_prune_svd`` do: their pruning and sign election act on ΔW's
  entries. They build the full ΔW of the layer (from gathered factors), as
  PEFT does.
* ``linear``, ``cat``, ``ties``, ``dare_*`` and ``magnitude_prune`` act on the
  factors only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional, Sequence

import torch

from .collectives import sync_rng_state
from .initializers.base_weight import reads_base_weight
from .parallel_groups import replica_groups
from .sharding import gather_full
from . import lora_math
from .layers import LoraLayer

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


# ---------------------------------------------------------------------- task arithmetic


def _prune(tensor: torch.Tensor, density: Optional[float], method: str, rescale: bool = False) -> torch.Tensor:
    if density is None:
        raise ValueError("density is required by this combination_type; pass a value in [0, 1]")
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return tensor
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    if method == "magnitude":
        keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
        return tensor * keep.reshape(tensor.shape)
    mask = torch.bernoulli(torch.full_like(tensor, density))
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    return sign == torch.where(votes >= 0, 1, -1)


def _disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def combine(
    method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density=None, majority_sign_method="total"
) -> torch.Tensor:
    """Merge same-shaped task tensors with one of PEFT's methods (the ``_svd`` suffix stripped)."""
    if method in ("linear", "svd"):
        return _weighted(torch.stack(tensors), weights).sum(dim=0)
    if method == "magnitude_prune":
        pruned = [_prune(t, density, "magnitude") for t in tensors]
        return _weighted(torch.stack(pruned), weights).sum(dim=0)
    if method == "dare_linear":
        pruned = [_prune(t, density, "random", rescale=True) for t in tensors]
        return _weighted(torch.stack(pruned), weights).sum(dim=0)
    if method in ("ties", "dare_ties"):
        kind = "magnitude" if method == "ties" else "random"
        stacked = torch.stack([_prune(t, density, kind, rescale=kind == "random") for t in tensors])
        mask = _majority_sign_mask(stacked, majority_sign_method)
        return _disjoint_merge(_weighted(stacked, weights), mask)
    raise ValueError(f"Invalid combination_type: {method}")


# ---------------------------------------------------------------------- low-rank SVD


def low_rank_svd(b: torch.Tensor, a: torch.Tensor, rank: int, full_matrices: bool = True, driver=None):
    """SVD of ``b @ a`` truncated to ``rank``, without forming the product.

    ``b = Qb Rb`` and ``aᵀ = Qa Ra``, so ``b @ a = Qb (Rb Raᵀ) Qaᵀ``; the SVD of
    the small core gives the singular vectors. Returns ``(U·S, Vh)`` like the
    full SVD (each singular pair may differ in sign from LAPACK's choice on the
    full matrix; their product does not).
    """
    del full_matrices, driver  # the core is square and small: one reduced SVD serves
    qb, rb = torch.linalg.qr(b.float())
    qa, ra = torch.linalg.qr(a.float().T)
    uc, s, vhc = torch.linalg.svd(rb @ ra.T)
    u = qb @ uc
    vh = vhc @ qa.T
    k = min(rank, s.numel())
    u, s, vh = u[:, :k], s[:k], vh[:k]
    if k < rank:  # keep the asked-for rank; the extra directions carry zero
        u = torch.cat([u, u.new_zeros(u.shape[0], rank - k)], dim=1)
        s = torch.cat([s, s.new_zeros(rank - k)])
        vh = torch.cat([vh, vh.new_zeros(rank - k, vh.shape[1])], dim=0)
    return u * s, vh


def _clamp(u: torch.Tensor, vh: torch.Tensor, clamp: Optional[float]):
    if clamp is None:
        return u, vh
    hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
    return u.clamp(-hi, hi), vh.clamp(-hi, hi)


# ---------------------------------------------------------------------- the API


def _check(lora_model, adapters, combination_type, svd_rank):
    configs = lora_model.peft_config
    for adapter in adapters:
        if adapter not in configs:
            raise ValueError(f"Adapter {adapter} does not exist")
        if configs[adapter].target_parameters:
            raise ValueError(f"add_weighted_adapter does not support target_parameters (adapter {adapter!r})")
        if configs[adapter].use_qalora:
            raise ValueError(f"add_weighted_adapter does not support use_qalora=True (adapter {adapter!r}): its ΔW "
                             "is not B @ A on the layer's input; merge it with merge_adapter instead")
    wrappers = [w for _, w in lora_model.saved_module_wrappers()]
    if any(sum(a in w.modules_to_save for a in adapters) > 1 for w in wrappers):
        raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save")
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = [max([c.r, *c.rank_pattern.values()]) if c.rank_pattern else c.r for c in (configs[a] for a in adapters)]
    if combination_type in FACTOR_METHODS:
        if len(set(ranks)) != 1:
            raise ValueError(
                "All adapters must have the same r value when using combination_type linear, ties, dare_ties, "
                "dare_linear or magnitude_prune; use 'cat' or an '_svd' type for different ranks"
            )
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type in SVD_METHODS:
        new_rank = svd_rank or max(ranks)
    else:
        raise ValueError(f"Invalid combination_type: {combination_type}")
    kinds = {isinstance(configs[a].target_modules, str) for a in adapters}
    if len(kinds) > 1:
        raise ValueError("all adapter configs should follow the same target modules type (all str or all lists)")
    if kinds.pop():
        targets = "|".join(f"({configs[a].target_modules})" for a in adapters)
    else:
        targets = set()
        for a in adapters:
            targets |= set(configs[a].target_modules)
    return combination_type, new_rank, targets


def _full_factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = gather_full(layer.lora_A[adapter].weight.detach(), layer.a_spec, layer.tp_group)
    b = gather_full(layer.lora_B[adapter].weight.detach(), layer.b_spec, layer.tp_group)
    return a, b


def _combine_layer(layer, adapters, weights, new_rank, method, opts) -> tuple[torch.Tensor, torch.Tensor]:
    """Full ``(A, B)`` of the combined adapter on one layer."""
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
    if not present:
        raise ValueError("No matching LoRAs found for add_weighted_adapter on a layer that has the new adapter")
    factors = {a: _full_factors(layer, a) for a, _ in present}
    in_f, out_f = layer.in_features, layer.out_features
    if method == "cat":
        a_new = torch.zeros(new_rank, in_f, dtype=factors[present[0][0]][0].dtype)
        b_new = torch.zeros(out_f, new_rank, dtype=a_new.dtype)
        a_cat = torch.cat([factors[a][0] * w * layer.scaling[a] for a, w in present], dim=0)
        b_cat = torch.cat([factors[a][1] for a, _ in present], dim=1)
        a_new[: a_cat.shape[0]] = a_cat
        b_new[:, : b_cat.shape[1]] = b_cat
        return a_new, b_new
    if method in FACTOR_METHODS:
        signed = [w * layer.scaling[a] for a, w in present]
        w_a = torch.tensor([math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in signed])
        w_b = torch.tensor([math.sqrt(abs(s)) for s in signed])
        dtype = factors[present[0][0]][0].dtype
        a_new = combine(method, [factors[a][0] for a, _ in present], w_a, opts["density"], opts["majority"])
        b_new = combine(method, [factors[a][1] for a, _ in present], w_b, opts["density"], opts["majority"])
        return a_new.to(dtype), b_new.to(dtype)
    # SVD family: ΔW = Σ w·s·B@A.
    weight_t = torch.tensor([w for _, w in present])
    if method == "svd" and opts["clamp"] is None:
        b_cat = torch.cat([factors[a][1].float() * w * layer.scaling[a] for a, w in present], dim=1)
        a_cat = torch.cat([factors[a][0].float() for a, _ in present], dim=0)
        u, vh = low_rank_svd(b_cat, a_cat, new_rank)
    else:
        # svd_clamp's quantile depends on the signs of the singular vectors, so "svd" with a
        # clamp takes PEFT's route (an SVD of the full ΔW) to get LAPACK's signs as PEFT does.
        # The task tensors are in the base weight's layout as in PEFT (transposed for
        # fan_in_fan_out): DARE's masks are drawn in that layout.
        deltas = [layer._to_base_layout(lora_math.delta_weight(*factors[a], layer.scaling[a])) for a, _ in present]
        base_method = "linear" if method == "svd" else method[: -len("_svd")]
        delta = combine(base_method, deltas, weight_t.to(deltas[0].dtype), opts["density"], opts["majority"])
        delta = layer._to_base_layout(delta)  # back to [out, in]
        u_full, s, vh = torch.linalg.svd(delta, full_matrices=opts["full_matrices"], driver=opts["driver"])
        u, vh = u_full[:, :new_rank] @ torch.diag(s[:new_rank]), vh[:new_rank]
    u, vh = _clamp(u, vh, opts["clamp"])
    return vh, u


@torch.no_grad()
def _advance_rng_like_peft(lora_model, adapter_name: str, config) -> None:
    """Draw from the global CPU RNG what PEFT's ``inject_adapter`` draws for the new adapter.

    PEFT builds each new layer's ``lora_A``/``lora_B`` as ``nn.Linear`` (default init:
    ``A [r, in]``, ``B [out, r]`` and B's bias) and then re-initialises them, all from
    the global generator, before it draws any DARE mask. megalora's init draws
    nothing from it, so without this the same ``torch.manual_seed`` would give
    other masks than PEFT's. Full (unsharded) shapes, layers in module order.
    """
    init = config.init_lora_weights
    for _, layer in lora_model.lora_layers():
        if adapter_name not in layer.lora_A:
            continue
        r, in_f, out_f = layer.r[adapter_name], layer.in_features, layer.out_features
        torch.empty(r, in_f).uniform_()
        torch.empty(out_f, r).uniform_()
        if config.lora_bias:
            torch.empty(out_f).uniform_()
        if init is True:
            torch.empty(r, in_f).uniform_()
        elif isinstance(init, str) and init.lower() == "gaussian":
            torch.empty(r, in_f).normal_()
        elif init == "orthogonal":
            torch.randn(r, r), torch.randn(in_f, r // 2), torch.randn(r // 2, out_f)


def add_weighted_adapter(
    lora_model,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
) -> None:
    """Add ``adapter_name`` as a weighted combination of ``adapters`` (PEFT's semantics).

    Collective under TP: every rank of a TP group must call it. The new
    adapter's ``lora_alpha`` equals its rank, and it is frozen, as in PEFT.
    Weights may be negative. See the module docstring for which methods build
    the full ΔW.
    """
    if adapter_name in lora_model.peft_config:
        return
    if len(weights) != len(adapters):
        raise ValueError(f"weights has {len(weights)} entries but adapters has {len(adapters)}; give one each")
    method, new_rank, targets = _check(lora_model, list(adapters), combination_type, svd_rank)
    base_config = lora_model.peft_config[adapters[0]]
    new_config = dataclasses.replace(
        base_config, r=new_rank, lora_alpha=new_rank, target_modules=targets, alpha_pattern={}, rank_pattern={}
    )
    if reads_base_weight(new_config.init_lora_weights) or new_config.init_lora_weights in ("corda", "eva"):
        # The combined factors are computed below on top of the current base: a PiSSA/OLoRA/LoftQ
        # decomposition now would rewrite that base a second time (PEFT does, and breaks the model);
        # CorDA's eigens are gone after its init, and EVA's data pass is not re-run.
        new_config = dataclasses.replace(new_config, init_lora_weights=True, loftq_config={})
    lora_model.inject_adapter(adapter_name, new_config)
    if method.startswith("dare"):
        # Every replica of a tensor (TP and DP ranks of a stage) must draw the
        # same masks, whatever each rank drew from its generator before.
        sync_rng_state(replica_groups())
        _advance_rng_like_peft(lora_model, adapter_name, new_config)
    opts = dict(
        density=density, majority=majority_sign_method, clamp=svd_clamp, full_matrices=svd_full_matrices,
        driver=svd_driver,
    )
    for _, layer in lora_model.lora_layers():
        if adapter_name not in layer.lora_A:
            continue
        a_full, b_full = _combine_layer(layer, list(adapters), list(weights), new_rank, method, opts)
        with torch.no_grad():
            a_param, b_param = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            a_param.copy_(layer.local(a_full, layer.a_spec).to(a_param.dtype))
            b_param.copy_(layer.local(b_full, layer.b_spec).to(b_param.dtype))
        for container in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
            if adapter_name in container:
                container[adapter_name].requires_grad_(False)
