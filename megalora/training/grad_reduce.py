"""The trainer's gradient reductions and gradient norm (see :mod:`megalora.training.loop`)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from ..collectives import ProcessGroup, all_reduce_coalesced, group_rank, group_size

__all__ = ["all_reduce_grads", "grad_norm_fp32"]


def all_reduce_grads(params: Iterable[torch.nn.Parameter], group: ProcessGroup, average: bool = False) -> int:
    """Collective: sum (or average) the ``.grad`` of ``params`` across ``group``, one all-reduce.

    The trainer averages every trainable grad over the data-parallel group, and
    sums the grads of ``sequence_parallel`` params over the TP group.

    Returns:
        The number of gradients reduced.
    """
    grads = [p.grad for p in params if p.grad is not None]
    all_reduce_coalesced(grads, group, average=average)
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
