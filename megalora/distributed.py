"""Every collective and shard helper megalora uses, in one place.

The sharding rule is stated once, here, as a :class:`ShardSpec`: a LoRA factor
has a full logical shape, and a spec says which dimension (if any) is split
across the tensor-parallel group. Init, save, load, merge and export all go
through :meth:`ShardSpec.local` and :func:`gather_full`, so a factor means the
same thing at every layout.

A spec may split its dimension in ``chunks`` equal blocks that are each sharded
on their own. Megatron's gated ``linear_fc1`` (SwiGLU) needs this: rank ``k``
holds ``[gate_k; up_k]`` rather than a contiguous slice of ``[gate; up]``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional["dist.ProcessGroup"]


@dataclass(frozen=True)
class ShardSpec:
    """How a full tensor is split across a tensor-parallel group.

    Attributes:
        dim: The split dimension, or ``None`` for a tensor that every rank holds
            whole (plain layers, and replicated factors).
        chunks: The number of equal blocks along ``dim`` that are sharded
            independently (2 for a gated ``linear_fc1``).
    """

    dim: Optional[int] = None
    chunks: int = 1

    @property
    def sharded(self) -> bool:
        return self.dim is not None

    def local(self, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        """This rank's slice of ``full`` (a view-free contiguous copy)."""
        if self.dim is None or world == 1:
            return full.contiguous()
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
        per_rank_blocks = [s.chunk(self.chunks, dim=self.dim) for s in shards]
        # One cat over the reordered views: the full tensor is allocated once.
        return torch.cat([p[c] for c in range(self.chunks) for p in per_rank_blocks], dim=self.dim)


FULL = ShardSpec()


def group_size(group: ProcessGroup) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


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


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Collective: sum ``tensor`` in place across ``group`` (no-op at size 1)."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast_object(obj, src: int = 0, group: ProcessGroup = None):
    """Collective: rank ``src``'s Python object on every rank of ``group``."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
    return box[0]


def all_gather_objects(obj, group: ProcessGroup = None) -> list:
    """Collective: every rank's ``obj``, in rank order."""
    if not dist.is_available() or not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_objects(obj, dst: int = 0) -> Optional[list]:
    """Collective over the world: every rank's ``obj`` on global rank ``dst`` (``None`` elsewhere).

    Unlike :func:`all_gather_objects`, only ``dst`` receives the payloads (large
    state dicts are not copied to every rank).
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def agree_or_raise(error: Optional[str], group: ProcessGroup = None) -> None:
    """Collective: raise the same error on every rank if any rank found one.

    Validation runs on every rank; this makes a problem seen on one rank
    (a missing module on one pipeline stage, say) stop them all together, before
    the collectives that would otherwise hang.
    """
    errors = [e for e in all_gather_objects(error, group) if e]
    if errors:
        raise ValueError(errors[0])


def _dtype_groups(specs: list[tuple[tuple, torch.dtype]]) -> list[tuple[torch.dtype, list[int]]]:
    """Indices of ``specs`` grouped by dtype, in order of first appearance."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, (_, dtype) in enumerate(specs):
        groups.setdefault(dtype, []).append(i)
    return list(groups.items())


def send_tensors(tensors: list[torch.Tensor], dst: int, group: ProcessGroup) -> None:
    """Point-to-point: send ``tensors`` to rank ``dst`` of ``group``.

    One message per dtype (the tensors flattened together), so a whole layer
    costs a message or two. The peer calls :func:`recv_tensors` with the same
    shapes and dtypes, in the same order relative to its other p2p calls.
    """
    specs = [(tuple(t.shape), t.dtype) for t in tensors]
    peer = dist.get_global_rank(group, dst) if group is not None else dst
    for _, idx in _dtype_groups(specs):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.send(flat.contiguous(), dst=peer, group=group)


def recv_tensors(specs: list[tuple[tuple, torch.dtype]], src: int, group: ProcessGroup,
                 device=None) -> list[torch.Tensor]:
    """Point-to-point: receive what :func:`send_tensors` sent from rank ``src`` of ``group``.

    Args:
        specs: ``(shape, dtype)`` of each tensor, in the sender's order.
        src: The sender's rank within ``group``.
        group: The process group (``None`` for the world group).
        device: Where the received tensors live (the CPU by default).

    Returns:
        Fresh tensors, one per spec, each with its own storage.
    """
    peer = dist.get_global_rank(group, src) if group is not None else src
    out: list[Optional[torch.Tensor]] = [None] * len(specs)
    for dtype, idx in _dtype_groups(specs):
        sizes = [int(torch.Size(specs[i][0]).numel()) for i in idx]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        dist.recv(flat, src=peer, group=group)
        for i, part in zip(idx, flat.split(sizes)):
            out[i] = part.view(specs[i][0]).clone()
    return out


def param_shard_spec(param: torch.Tensor, chunks: int = 1) -> ShardSpec:
    """The spec megatron-core's TP attributes give ``param``; ``chunks`` = 2 for a gated fc1 (dim 0)."""
    if getattr(param, "tensor_model_parallel", False) and getattr(param, "partition_dim", -1) >= 0:
        dim = int(param.partition_dim)
        return ShardSpec(dim=dim, chunks=chunks if dim == 0 else 1)
    return FULL


def _parallel_state():
    """megatron-core's ``parallel_state`` if its model-parallel groups are up, else ``None``."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # plain models need no megatron-core
        return None
    return ps if ps.model_parallel_is_initialized() else None


def model_tp_group() -> ProcessGroup:
    """megatron-core's tensor-parallel group, or ``None`` without model parallelism."""
    ps = _parallel_state()
    return ps.get_tensor_model_parallel_group() if ps is not None else None


def is_first_replica() -> bool:
    """Whether this rank is in the first data-(and context-)parallel replica (global rank 0 if plain)."""
    ps = _parallel_state()
    if ps is not None:
        return ps.get_data_parallel_rank(with_context_parallel=True) == 0
    return not dist.is_initialized() or dist.get_rank() == 0


def is_stage_writer() -> bool:
    """TP rank 0 of the first replica: one rank per pipeline stage, which holds all its virtual chunks."""
    ps = _parallel_state()
    if ps is not None:
        return is_first_replica() and ps.get_tensor_model_parallel_rank() == 0
    return is_first_replica()


def replica_groups() -> list:
    """DP (with CP), then TP: broadcasting from rank 0 of each, in order, reaches a whole stage."""
    ps = _parallel_state()
    if ps is None:
        return [None] if dist.is_initialized() else []
    return [ps.get_data_parallel_group(with_context_parallel=True), ps.get_tensor_model_parallel_group()]


def sync_rng_state(groups: Iterable[ProcessGroup]) -> None:
    """Collective: every rank of each group takes its rank 0's global CPU (and CUDA) RNG state.

    Random masks drawn afterwards on the same full shapes then agree, so
    replicated tensors stay replicated.
    """
    for group in groups:
        if group_size(group) == 1:
            continue
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state()
        states = broadcast_object(states, src=0, group=group)
        torch.set_rng_state(states["cpu"])
        if "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"])


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


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor`` unchanged, whose gradient is multiplied by ``factor``."""
    if factor == 1:
        return tensor
    return _ScaleGrad.apply(tensor, factor)


# The attribute megatron-core's finalize_model_grads reads to average a
# parameter's gradient across the tensor-parallel group.
TP_AVERAGE_ATTR = "average_gradients_across_tp_domain"


def mark_tp_replicated(param: torch.nn.Parameter) -> None:
    """Tag a replicated LoRA parameter for the once-per-step TP reduction."""
    setattr(param, TP_AVERAGE_ATTR, True)
    param.tensor_model_parallel = False
    param.partition_dim = -1
    param.partition_stride = 1


def mark_tp_sharded(param: torch.nn.Parameter, dim: int, stride: int = 1) -> None:
    """Tag a sharded parameter the way megatron-core tags its own TP weights."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = stride


def sync_replicated_grads(params: Iterable[torch.nn.Parameter], group: ProcessGroup) -> int:
    """Collective: average the grads of TP-replicated params across ``group``.

    One coalesced all-reduce per call. Together with the ``scale_grad`` factor
    the layers apply in forward, the average is the sum of the rank partials.
    This is what megatron-core's ``finalize_model_grads`` does for parameters
    tagged by :func:`mark_tp_replicated`; a plain training loop calls it once per
    step, after backward.

    Returns:
        The number of parameters whose gradient was reduced.
    """
    grads = []
    for p in params:
        if not getattr(p, TP_AVERAGE_ATTR, False):
            continue
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is not None:
            grads.append(g)
    if not grads or group_size(group) == 1:
        return len(grads)
    flat = torch._utils._flatten_dense_tensors([g.data for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(group_size(group))
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.data.copy_(synced)
    return len(grads)


# --------------------------------------------------------------------------
# The trainer's gradient collectives (megalora.training.loop).


def all_reduce_grads(params: Iterable[torch.nn.Parameter], group: ProcessGroup, average: bool = False) -> int:
    """Collective: sum (or average) the ``.grad`` of ``params`` across ``group``, one all-reduce.

    The trainer averages every trainable grad over the data-parallel group, and
    sums the grads of ``sequence_parallel`` params over the TP group.

    Returns:
        The number of gradients reduced.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or group_size(group) == 1:
        return len(grads)
    flat = torch._utils._flatten_dense_tensors([g.data for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    if average:
        flat.div_(group_size(group))
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.data.copy_(synced)
    return len(grads)


def grad_norm_fp32(params: Iterable[torch.nn.Parameter], tp_group: ProcessGroup,
                   norm_group: ProcessGroup) -> float:
    """Collective over ``norm_group``: the L2 norm of all grads of the model, in fp32.

    A TP-sharded param (``tensor_model_parallel``) contributes its shard on
    every TP rank; a replicated one only on TP rank 0, and a ``shared`` copy
    (the tied output embedding on the last pipeline stage) not at all, as
    megatron-core's ``get_main_grads_for_grad_norm`` does. ``norm_group`` is
    the model-parallel (TP x PP) group; DP replicas hold the same grads once
    they are averaged.
    """
    tp_rank = group_rank(tp_group)
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None or getattr(p, "shared", False):
            continue
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            total += p.grad.detach().double().pow(2).sum().cpu()
    if group_size(norm_group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=norm_group)
    return float(total.sqrt())


# --------------------------------------------------------------------------
# Counting collectives, for tests and benchmarks.

_COUNTED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "reduce_scatter",
    "broadcast",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "all_to_all_single",
)


@dataclass
class CollectiveLog:
    """What :func:`count_collectives` saw: calls and bytes per collective name."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    shapes: list = field(default_factory=list)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


def _tensor_bytes(args, kwargs) -> tuple[int, tuple]:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.numel() * a.element_size(), tuple(a.shape)
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return sum(t.numel() * t.element_size() for t in a), tuple(a[0].shape)
    return 0, ()


def _megatron_aliases() -> list:
    """Module-level aliases of torch.distributed functions inside megatron-core."""
    out = []
    try:
        from megatron.core import utils as mcore_utils

        for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
            if hasattr(mcore_utils, name):
                out.append((mcore_utils, name))
        from megatron.core.tensor_parallel import mappings

        for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
            if hasattr(mappings, name):
                out.append((mappings, name))
    except ImportError:  # megatron-core is optional for plain layers
        pass
    return out


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    """Count every torch.distributed collective issued inside the block.

    Wraps ``torch.distributed``'s functions (and megatron-core's module-level
    aliases of them) for the duration of the block, records calls, bytes and
    the first tensor's shape, and forwards to the real function.
    """
    log = CollectiveLog()
    originals = []

    def wrap(owner, name, label):
        real = getattr(owner, name)
        if getattr(real, "_megalora_counted", False):
            return

        def counted(*args, **kwargs):
            nbytes, shape = _tensor_bytes(args, kwargs)
            log.calls[label] += 1
            log.bytes[label] += nbytes
            log.shapes.append((label, shape))
            return real(*args, **kwargs)

        counted._megalora_counted = True
        originals.append((owner, name, real))
        setattr(owner, name, counted)

    for name in _COUNTED:
        if hasattr(dist, name):
            wrap(dist, name, name)
    for owner, name in _megatron_aliases():
        real = getattr(owner, name)
        wrap(owner, name, getattr(real, "__name__", name))
    try:
        yield log
    finally:
        for owner, name, real in reversed(originals):
            setattr(owner, name, real)
