"""One optimizer step and one evaluation, through Megatron's pipeline schedule.

A step runs ``get_forward_backward_func()`` (no pipelining, 1F1B, or the
interleaved schedule under virtual pipelining) over this data-parallel rank's
micro-batches on the DDP-wrapped chunks (:mod:`.optim`); their gradients
accumulate in DDP's fp32 buffers. At the end of the schedule megatron-core's
``finalize_model_grads`` averages them over data parallelism (all-reduce, or
reduce-scatter under the distributed optimizer), sums the TP-partial grads of
the replicated LoRA factors and of ``sequence_parallel`` params. Then the
LR is set from the schedule and the Megatron optimizer clips by the global
norm (each TP-replicated param counted once) and steps.

The loss of every micro-batch is the sum of its answer-token losses divided
by the answer tokens of the whole *global* batch (times the factors Megatron's
schedule and the DP average divide by), so the step's loss and gradients are
the same at every layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..collectives import all_reduce_sum, group_size
from ..data import Batch
from .config import TrainSection
from .optim import optimizer_step, zero_grads


@dataclass
class StepResult:
    """What one training step did; the same on every rank."""

    loss: float
    tokens: int
    grad_norm: float
    lr: float


def lr_at(step: int, t: TrainSection) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``steps``."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _groups():
    from megatron.core import parallel_state as ps

    return dict(dp=ps.get_data_parallel_group(), tp_rank=ps.get_tensor_model_parallel_rank(),
                last=ps.is_pipeline_last_stage())


def _forward_step(scale: float):
    def forward_step(data_iterator, model):
        batch: Batch = next(data_iterator)
        output = model(batch.tokens, batch.position_ids, None, labels=batch.labels)

        def loss_func(per_token: torch.Tensor):
            masked = (per_token.float() * batch.loss_mask).sum()
            return masked * scale, {"loss_sum": masked.detach(), "tokens": batch.loss_mask.sum()}

        return output, loss_func

    return forward_step


def run_schedule(chunks: list, batches: list[Batch], seq_length: int, forward_only: bool,
                 scale: float = 1.0) -> tuple[float, float]:
    """Megatron's schedule over ``batches``; returns ``(loss sum, tokens)`` summed over the world.

    Collective over the world group (the totals are all-reduced so every rank
    can log them).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    groups = _groups()
    iterators = [iter(batches) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=_forward_step(scale), data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks, num_microbatches=len(batches), seq_length=seq_length,
        micro_batch_size=batches[0].tokens.shape[0], forward_only=forward_only)
    totals = torch.zeros(2, dtype=torch.float64)
    # One TP rank of each last stage reports, so the world sum counts each DP replica once.
    if groups["last"] and groups["tp_rank"] == 0:
        for out in outputs:
            totals[0] += float(out["loss_sum"])
            totals[1] += float(out["tokens"])
    all_reduce_sum(totals, dist.group.WORLD)  # None would mean "no group" to group_size
    return float(totals[0]), float(totals[1])


def train_step(model: list, optimizer, batches: list[Batch], global_tokens: int, step: int, t: TrainSection,
               seq_length: int, on_grads: Optional[Callable[[], None]] = None) -> StepResult:
    """One optimizer step over this rank's micro-batches (see the module docstring).

    ``model`` holds the DDP-wrapped chunks, ``optimizer`` the Megatron
    optimizer over them (:mod:`.optim`). ``on_grads`` (collective, if given)
    is called once the gradients are finalized, before clipping: they then
    mean the same at every layout.
    """
    for chunk in model:
        chunk.train()
    zero_grads(model, optimizer)
    dp = group_size(_groups()["dp"])
    # Megatron divides each micro-batch loss by their count; the DP average divides by dp.
    scale = len(batches) * dp / max(global_tokens, 1)
    loss_sum, tokens = run_schedule(model, batches, seq_length, forward_only=False, scale=scale)
    if on_grads is not None:
        on_grads()
    lr = lr_at(step, t)
    norm = optimizer_step(optimizer, lr, t.clip_grad)
    return StepResult(loss_sum / max(tokens, 1.0), int(tokens), norm, lr)


def evaluate(chunks: list, batches: list[Batch], seq_length: int) -> float:
    """Mean loss over the answer tokens of ``batches`` (this rank's share of the eval set)."""
    modes = [c.training for c in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            loss_sum, tokens = run_schedule(chunks, batches, seq_length, forward_only=True)
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)
    return loss_sum / max(tokens, 1.0)
