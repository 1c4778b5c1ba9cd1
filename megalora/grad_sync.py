"""Gradients of replicated LoRA factors under tensor parallelism.

A LoRA factor that every TP rank holds whole (say ``A`` of a row-parallel
layer) gets only a partial gradient on each rank. The layers scale that
gradient in forward (:func:`scale_grad`), tag the parameter
(:func:`mark_tp_replicated`, :func:`mark_tp_sharded`) the way megatron-core
tags its own TP weights, and once per step the partials are combined across
the TP group: by megatron-core's ``finalize_model_grads`` for a model in its
``DistributedDataParallel``, or by :func:`sync_replicated_grads` in a plain loop.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .collectives import ProcessGroup, all_reduce_coalesced

__all__ = ["TP_AVERAGE_ATTR", "mark_tp_replicated", "mark_tp_sharded", "scale_grad", "sync_replicated_grads"]


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
    all_reduce_coalesced(grads, group, average=True)
    return len(grads)
