"""Initializers that read a layer's full base weight, run at any TP/PP/DP layout.

PiSSA, OLoRA, LoftQ (and CorDA) decompose the *full* weight of a layer, while
under tensor parallelism each rank holds a shard. The pattern, for every
(layer, adapter) job:

1. **Plan** (one world ``all_gather_object``): every rank lists the jobs it
   holds and the global ranks of each job's TP group. The ranks that hold a
   job (its TP ranks in every data-parallel replica) form its *holder set*;
   the jobs of one holder set, sorted by size, are dealt round-robin to its
   ranks, so each rank owns every ``len(holders)``-th job.
2. **Rounds** of ``len(holders)`` jobs, one per owner. In a round, each TP
   rank sends its weight shard to the job's owner (point-to-point, posted all
   at once); every owner rebuilds its one full weight and runs the
   decomposition *at the same time as the others*; then each owner sends
   every holder that holder's shards of A, B and the new base weight.
   So no rank holds more than one layer's full weight at a time (with its
   decomposition's outputs, and the received shards while it is assembled),
   and the decompositions of a model run in parallel over the TP and DP ranks.
   Holders that are DP replicas of one TP position share one set of shards.
3. **Write**: each rank copies the received shards into its factors and
   rewrites its base-weight shard in place (:func:`rewrite_base_shard`).

The result is the owner's, so randomized decompositions (``pissa_niter_N``)
never disagree across ranks, and shards follow the layer's tensor table
(column-parallel: A replicated, B split on dim 0; row-parallel: A split on
dim 1, B replicated). Without ``torch.distributed`` every job runs locally.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..collectives import all_gather_objects
from ..replica_sharing import SHARED_ATTR
from ..sharding import ShardSpec, param_shard_spec

__all__ = ["Decomposition", "Decompose", "base_weight_spec", "init_from_full_weights", "rewrite_base_shard",
           "job_key", "plan_owners"]

# Point-to-point tags of the two phases of a round.
_TAG_GATHER, _TAG_SCATTER = 71, 72


@dataclass
class Decomposition:
    """What a decomposition of one full weight gives.

    Attributes:
        a: Full A ``[r, in]``.
        b: Full B ``[out, r]``.
        base: The full new base weight ``[out, in]``, or ``None`` to leave the base as is.
    """

    a: torch.Tensor
    b: torch.Tensor
    base: Optional[torch.Tensor] = None


# (layer, adapter, full fp32 weight [out, in]) -> Decomposition. The weight is the
# owner's own fresh tensor: the callable may overwrite it (e.g. into W_res).
Decompose = Callable[[nn.Module, str, torch.Tensor], Decomposition]


def job_key(layer: nn.Module, adapter: str) -> str:
    """The layout-independent name of one (layer, adapter) job."""
    return f"{layer.global_name}|{adapter}"


def base_weight_spec(layer: nn.Module) -> ShardSpec:
    """How the layer's ``[out, in]`` base weight is split across its TP group."""
    return param_shard_spec(layer.base_weight_oi(), getattr(layer, "out_chunks", 1))


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _tp_global_ranks(layer: nn.Module) -> tuple[int, ...]:
    """Global ranks of the layer's TP group, in TP-rank order (just this rank when unsharded)."""
    group = getattr(layer, "tp_group", None)
    if group is None or layer.tp_size == 1:
        return (dist.get_rank(),)
    return tuple(dist.get_process_group_ranks(group))


def _cost(layer: nn.Module) -> int:
    """A decomposition's cost, to balance rounds: ``m·n·min(m, n)``, an SVD's or QR's flops up to a constant."""
    rows, cols = layer.out_features, layer.in_features
    return rows * cols * min(rows, cols)


@dataclass
class _Job:
    key: str
    owner: int                      # global rank that decomposes
    owner_tp: tuple[int, ...]       # the owner's TP group, whose shards it gathers
    holders: dict[int, tuple[int, ...]]  # holder global rank -> its TP group


def plan_owners(jobs: Sequence[tuple[nn.Module, str]]) -> list[list[_Job]]:
    """Collective over the world: the rounds this rank takes part in, in the order every rank uses.

    Jobs are grouped by holder set; within one, they are sorted by cost
    (largest first, then model order) and the ``j``-th goes to
    ``holders[j % len(holders)]``, so each round has at most one job per owner
    and its jobs are of about the same size (a round lasts as long as its
    largest decomposition).
    """
    mine = [(job_key(layer, adapter), _tp_global_ranks(layer), _cost(layer)) for layer, adapter in jobs]
    reports = all_gather_objects(mine)
    holders: dict[str, dict[int, tuple[int, ...]]] = defaultdict(dict)
    order: dict[str, tuple[int, int, int]] = {}
    for rank, report in enumerate(reports):
        for i, (key, tp, cost) in enumerate(report):
            holders[key][rank] = tuple(tp)
            order.setdefault(key, (-cost, rank, i))
    by_set: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for key in sorted(holders, key=lambda k: order[k]):
        by_set[tuple(sorted(holders[key]))].append(key)
    me = dist.get_rank()
    rounds: list[list[_Job]] = []
    for hset in sorted(by_set):
        if me not in hset:
            continue
        keys, n = by_set[hset], len(hset)
        for start in range(0, len(keys), n):
            batch = []
            for j, key in enumerate(keys[start:start + n]):
                owner = hset[(start + j) % n]
                batch.append(_Job(key, owner, holders[key][owner], holders[key]))
            rounds.append(batch)
    return rounds


def rewrite_base_shard(layer: nn.Module, local_oi: torch.Tensor) -> None:
    """Write ``local_oi`` (this rank's ``[out, in]`` shard) into the layer's base weight, in place.

    A base weight that ``layer_replication`` shares between layer copies gets
    a private copy first: each copy has its own adapter, hence its own
    residual, and the other copies must keep theirs.
    """
    base = layer.get_base_layer()
    weight = base._parameters.get("weight")
    if weight is not None and getattr(weight, SHARED_ATTR, False):
        private = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        private.__dict__.update({k: v for k, v in weight.__dict__.items() if k != SHARED_ATTR})
        base._parameters["weight"] = private
    with torch.no_grad():
        layer._set_base_weight_oi(local_oi.to(dtype=layer.base_weight_oi().dtype))


def _local(full: torch.Tensor, spec: ShardSpec, tp: tuple[int, ...], rank: int) -> torch.Tensor:
    return spec.local(full, tp.index(rank), len(tp))


def _write(layer: nn.Module, adapter: str, a: torch.Tensor, b: torch.Tensor, base: Optional[torch.Tensor]) -> None:
    """Copy local shards into the adapter's factors and (if given) the base weight."""
    with torch.no_grad():
        for factor, value in ((layer.lora_A[adapter], a), (layer.lora_B[adapter], b)):
            # In place: megatron-core's attributes (and any DDP buffer view) stay attached.
            factor.weight.copy_(value.reshape(factor.weight.shape))
    if base is not None:
        rewrite_base_shard(layer, base)


def _factor_specs(layer: nn.Module, adapter: str) -> tuple[ShardSpec, ShardSpec]:
    """A's and B's shard specs, read from the layer's tensor table."""
    specs = {entry.role: entry.spec for entry in layer.tensors(adapter)}
    return specs["A"], specs["B"]


def _pieces(layer, adapter, out: Decomposition, tp: tuple[int, ...], rank: int,
            rewrites_base: bool) -> list[torch.Tensor]:
    """Rank ``rank``'s shards of A, B (and of the new base weight when ``rewrites_base``)."""
    a_spec, b_spec = _factor_specs(layer, adapter)
    pieces = [_local(out.a, a_spec, tp, rank), _local(out.b, b_spec, tp, rank)]
    if rewrites_base:
        pieces.append(_local(out.base, base_weight_spec(layer), tp, rank))
    return [p.float().contiguous() for p in pieces]


def _holder_pieces(layer, adapter, out: Decomposition, holders: dict, rewrites_base: bool) -> dict:
    """Each holder's shards; holders at the same TP position (DP replicas) share one set."""
    by_position, result = {}, {}
    for r, tp in holders.items():
        position = (tp.index(r), len(tp))
        if position not in by_position:
            by_position[position] = _pieces(layer, adapter, out, tp, r, rewrites_base)
        result[r] = by_position[position]
    return result


def _run_round(batch: list[_Job], layers: dict[str, tuple[nn.Module, str]], decompose: Decompose,
               rewrites_base: bool) -> None:
    me = dist.get_rank()
    # Phase 1: shards of the base weight to each job's owner.
    requests, received = [], {}
    for job in batch:
        layer, _ = layers[job.key]
        if me not in job.owner_tp:
            continue
        shard = layer.base_weight_oi().detach().float().contiguous()
        if me == job.owner:
            bufs = [shard if r == me else torch.empty_like(shard) for r in job.owner_tp]
            requests += [dist.irecv(buf, src=r, tag=_TAG_GATHER) for r, buf in zip(job.owner_tp, bufs) if r != me]
            received[job.key] = bufs
        else:
            requests.append(dist.isend(shard, dst=job.owner, tag=_TAG_GATHER))
    for req in requests:
        req.wait()
    # Phase 2: every owner decomposes its one full weight (the owners at the same time).
    results, failure = {}, None
    for job in batch:
        if job.owner == me:
            layer, adapter = layers[job.key]
            full = base_weight_spec(layer).full_from_shards(received.pop(job.key))
            try:
                out = decompose(layer, adapter, full)
                results[job.key] = _holder_pieces(layer, adapter, out, job.holders, rewrites_base)
            except Exception as exc:  # noqa: BLE001 - the holders are told below instead of left waiting
                failure, results[job.key] = exc, None
            del full
    # Phase 3: each holder's shards from each owner.
    requests, mine = [], {}
    for job in batch:
        layer, adapter = layers[job.key]
        if job.owner == me:
            for r in job.holders:
                pieces = results[job.key][r] if results[job.key] is not None else None
                if r == me:
                    mine[job.key] = pieces
                    continue
                # The last element says whether the decomposition worked (1) or failed (0).
                flat = (torch.cat([p.reshape(-1) for p in pieces] + [torch.ones(1)]) if pieces is not None
                        else torch.zeros(_message_size(layer, adapter, rewrites_base)))
                requests.append(dist.isend(flat, dst=r, tag=_TAG_SCATTER))
        elif me in job.holders:
            flat = torch.empty(_message_size(layer, adapter, rewrites_base))
            requests.append(dist.irecv(flat, src=job.owner, tag=_TAG_SCATTER))
            mine[job.key] = flat
    for req in requests:
        req.wait()
    failed = [key for key, got in mine.items() if got is None or (torch.is_tensor(got) and got[-1].item() != 1)]
    if failure is not None:
        raise failure
    if failed:
        owners = {job.key: job.owner for job in batch}
        raise RuntimeError(f"the initialization of {failed[0]} failed on its owner, global rank "
                           f"{owners[failed[0]]} (that rank's error says why)")
    for key, got in mine.items():
        layer, adapter = layers[key]
        if torch.is_tensor(got):
            shapes = _shapes(layer, adapter, rewrites_base)
            got = [part.view(shape) for part, shape in zip(got[:-1].split([s.numel() for s in shapes]), shapes)]
        _write(layer, adapter, got[0], got[1], got[2] if rewrites_base else None)


def _shapes(layer, adapter: str, rewrites_base: bool) -> list[torch.Size]:
    """This rank's shapes of A, B (and the base weight), as its own parameters have them."""
    shapes = [layer.lora_A[adapter].weight.shape, layer.lora_B[adapter].weight.shape]
    return shapes + [layer.base_weight_oi().shape] if rewrites_base else shapes


def _message_size(layer, adapter: str, rewrites_base: bool) -> int:
    """Elements of one holder's scatter message: its shards, plus the status element.

    Every TP rank's shards have the same shape, so the owner's own shapes give
    the size of any holder's message.
    """
    return sum(s.numel() for s in _shapes(layer, adapter, rewrites_base)) + 1


def init_from_full_weights(jobs: Sequence[tuple[nn.Module, str]], decompose: Decompose,
                           rewrites_base: bool = True) -> None:
    """Collective over the world: set each job's factors (and base weight) from its full base weight.

    Every rank must call it (with the jobs it holds, possibly none), before
    training. See the module docstring for the protocol.

    Args:
        jobs: ``(lora layer, adapter name)`` pairs this rank holds; the
            adapter's factors must already exist (any values).
        decompose: Runs on one owner rank per job, on the full fp32 weight.
        rewrites_base: Whether ``decompose`` returns a new base weight (it
            must then always return one); ``False`` keeps the base.
    """
    if not _dist():
        for layer, adapter in jobs:
            full = layer.base_weight_oi().detach().float().clone()
            out = decompose(layer, adapter, full)
            _write(layer, adapter, out.a, out.b, out.base if rewrites_base else None)
        return
    layers = {job_key(layer, adapter): (layer, adapter) for layer, adapter in jobs}
    for batch in plan_owners(jobs):
        _run_round(batch, layers, decompose, rewrites_base)
