"""The collectives and point-to-point messages megalora issues, over explicit groups.

Every function takes the process group it runs over (``None`` is the world
group) and is a no-op, with no communication, when that group has one rank or
``torch.distributed`` is not started, so plain single-process models need no
special case.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

__all__ = ["ProcessGroup", "agree_or_raise", "all_gather_objects", "all_reduce_coalesced", "all_reduce_sum",
           "broadcast_object", "gather_objects", "group_rank", "group_size", "recv_tensors", "send_tensors",
           "sync_rng_state"]

ProcessGroup = Optional["dist.ProcessGroup"]


def group_size(group: ProcessGroup) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Collective: sum ``tensor`` in place across ``group`` (no-op at size 1)."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_coalesced(tensors: list[torch.Tensor], group: ProcessGroup, average: bool = False) -> None:
    """Collective: sum (or average) ``tensors`` in place across ``group``, in one all-reduce.

    The tensors are flattened into one buffer, reduced, and copied back, so a
    model's worth of gradients costs one message.
    """
    if not tensors or group_size(group) == 1:
        return
    flat = torch._utils._flatten_dense_tensors([t.data for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    if average:
        flat.div_(group_size(group))
    for tensor, synced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        tensor.data.copy_(synced)


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
