"""Gradients of replicated LoRA factors under tensor parallelism.

A LoRA factor that every TP rank holds whole (say ``A`` of a row-parallel
layer) gets only a partial gradient on each rank. The layers scale that
gradient in forward (:func:`scale_grad`), tag the parameter
(:func:`mark_tp_replicated`, :func:`mark_tp_sharded`) the way megatron-core
tags its own TP weights, and once per step the partials are combined across
the TP group: by megatron-core's ``finalize_model_grads`` for a model in its
``DistributedDataParallel``, or by :func:`sync_replicated_grads` in a plain loop.

Routed experts are sharded over the *expert*-TP group, which
``finalize_model_grads`` does not know: it averages tagged parameters over
the dense TP group, which would mix different experts' factors. So a factor
is tagged for megatron-core only when its layer's group has the dense TP
group's ranks (always for dense layers; for experts when expert-TP equals
TP). Every replicated factor also carries :data:`REPLICATED_ATTR`, and
:func:`finalize_model_grads` (megatron-core's, plus one coalesced all-reduce
per other group, only for layouts whose expert-TP group differs from the TP
group and is larger than 1) sums the rest; since megatron-core's gradient
norm drops TP duplicates by the dense TP rank, such a factor is marked
``shared`` on the expert-TP ranks other than 0, which keeps it out of the
norm there. With expert-TP 1 a factor is whole on its rank: it is tagged
like a shard (counted once per rank in the gradient norm, as megatron-core
tags the expert weights) and needs no sum.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .collectives import ProcessGroup, all_reduce_coalesced

__all__ = ["TP_AVERAGE_ATTR", "REPLICATED_ATTR", "mark_tp_replicated", "mark_tp_sharded", "scale_grad",
           "sync_replicated_grads", "finalize_model_grads", "is_dense_tp_group"]


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
# megalora's own tag: a replicated factor whose partial grads its layer's group sums.
REPLICATED_ATTR = "megalora_tp_replicated"


def is_dense_tp_group(group: ProcessGroup) -> bool:
    """Whether ``group`` has the ranks of megatron-core's (dense) TP group; True without megatron."""
    from .parallel_groups import model_tp_group

    dense = model_tp_group()
    if group is None or dense is None or group is dense:
        return True
    import torch.distributed as dist

    return dist.get_process_group_ranks(group) == dist.get_process_group_ranks(dense)


def mark_tp_replicated(param: torch.nn.Parameter, dense: bool = True) -> None:
    """Tag a replicated LoRA parameter for the once-per-step TP reduction.

    Args:
        param: The parameter.
        dense: Whether its layer's TP group is the dense TP group, so that
            megatron-core's ``finalize_model_grads`` may do the reduction.
    """
    setattr(param, REPLICATED_ATTR, True)
    if dense:
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
        if not getattr(p, REPLICATED_ATTR, False):
            continue
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is not None:
            grads.append(g)
    all_reduce_coalesced(grads, group, average=True)
    return len(grads)


def _other_group_params(model) -> dict:
    """Replicated factors that megatron-core's ``finalize_model_grads`` does not reduce, by group."""
    from .layers import LoraLayer

    groups: dict = {}
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        for module in chunk.modules():
            if isinstance(module, LoraLayer) and module.tp_size > 1 and not is_dense_tp_group(module.tp_group):
                groups.setdefault(module.tp_group, []).extend(
                    p for p in module.parameters() if not getattr(p, TP_AVERAGE_ATTR, False))
    return groups


def finalize_model_grads(model, *args, **kwargs):
    """megatron-core's ``finalize_model_grads``, then the sums over other (expert-TP) groups.

    A drop-in ``config.finalize_model_grads_func``. The extra all-reduce (one,
    coalesced, per group) happens only when some LoRA layer's TP group is
    neither the dense TP group nor of size 1: routed experts at an expert-TP
    size other than 1 and TP.
    """
    from megatron.core.distributed import finalize_model_grads as megatron_finalize

    out = megatron_finalize(model, *args, **kwargs)
    for group, params in _other_group_params(model).items():
        sync_replicated_grads(params, group)
    return out
