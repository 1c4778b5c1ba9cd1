"""The sharding rule, stated once: how a full tensor is split across a TP group.

A LoRA factor has a full logical shape, and a :class:`ShardSpec` says which
dimension (if any) is split across the tensor-parallel group. Init, save,
load, merge and export all go through :meth:`ShardSpec.local` (full tensor to
this rank's shard) and :func:`gather_full` (every rank's shard back to the
full tensor), so a factor means the same thing at every layout.

A spec may split its dimension in ``chunks`` equal blocks that are each sharded
on their own. Megatron's gated ``linear_fc1`` (SwiGLU) needs this: rank ``k``
holds ``[gate_k; up_k]`` rather than a contiguous slice of ``[gate; up]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .collectives import ProcessGroup, group_rank, group_size

__all__ = ["FULL", "ShardSpec", "gather_full", "param_shard_spec"]


@dataclass(frozen=True)
class ShardSpec:
    """How a full tensor is split across a tensor-parallel group.

    Attributes:
        dim: The split dimension, or ``None`` for a tensor that every rank holds
            whole (plain layers, and replicated factors).
        chunks: The number of equal blocks along ``dim`` that are sharded
            independently (2 for a gated ``linear_fc1``).
        rows: For a tensor split unevenly along dim 0 (trainable-token rows,
            each owned by the rank whose vocab range holds its id): per rank,
            the full tensor's row indices it holds, in order. ``dim`` is 0.
    """

    dim: Optional[int] = None
    chunks: int = 1
    rows: Optional[tuple] = None

    @property
    def sharded(self) -> bool:
        return self.dim is not None

    def full_shape(self, local_shape, world: int) -> tuple:
        """The full tensor's shape, from one rank's shard shape."""
        shape = list(local_shape)
        if self.rows is not None:
            shape[0] = sum(len(r) for r in self.rows)
        elif self.sharded:
            shape[self.dim] *= world
        return tuple(shape)

    def local(self, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        """This rank's slice of ``full`` (a view-free contiguous copy)."""
        if self.dim is None or world == 1:
            return full.contiguous()
        if self.rows is not None:
            return full[list(self.rows[rank])].contiguous()
        size = full.shape[self.dim]
        if size % (self.chunks * world):
            raise ValueError(
                f"dimension {self.dim} of size {size} cannot be split into {self.chunks} block(s) "
                f"across {world} tensor-parallel ranks"
            )
        blocks = full.chunk(self.chunks, dim=self.dim)
        return torch.cat([b.chunk(world, dim=self.dim)[rank] for b in blocks], dim=self.dim).contiguous()

    def full_from_shards(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`local` given every rank's shard, in rank order."""
        if self.dim is None or len(shards) == 1:
            return shards[0]
        if self.rows is not None:
            full = shards[0].new_empty(self.full_shape(shards[0].shape, len(shards)))
            for index, shard in zip(self.rows, shards):
                full[list(index)] = shard[: len(index)]
            return full
        per_rank_blocks = [s.chunk(self.chunks, dim=self.dim) for s in shards]
        # One cat over the reordered views: the full tensor is allocated once.
        return torch.cat([p[c] for c in range(self.chunks) for p in per_rank_blocks], dim=self.dim)


FULL = ShardSpec()


def param_shard_spec(param: torch.Tensor, chunks: int = 1) -> ShardSpec:
    """The spec megatron-core's TP attributes give ``param``; ``chunks`` = 2 for a gated fc1 (dim 0)."""
    if getattr(param, "tensor_model_parallel", False) and getattr(param, "partition_dim", -1) >= 0:
        dim = int(param.partition_dim)
        return ShardSpec(dim=dim, chunks=chunks if dim == 0 else 1)
    return FULL


def gather_full(local: torch.Tensor, spec: ShardSpec, group: ProcessGroup,
                dst: Optional[int] = None) -> Optional[torch.Tensor]:
    """Collective: rebuild the full tensor from every rank's shard.

    Every rank of ``group`` must call it. A tensor with an unsharded spec is
    returned as is, with no communication. With ``dst`` (a rank of ``group``)
    only that rank gets the full tensor and the others ``None``, so that they
    never hold it.
    """
    world = group_size(group)
    root = dst if group is None or dst is None else dist.get_global_rank(group, dst)
    if spec.rows is not None and world > 1:
        # Uneven shards: every rank sends as many rows as the largest holds.
        pad = max(len(r) for r in spec.rows) - local.shape[0]
        local = torch.cat([local, local.new_zeros((pad, *local.shape[1:]))]) if pad else local
    if dst is not None and group_rank(group) != dst:
        if spec.sharded and world > 1:
            dist.gather(local.contiguous(), None, dst=root, group=group)
        return None
    if not spec.sharded or world == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(world)]
    if dst is None:
        dist.all_gather(shards, local.contiguous(), group=group)
    else:
        dist.gather(local.contiguous(), shards, dst=root, group=group)
    return spec.full_from_shards(shards)
