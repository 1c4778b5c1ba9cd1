"""Which ranks hold what, read from megatron-core's process groups.

The functions here answer layout questions (this rank's tensor-parallel
group, whether it is the one rank of its pipeline stage that writes files)
from explicit process groups: a megatron-core ``ProcessGroupCollection``
passed in, or, by default, the one megatron-core builds from its initialized
``parallel_state``. Ranks are read from the groups themselves, not from
``parallel_state``'s rank globals. Without model parallelism (a plain model,
maybe under plain ``torch.distributed``) every answer falls back to the
global rank.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist

from .collectives import ProcessGroup, group_rank

__all__ = ["is_first_replica", "is_stage_writer", "megatron_parallel_state", "model_tp_group",
           "process_groups", "replica_groups"]

# The groups megalora reads: tensor-parallel, pipeline, and data- with context-parallel.
_GROUPS = ("tp", "pp", "dp_cp")


def megatron_parallel_state():
    """megatron-core's ``parallel_state`` if its model-parallel groups are up, else ``None``."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # plain models need no megatron-core
        return None
    return ps if ps.model_parallel_is_initialized() else None


def process_groups(pg_collection: Optional[Any] = None) -> Optional[Any]:
    """The process groups to read: ``pg_collection`` if given, else megatron-core's own.

    Args:
        pg_collection: A megatron-core ``ProcessGroupCollection`` with at least
            ``tp``, ``pp`` and ``dp_cp``, or None.

    Returns:
        ``pg_collection``; else a ``ProcessGroupCollection`` of megatron-core's
        initialized parallel state; else None without model parallelism.
    """
    if pg_collection is not None:
        return pg_collection
    if megatron_parallel_state() is None:
        return None
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=list(_GROUPS))


def model_tp_group(pg_collection: Optional[Any] = None) -> ProcessGroup:
    """The tensor-parallel group, or ``None`` without model parallelism."""
    pgs = process_groups(pg_collection)
    return pgs.tp if pgs is not None else None


def is_first_replica(pg_collection: Optional[Any] = None) -> bool:
    """Whether this rank is in the first data-(and context-)parallel replica (global rank 0 if plain)."""
    pgs = process_groups(pg_collection)
    if pgs is not None:
        return group_rank(pgs.dp_cp) == 0
    return not dist.is_initialized() or dist.get_rank() == 0


def is_stage_writer(pg_collection: Optional[Any] = None) -> bool:
    """TP rank 0 of the first replica: one rank per pipeline stage, which holds all its virtual chunks."""
    pgs = process_groups(pg_collection)
    if pgs is not None:
        return group_rank(pgs.dp_cp) == 0 and group_rank(pgs.tp) == 0
    return is_first_replica()


def replica_groups(pg_collection: Optional[Any] = None) -> list:
    """DP (with CP), then TP: broadcasting from rank 0 of each, in order, reaches a whole stage."""
    pgs = process_groups(pg_collection)
    if pgs is None:
        return [None] if dist.is_initialized() else []
    return [pgs.dp_cp, pgs.tp]
