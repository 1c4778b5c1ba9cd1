"""Expert parallelism: global expert names, and which ranks hold and write an expert's tensors.

megatron-core splits a mixture-of-experts layer's routed experts over the
expert-parallel (EP) group: EP rank ``e`` holds ``num_local_experts`` experts
as ``mlp.experts.local_experts.0..n-1``, which are global experts
``e * n + i``. Each expert is a small MLP whose linear layers are sharded over
the *expert*-tensor-parallel group (its layers' own ``tp_group``) and
replicated over the *expert*-data-parallel group; megatron-core marks their
weights ``allreduce=False`` (when EP > 1) so that its DDP reduces them over
that group instead of the dense data-parallel one.

megalora follows the same rules for the adapters on experts:

* names: an expert's global module name carries its global index, read from
  the experts module's own EP group (:func:`expert_index_map`), so
  targeting, the init draw and adapter files are layout-independent;
* gradients: a LoRA parameter of an expert layer copies the base weight's
  ``allreduce`` flag (:func:`follows_base_allreduce`);
* files: one writer per EP rank of each stage, the expert-DP and expert-TP
  rank 0 (:func:`is_expert_writer`), since no single dense writer holds
  every expert.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .collectives import group_rank

__all__ = ["expert_index_map", "expert_param_ids", "is_expert_param", "is_expert_writer", "follows_base_allreduce",
           "expert_groups", "expert_module_test", "is_first_expert_replica"]

# The attribute megatron-core sets False on expert-parallel weights.
ALLREDUCE_ATTR = "allreduce"


def _experts_modules(model: nn.Module):
    """``(name, module)`` of every module that holds routed experts as a ``local_experts`` list."""
    for name, module in model.named_modules():
        local = getattr(module, "local_experts", None)
        if isinstance(local, nn.ModuleList) and hasattr(module, "num_local_experts"):
            yield name, module


def expert_index_map(model: nn.Module) -> dict[str, str]:
    """Local path of each local expert → the same path with its global expert index.

    ``<x>.local_experts.<i>`` on EP rank ``e`` (from the module's own
    ``ep_group``) with ``n`` local experts becomes ``<x>.local_experts.<e*n+i>``.
    The layer part of ``<x>`` stays local; :func:`megalora.targeting.layer_index_map`
    makes it global.
    """
    mapping = {}
    for name, module in _experts_modules(model):
        ep_rank = group_rank(getattr(module, "ep_group", None))
        n = int(module.num_local_experts)
        base = f"{name}.local_experts" if name else "local_experts"
        for i in range(len(module.local_experts)):
            mapping[f"{base}.{i}"] = f"{base}.{ep_rank * n + i}"
    return mapping


def expert_param_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter inside a routed experts module (base weights and adapters)."""
    return {id(p) for _, module in _experts_modules(model) for p in module.parameters()}


def is_expert_param(param: torch.Tensor) -> bool:
    """Whether megatron-core reduces this parameter over the expert-DP group (``allreduce=False``)."""
    return not getattr(param, ALLREDUCE_ATTR, True)


def follows_base_allreduce(param: nn.Parameter, base_weight: Optional[torch.Tensor]) -> None:
    """Give a LoRA parameter its base weight's ``allreduce`` flag (set only when the base has one)."""
    if base_weight is not None and hasattr(base_weight, ALLREDUCE_ATTR):
        setattr(param, ALLREDUCE_ATTR, bool(getattr(base_weight, ALLREDUCE_ATTR)))


def expert_groups(pg_collection: Optional[Any] = None) -> Optional[Any]:
    """megatron-core's expert groups (``ep``, ``expt_tp``, ``expt_dp``), or None without them."""
    from .parallel_groups import megatron_parallel_state

    if pg_collection is not None and hasattr(pg_collection, "expt_dp"):
        return pg_collection
    if megatron_parallel_state() is None:
        return None
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=["ep", "expt_tp", "expt_dp"])


def expert_module_test(model: nn.Module):
    """A predicate on local module names: whether the module sits inside a routed experts module."""
    prefixes = tuple(f"{name}." for name, _ in _experts_modules(model))
    return lambda local_name: bool(prefixes) and local_name.startswith(prefixes)


def is_first_expert_replica(pg_collection: Optional[Any] = None) -> bool:
    """Expert-DP rank 0: the replica of the experts that exports them."""
    pgs = expert_groups(pg_collection)
    return pgs is None or group_rank(pgs.expt_dp) == 0


def is_expert_writer(pg_collection: Optional[Any] = None) -> bool:
    """Expert-DP rank 0 and expert-TP rank 0: one rank per EP rank of each pipeline stage."""
    pgs = expert_groups(pg_collection)
    if pgs is None:
        return True
    return group_rank(pgs.expt_dp) == 0 and group_rank(pgs.expt_tp) == 0
