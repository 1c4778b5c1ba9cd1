"""EVA (PEFT's ``init_lora_weights="eva"``) on plain and tensor/pipeline-parallel layers.

After ``get_peft_model`` (A drawn as PEFT's default, B = 0),
:func:`initialize_lora_eva_weights` runs the data through the model with the
adapters disabled; a hook on every LoRA layer runs PEFT's incremental, centred
PCA on the layer's inputs until each needed component's cosine with its
previous estimate reaches ``tau``. The ranks are then redistributed over all
layers by explained variance (``rho``): a layer may get rank 0 (its LoRA is
removed) and ``alpha`` follows ``new_r / r``. A becomes the top components;
``rank_pattern``, ``alpha_pattern`` and ``target_modules`` are rewritten, with
global names, so the saved adapter reloads at any layout.

Distribution: a hook first rebuilds the layer's full input over its TP group
(row-parallel shards; sequence-parallel shards), then gathers the tokens of the
data-parallel replicas (``gather_distributed_inputs``), so every rank that
holds a layer sees the same rows and runs the same seeded PCA. The loop's stop
test and the rank budget span the whole model (every pipeline stage): one small
world collective per batch agrees on both, so all ranks run the same number of
forwards. Layers with equal inputs are detected per stage, as PEFT does per model.

Megatron's activations are ``[s, b, h]``: :func:`prepare_layer_inputs_fn_megatron`
(the default) reads them as ``[b, s, h]`` so that the ``[b, s]`` token mask of
:func:`prepare_model_inputs_fn_megatron` applies (on a plain layer the default
falls back to PEFT's ``[b, s, h]`` function). ``forward_fn`` runs the model on
one batch; under PP it runs megatron-core's schedule, and every stage's
dataloader yields the batch (the hooks need its mask).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping
from itertools import cycle
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..collectives import all_gather_objects
from ..targeting import pattern_value
from .calibration import check_supported, eval_mode
from .eva_hooks import (HashHook, SVDHook, _prepare_default, forward_fn_dict,  # noqa: F401 (PEFT's names)
                        prepare_layer_inputs_fn_language_modeling, prepare_layer_inputs_fn_megatron,
                        prepare_model_inputs_fn_megatron)

EVA_DEFAULTS = dict(rho=2.0, tau=0.99, use_label_mask=True, label_mask_value=-100, whiten=False,
                    adjust_scaling_factors=True)


def eva_settings(config) -> dict:
    """``config.eva_config`` as a dict with PEFT's defaults filled in, checked as PEFT does."""
    import dataclasses

    sub = config.eva_config
    sub = {} if sub is None else dataclasses.asdict(sub) if dataclasses.is_dataclass(sub) else dict(sub)
    unknown = set(sub) - set(EVA_DEFAULTS)
    if unknown:
        raise ValueError(f"eva_config: unknown field(s) {sorted(unknown)}; known: {sorted(EVA_DEFAULTS)}")
    out = {**EVA_DEFAULTS, **sub}
    if out["rho"] < 1.0:
        raise ValueError(f"eva_config.rho must be >= 1.0, got {out['rho']}")
    if not 0.0 <= out["tau"] <= 1.0:
        raise ValueError(f"eva_config.tau must be between 0.0 and 1.0, got {out['tau']}")
    return out


# ---------------------------------------------------------------------------- the computation


def _world_all(flag: bool) -> bool:
    """Collective over the world: whether ``flag`` holds on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _merged(parts) -> dict:
    """Rank-ordered union of per-rank dicts (stage 0's layers first: PEFT's model order under PP)."""
    out = {}
    for part in parts:
        for k, v in part.items():
            out.setdefault(k, v)
    return out


def _rank_distribution(hooks, layer_hook_map, equal_inputs_map, rank_budget, max_components) -> dict:
    """PEFT's ``_get_rank_distribution`` over every layer of the model (``layer_hook_map``: all stages')."""
    exp_vars = _merged(all_gather_objects({k: h.svd.explained_variance_ratio_[: max_components[k]]
                                           for k, h in hooks.items()}))
    keys, values = zip(*[(k, c) for k, name in layer_hook_map.items() for c in exp_vars[name]])
    idx = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in idx[:rank_budget]])
    counts = {k: counts.get(k, 0) for k in layer_hook_map}
    for k, k_hook in equal_inputs_map.items():
        rank, rank_hook = counts[k], counts[k_hook]
        if rank_hook < rank:
            counts[k_hook], counts[k] = rank, rank_hook
    return counts


def _eva_targets(model, adapter_name):
    from ..layers import LoraLayer

    return [(m.global_name, m) for _, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


@torch.no_grad()
def get_eva_state_dict(model, dataloader, peft_config=None, forward_fn: Optional[Callable] = forward_fn_dict,
                       prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_megatron,
                       prepare_layer_inputs_fn=prepare_layer_inputs_fn_megatron, adapter_name: str = "default",
                       gather_distributed_inputs: bool = True, show_progress_bar: bool = True) -> dict:
    """PEFT's ``get_eva_state_dict``: each LoRA layer's EVA components, keyed by global name.

    Collective over all ranks. ``model`` is a megalora ``PeftModel`` (its
    adapters are disabled meanwhile). Returns this rank's layers' full
    ``[new_rank, in]`` components (``show_progress_bar`` is accepted and ignored).
    """
    if not hasattr(model, "peft_config"):
        raise ValueError("get_eva_state_dict: model must be a megalora PeftModel (call get_peft_model first)")
    config = peft_config or model.peft_config[adapter_name]
    settings = eva_settings(config)
    if len(dataloader) == 0:
        raise ValueError("dataloader is empty")
    targets = _eva_targets(model, adapter_name)
    problem = next((p for n, m in targets if (p := check_supported(n, m, "eva"))), None)
    from ..collectives import agree_or_raise

    agree_or_raise(problem)
    with model.disable_adapter(), eval_mode([model]):
        return _compute(model, dataloader, config, settings, targets, forward_fn, prepare_model_inputs_fn,
                        prepare_layer_inputs_fn, gather_distributed_inputs)


def _full_max_dim(model) -> int:
    """The largest dimension of any full (unsharded) parameter, over every stage."""
    local = 0
    for p in model.parameters():
        shape = list(p.shape)
        if getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) >= 0:
            from megatron.core import parallel_state as ps

            shape[p.partition_dim] *= ps.get_tensor_model_parallel_world_size()
        local = max(local, *shape) if shape else local
    return max(all_gather_objects(local))


def _compute(model, dataloader, config, settings, targets, forward_fn, prepare_model_inputs_fn,
             prepare_layer_inputs_fn, gather):
    rho = settings["rho"]
    if rho > 1000:  # PEFT's ceiling for unusually high rho
        rho = min(rho, _full_max_dim(model) // config.r)
    inputs = next(iter(dataloader))
    hook_input = prepare_model_inputs_fn(inputs, config) if prepare_model_inputs_fn else copy.deepcopy(inputs)
    fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    hooks, max_components, ranks = {}, {}, {}
    modules = dict(targets)
    for name, module in targets:
        fn = fns.pop(name, None) if fns is not None else prepare_layer_inputs_fn
        hook = HashHook(name, fn or _prepare_default, gather)
        hook.model_input = hook_input
        hooks[name] = (hook, module.register_forward_hook(hook))
        ranks[name] = int(pattern_value(config.rank_pattern, name, config.r))
        max_components[name] = round(ranks[name] * rho)
    if fns:
        raise ValueError("prepare_layer_inputs_fn is a mapping but the following module names were not found in "
                         f"the model: {fns.keys()}")
    # The budget is the sum of every layer's rank, over all stages.
    rank_budget = sum(_merged(all_gather_objects(ranks)).values())
    forward_fn(model, inputs)
    hash_dict = {k: h[0].hashed_inputs[0] for k, h in hooks.items()}
    groups = defaultdict(list)
    for k, v in hash_dict.items():
        groups[v].append(k)
    equal_inputs = [v for v in groups.values() if len(v) > 1]
    equal_inputs_map = {vv: v[0] for v in equal_inputs for vv in v[1:]}
    for names in equal_inputs:
        top = max(max_components[n] for n in names)
        for n in names:
            max_components[n] = top
    for name in list(hooks):
        hook, handle = hooks.pop(name)
        handle.remove()
        if name in equal_inputs_map:
            continue
        svd = SVDHook(name, hook.prepare_fn, gather, max_components[name], settings["tau"])
        hooks[name] = (svd, modules[name].register_forward_hook(svd))
    layer_hook_map = {**dict(zip(hooks, hooks)), **equal_inputs_map}
    model_hook_map = _merged(all_gather_objects(layer_hook_map))  # every stage's layers, in stage order
    convergence = {k: False for k in hooks}
    rank_dist = max_components.copy()
    for inputs in cycle(dataloader):
        hook_input = prepare_model_inputs_fn(inputs, config) if prepare_model_inputs_fn else copy.deepcopy(inputs)
        for name in list(hooks):
            hook, handle = hooks[name]
            converged = bool(torch.all(hook.converged[: rank_dist[name]]))
            if not convergence[name] and converged and handle:
                handle.remove()
                handle = None
                convergence[name] = True
                hooks[name] = (hook, handle)
                continue
            if convergence[name] and not converged:
                handle = modules[name].register_forward_hook(hook)
                convergence[name] = False
            hook.model_input = hook_input
            hooks[name] = (hook, handle)
        # Every rank stops together: a stage that went on alone would wait forever in the schedule.
        if _world_all(all(convergence.values())):
            break
        forward_fn(model, inputs)
        if not _world_all(all(hasattr(h[0].svd, "components_") for h in hooks.values())):
            continue
        rank_dist = _rank_distribution({k: h[0] for k, h in hooks.items()}, model_hook_map, equal_inputs_map,
                                       rank_budget, max_components)
    for hook, handle in hooks.values():
        if handle is not None:
            handle.remove()
    out = {}
    for name in layer_hook_map:
        rank = rank_dist[name]
        hook = hooks[layer_hook_map[name]][0]
        if not torch.all(hook.converged[:rank]):
            raise ValueError(f"Layer {name} has not converged but was assigned rank {rank}.")
        u = hook.svd.components_[:rank]
        if settings["whiten"]:
            u = u / hook.svd.singular_values_[:rank].sqrt().reshape(-1, 1)
        out[name] = u
    return out


# ---------------------------------------------------------------------------- loading


@torch.no_grad()
def load_eva_state_dict(model, eva_state_dict: dict, adapter_name: str = "default") -> None:
    """PEFT's ``_load_eva_state_dict``: new ranks, A from the components, the config rewritten.

    Collective over all ranks (the rewritten patterns and targets span every
    stage). A layer whose new rank is 0 loses its LoRA layer; a layer missing
    from ``eva_state_dict`` gets PEFT's default init, with a warning.
    """
    from ..model import _set_submodule

    config = model.peft_config[adapter_name]
    settings = eva_settings(config)
    lora_model = model.base_model
    eva_state_dict = dict(eva_state_dict)
    kept, missing, rank_pattern, alpha_pattern = [], [], {}, {}
    for local_name, layer in lora_model.lora_layers():
        if adapter_name not in layer.lora_A:
            continue
        name = layer.global_name
        r, alpha = layer.r[adapter_name], layer.lora_alpha[adapter_name]
        dtype = layer.lora_A[adapter_name].weight.dtype
        if name in eva_state_dict:
            w = eva_state_dict.pop(name)
            new_rank = w.size(0)
            if new_rank == 0:
                _set_submodule(lora_model.model, local_name, layer.get_base_layer())
                continue
            if new_rank != r and settings["adjust_scaling_factors"]:
                alpha *= new_rank / r
            if new_rank != r:
                layer.update_layer(adapter_name, config, r=new_rank, lora_alpha=alpha, seed=lora_model.seed)
            entry = next(e for e in layer.tensors(adapter_name) if e.role == "A")
            entry.param.copy_(layer.local(w, entry.spec).to(dtype))
            kept.append(name)
        else:
            layer.update_layer(adapter_name, config.replace(init_lora_weights=True), r=r, lora_alpha=alpha,
                               seed=lora_model.seed)
            missing.append(name)
            new_rank = r
        for factors in (layer.lora_A, layer.lora_B):
            factors[adapter_name].to(dtype)  # keep the dtype injection gave (params_dtype)
        if new_rank != config.r:
            rank_pattern[name] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    parts = all_gather_objects((kept, missing, rank_pattern, alpha_pattern))
    kept = [n for p in parts for n in p[0]]
    missing = [n for p in parts for n in p[1]]
    config.target_modules = set(kept + missing)
    config.rank_pattern = _merged(p[2] for p in parts)
    config.alpha_pattern = _merged(p[3] for p in parts)
    if missing:
        warnings.warn("the following layers were initialized with init_lora_weights=True because they were not "
                      f"found in the eva state_dict: {sorted(set(missing))}")


def initialize_lora_eva_weights(model, dataloader=None, eva_state_dict: Optional[dict] = None,
                                forward_fn: Optional[Callable] = forward_fn_dict,
                                prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_megatron,
                                prepare_layer_inputs_fn=prepare_layer_inputs_fn_megatron,
                                adapter_name: str = "default", gather_distributed_inputs: bool = True,
                                show_progress_bar: bool = True):
    """PEFT's ``initialize_lora_eva_weights`` for a megalora ``PeftModel``; collective over all ranks.

    Args:
        model: The ``PeftModel`` (``init_lora_weights="eva"``, one active adapter).
        dataloader: Batches for ``forward_fn``; needed unless ``eva_state_dict`` is given.
        eva_state_dict: Precomputed components (:func:`get_eva_state_dict`), keyed by global name.
        forward_fn: ``forward_fn(model, batch)`` runs one batch (megatron-core's schedule under PP).
        prepare_model_inputs_fn: Batch → what ``prepare_layer_inputs_fn`` gets (default: the token mask).
        prepare_layer_inputs_fn: ``(layer_input, model_input, name)`` → ``[tokens, in]`` rows, or a
            dict of them by global name (default: megatron's ``[s, b, h]`` read through the mask).
        adapter_name: The adapter to initialize.
        gather_distributed_inputs: Gather the rows of the data-parallel replicas.
        show_progress_bar: Accepted for PEFT's signature; no bar is shown.

    Returns:
        ``model``.
    """
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel")
    if len(model.active_adapters) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
                                            adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs)
    load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model
