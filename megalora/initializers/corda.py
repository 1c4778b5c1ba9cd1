"""CorDA (PEFT's ``init_lora_weights="corda"``) on plain and tensor/pipeline-parallel layers.

Two steps, as in PEFT:

1. :func:`preprocess_corda`, before ``get_peft_model``: forward hooks add up
   each target's input covariance while ``run_model`` runs the calibration
   data (through megatron-core's pipeline schedule under PP: each stage hooks
   its own layers). Each target layer is owned by one rank of its TP group,
   dealt round-robin, and only that rank builds its covariance: a
   row-parallel layer's input shards (or a sequence-parallel layer's
   sequence shards) are gathered onto it, so the covariance and PEFT's
   per-call ``|max|`` are those of the *full* input. Data-parallel replicas add
   their sums and counts onto one of them, also dealt round-robin, so the
   decompositions are spread over the TP and DP ranks. That owner gathers the
   full weight (one at a time), damps and inverts the covariance, and keeps the
   top (``ipm``) or bottom (``kpm``) ``r`` singular triplets of ``W @ C``.
2. ``get_peft_model`` with ``init_lora_weights="corda"`` calls
   :func:`corda_init` on each layer: the owner builds the full
   ``A = sqrt(S/scaling)·Vᵀ`` and ``B = U·sqrt(S/scaling)``, broadcasts them
   to the other replicas and over the TP group (adapter-sized messages), and
   every rank rewrites its own base shard
   ``W_k ← W_k − scaling·B_k @ A_k``. That is the owner's ``W − scaling·B@A``
   sliced, since an entry of ``B@A`` depends only on its row of ``B`` and
   column of ``A``; so no weight shard travels.

Not supported (refused): ``cache_file``/``covariance_file`` under
``torch.distributed`` with more than one rank, and ``hooked_model``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import lora_math
from ..collectives import agree_or_raise, all_reduce_sum, broadcast_object, group_rank, group_size
from ..parallel_groups import process_groups
from ..sharding import gather_full
from ..layers.tensors import model_tensor_spec
from .distributed import rewrite_base_shard
from .calibration import check_supported, eval_mode, full_input, input_split

CORDA_DEFAULTS = dict(cache_file=None, covariance_file=None, corda_method="ipm", verbose=False,
                      use_float16_for_covariance=False, prune_temporary_fields=True)


@dataclass
class CordaEigens:
    """The kept singular triplets of ``W @ C`` (PEFT's names): ``S [r]``, ``U [out, r]``, ``V [in, r]``."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


@dataclass
class _CordaState:
    """What one target layer carries between the hooks and ``get_peft_model``."""

    owner: int  # the TP rank that builds the covariance (in every replica)
    rank: int
    group: Any  # the layer's TP group
    dp: Any = None  # its data-parallel group
    dp_owner: int = 0  # the replica whose owner decomposes and sends the factors
    covariance: Any = 0
    sample_count: int = 0


def corda_settings(config) -> dict:
    """``config.corda_config`` as a dict with PEFT's defaults filled in."""
    sub = config.corda_config
    if sub is None:
        sub = {}
    elif dataclasses.is_dataclass(sub):
        sub = dataclasses.asdict(sub)
    unknown = set(sub) - set(CORDA_DEFAULTS)
    if unknown:
        raise ValueError(f"corda_config: unknown field(s) {sorted(unknown)}; known: {sorted(CORDA_DEFAULTS)}")
    return {**CORDA_DEFAULTS, **sub}


def _chunks(model) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]


def _targets(model, config):
    from ..layers import megatron_core_module
    from ..targeting import ModelChunks, find_targets

    root = ModelChunks(model) if isinstance(model, (list, tuple)) else model
    return find_targets(root, config, megatron_core_module(config.megatron_core))


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def preprocess_corda(model, lora_config, run_model: Optional[Callable[[], None]] = None,
                     hooked_model: Optional[nn.Module] = None) -> None:
    """PEFT's ``preprocess_corda``: compute and attach each target layer's CorDA eigens.

    Collective over all ranks. Call it on every rank with the same config,
    before :func:`megalora.get_peft_model`; ``run_model`` runs the calibration
    forwards (the same data on the ranks of a TP group, as megatron-core needs;
    data-parallel replicas may see different data, and their statistics are
    added). Under PP, ``run_model`` runs megatron-core's schedule (e.g.
    ``forward_only=True``) so that every stage sees its layers' inputs.

    Args:
        model: A model, or a stage's list of virtual-pipeline chunks.
        lora_config: The :class:`~megalora.config.LoraConfig` that
            ``get_peft_model`` will get (``init_lora_weights="corda"``).
        run_model: Runs the model on the calibration data.
        hooked_model: PEFT's option to hook another model; not supported.

    Raises:
        ValueError: A bad ``corda_config``, a layer CorDA cannot calibrate,
            or ``run_model`` missing; raised on every rank.
    """
    settings = corda_settings(lora_config)
    if hooked_model is not None and hooked_model is not model:
        raise NotImplementedError("preprocess_corda: hooked_model is not supported; leave it None")
    if _world() > 1 and (settings["cache_file"] or settings["covariance_file"]):
        raise NotImplementedError("corda_config.cache_file/covariance_file are not supported under torch.distributed "
                                  "with more than one rank; set them to None")
    targets = _targets(model, lora_config)
    cache = settings["cache_file"]
    if cache is not None and os.path.exists(cache) and os.path.getsize(cache) > 0:
        stored = torch.load(cache)
        for t in targets:
            _base(t.module)._corda = _CordaState(owner=0, rank=t.r, group=None)
            _base(t.module).eigens = CordaEigens(*(stored[f"{t.global_name}.eigens.{k}"]
                                                   for k in ("S_WC", "U_WC", "V_WC")))
        return
    if settings["corda_method"] not in ("ipm", "kpm"):
        raise ValueError(f"corda_config.corda_method={settings['corda_method']!r} is invalid; use 'ipm' or 'kpm'")
    problem = next((p for t in targets if (p := check_supported(t.global_name, t.module, "corda"))), None)
    agree_or_raise(problem)
    pgs = process_groups() if _world() > 1 else None
    dp = pgs.dp_cp if pgs is not None else None
    for i, t in enumerate(targets):
        group = _weight_group(_base(t.module))
        # Round-robin over the TP and DP ranks: each builds and decomposes its share.
        j = i % (group_size(group) * group_size(dp))
        _base(t.module)._corda = _CordaState(owner=j % group_size(group), rank=t.r, group=group, dp=dp,
                                      dp_owner=j // group_size(group))
    _calibrate(model, targets, settings, run_model)
    _collect_eigens(targets, settings)
    if cache is not None:  # world size 1 here: this process owns every layer
        os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
        torch.save({f"{t.global_name}.eigens.{k}": getattr(_base(t.module).eigens, k)
                    for t in targets for k in ("S_WC", "U_WC", "V_WC")}, cache)


def _base(module: nn.Module) -> nn.Module:
    """The layer that carries CorDA's state: the base of a LoRA layer (hooks stay on the LoRA layer,
    whose forward may run the base matmul itself), else the module."""
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def _weight_group(module: nn.Module):
    spec, group = input_split(module)
    if group is not None:
        return group
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(weight, "tensor_model_parallel", False):
        from ..layers.parallel import _tp_group

        return _tp_group(module)
    return None


def _calibrate(model, targets, settings, run_model) -> None:
    """Run ``run_model`` with covariance hooks on every target; add up over data-parallel replicas."""
    cov_file = settings["covariance_file"]
    if cov_file is not None and os.path.exists(cov_file) and os.path.getsize(cov_file) > 0:
        stored = torch.load(cov_file)
        for t in targets:
            _base(t.module)._corda.covariance = stored[t.global_name]
        return
    if run_model is None:
        raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
    handles = [t.module.register_forward_hook(_covariance_hook(settings)) for t in targets]
    try:
        with eval_mode(_chunks(model)):
            run_model()
    finally:
        for handle in handles:
            handle.remove()
    problem = None
    for t in targets:
        state = _base(t.module)._corda
        if group_rank(state.group) != state.owner:
            continue
        dp = state.dp
        if group_size(dp) > 1:
            # The owners of a layer in every replica sit at the same TP rank of the same stage;
            # the sums go to the one that decomposes.
            device = _base(t.module).weight.device  # NCCL reduces device tensors only
            count = torch.tensor([float(state.sample_count)], dtype=torch.float64, device=device)
            all_reduce_sum(count, dp)
            if not torch.is_tensor(state.covariance):  # this replica never ran the layer
                n = getattr(_base(t.module), "input_size", None) or getattr(_base(t.module), "in_features")
                state.covariance = torch.zeros(n, n, device=device)
            dist.reduce(state.covariance, dist.get_global_rank(dp, state.dp_owner), group=dp)
            state.sample_count = int(count.item())
            if group_rank(dp) != state.dp_owner:
                state.covariance = None
        if state.sample_count == 0:
            problem = problem or f"CorDA: run_model never ran {t.global_name}; check the calibration forwards"
        elif state.covariance is not None:
            state.covariance /= state.sample_count  # PEFT's mean over forward calls
    agree_or_raise(problem)
    if cov_file is not None:  # world size 1 here
        os.makedirs(os.path.dirname(cov_file) or ".", exist_ok=True)
        torch.save({t.global_name: _base(t.module)._corda.covariance for t in targets}, cov_file)


def _covariance_hook(settings):
    def hook(module, inputs, output):
        state = _base(module)._corda
        x = full_input(module, inputs[0], dst=state.owner)
        if x is None:
            return
        x = x.detach().reshape(-1, x.shape[-1])  # megatron's [s, b, h] (or PEFT's [1, s, h]) to tokens
        if not settings["use_float16_for_covariance"]:
            x = x.float()
        x = x / torch.max(x).abs()  # PEFT's scale: |max|, not max|.|
        if torch.isnan(x).any() or torch.isinf(x).any():
            raise ValueError("Invalid value found in input, please check your input data.")
        covariance = x.t().matmul(x)
        if torch.isnan(covariance).any() or torch.isinf(covariance).any():
            raise ValueError("Invalid value found in covariance.")
        state.sample_count += 1
        state.covariance = state.covariance + covariance

    return hook


def _full_weight_oi(module: nn.Module, global_name: str, owner: int, group) -> Optional[torch.Tensor]:
    """Collective over ``group``: the full ``[out, in]`` base weight on ``owner`` only."""
    weight = module.weight
    spec = model_tensor_spec(module, global_name, weight)
    full = gather_full(weight.detach(), spec, group if spec.sharded else None, dst=owner if spec.sharded else None)
    if full is None or group_rank(group) != owner:
        return None
    from ..layers.plain import is_conv1d

    return full.T if is_conv1d(module) else full


def _collect_eigens(targets, settings) -> None:
    """On each layer's owner: PEFT's ``collect_eigens_for_layer`` and crop; fields pruned as PEFT does."""
    for t in targets:
        state = _base(t.module)._corda
        if group_rank(state.dp) != state.dp_owner:
            continue  # another replica's TP group decomposes this layer
        w = _full_weight_oi(_base(t.module), t.global_name, state.owner, state.group)
        if w is not None:
            _base(t.module).eigens = _crop(eigens_for(w.float(), state.covariance.float()), state.rank,
                                    settings["corda_method"])
        del w
        state.covariance = None


def eigens_for(w: torch.Tensor, covariance: torch.Tensor) -> CordaEigens:
    """PEFT's damped inverse and SVD of ``W @ C``: ``V = (Vᴴ @ C⁻¹)ᵀ``, all ``min(out, in)`` triplets."""
    n = covariance.size(0)
    eye = torch.eye(n, device=covariance.device)
    damp = 0.01
    while True:
        compensate = torch.diag(torch.ones(n, device=covariance.device) * torch.mean(torch.diag(covariance)) * damp)
        fixed = covariance + compensate
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    return CordaEigens(S_WC=s, U_WC=u, V_WC=(vh @ inverse).transpose(0, 1))


def _crop(eigens: CordaEigens, r: int, method: str) -> CordaEigens:
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    return CordaEigens(S_WC=eigens.S_WC[keep].clone(), U_WC=eigens.U_WC[:, keep].clone(),
                       V_WC=eigens.V_WC[:, keep].clone())


@torch.no_grad()
def corda_init(layer, adapter: str) -> None:
    """Collective over the layer's TP group: CorDA's factors from the owner, and ``W ← W − scaling·B@A``.

    Called by :meth:`LoraLayer.update_layer` after the (placeholder) factors
    are in place, on every rank of the TP group.
    """
    base = layer.get_base_layer()
    state = getattr(base, "_corda", None)
    if state is None:
        raise ValueError(f"{layer.global_name}: `eigens` not found; run megalora.preprocess_corda(model, config, "
                         "run_model=...) with this config before get_peft_model (to load a trained CorDA adapter "
                         "onto its residual base, save/load it with init_lora_weights=True, as PEFT does)")
    r, scaling = layer.r[adapter], layer.scaling[adapter]
    in_full, out_full = layer._full_features()
    owner = state.owner if group_size(layer.tp_group) > 1 else 0
    device = layer.base_weight_oi().device  # NCCL broadcasts device tensors only
    a = torch.empty(r, in_full, device=device)
    b = torch.empty(out_full, r, device=device)
    problem = None
    tp_owner = group_rank(layer.tp_group) == owner
    if tp_owner and group_rank(state.dp) == state.dp_owner:
        eig = base.eigens
        u, s, v = eig.U_WC, eig.S_WC.clone(), eig.V_WC
        if u.shape != (out_full, r) or s.shape != (r,) or v.shape != (in_full, r):
            problem = (f"{layer.global_name}: CorDA eigens have rank {s.numel()}, the adapter r={r}; use the same "
                       "config (r, rank_pattern) in preprocess_corda and get_peft_model")
        elif any(torch.isnan(t).any() or torch.isinf(t).any() for t in (u, s, v)):
            problem = f"{layer.global_name}: invalid value in the CorDA eigens"
        else:
            s /= scaling
            a = v.t().mul(s.sqrt().view(-1, 1)).contiguous().float().to(device)
            b = u.mul(s.sqrt()).contiguous().float().to(device)
    if tp_owner and group_size(state.dp) > 1:
        # The decomposing replica's owner to the owners of the other replicas, then each over its TP group.
        problem = broadcast_object(problem, src=state.dp_owner, group=state.dp)
        if problem is None:
            root = dist.get_global_rank(state.dp, state.dp_owner)
            dist.broadcast(a, root, group=state.dp)
            dist.broadcast(b, root, group=state.dp)
    if group_size(layer.tp_group) > 1:
        agree_or_raise(problem, layer.tp_group)
        root = dist.get_global_rank(layer.tp_group, owner)
        dist.broadcast(a, root, group=layer.tp_group)
        dist.broadcast(b, root, group=layer.tp_group)
    elif problem:
        raise ValueError(problem)
    factors = layer._factor_tensors(adapter)
    for entry, full in zip(factors, (a, b)):
        entry.param.data = layer.local(full, entry.spec).to(entry.param.dtype)
    a_local, b_local = factors[0].param.data, factors[1].param.data
    # In place, and copy-on-write for a base weight that layer_replication shares.
    rewrite_base_shard(layer, layer.base_weight_oi().float() - lora_math.delta_weight(a_local.float(),
                                                                                     b_local.float(), scaling))
    # Kept (adapter-sized, never saved) for the HF export, which converts to the original base.
    layer.__dict__.setdefault("initial_factors", {})[adapter] = {"A": a_local.clone(), "B": b_local.clone()}
    for attr in ("eigens", "_corda"):
        if hasattr(base, attr):
            delattr(base, attr)
