"""The ``ShardedTensor`` of a LoRA tensor, for megatron-core's distributed checkpointing.

What :mod:`megalora.dist_checkpoint` saves and loads: the LoRA layers'
``sharded_state_dict`` builds one entry per tensor with this factory, from the
tensor's :class:`~megalora.sharding.ShardSpec`.
"""

from __future__ import annotations

import torch

from .sharding import ShardSpec

__all__ = ["sharded_tensor"]


def sharded_tensor(tensor: torch.Tensor, key: str, spec: ShardSpec, tp_rank: int, tp_size: int, dp_rank: int,
                   sharded_offsets: tuple = (), singleton_local_shards: bool = False):
    """A megatron-core ``ShardedTensor`` for this rank's shard of a tensor with ``spec``.

    A sharded tensor is written by every TP rank of the first data-parallel
    replica (replica id ``(0, 0, dp)``); a replicated one by TP rank 0 only
    (``(0, tp, dp)``). A spec with 2 chunks on dim 0 (gated ``linear_fc1``) goes
    through megatron-core's SwiGLU factory, so that the checkpoint holds the
    canonical ``[gate; up]`` tensor and reshards to any TP size.

    ``tensor`` is this rank's shard (a parameter, so loading writes into it),
    ``key`` the global checkpoint key, ``dp_rank`` the data-(and context-)
    parallel rank, ``sharded_offsets`` what enclosing modules prepend.
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    prepend = len(sharded_offsets)
    if not spec.sharded:
        return ShardedTensor.from_rank_offsets(
            key, tensor, *sharded_offsets, replica_id=(0, tp_rank, dp_rank), prepend_axis_num=prepend
        )
    sh = ShardedTensor.from_rank_offsets(key, tensor, *sharded_offsets, (spec.dim + prepend, tp_rank, tp_size),
                                         replica_id=(0, 0, dp_rank), prepend_axis_num=prepend)
    if spec.chunks == 1:
        return sh
    if spec.chunks != 2 or spec.dim != 0:
        raise NotImplementedError(f"no dist-checkpoint layout for {spec}; only 2 chunks on dim 0 (SwiGLU)")
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    return apply_swiglu_sharded_factory(sh, sharded_offsets, singleton_local_shards)
