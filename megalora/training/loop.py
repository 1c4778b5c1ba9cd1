"""One optimizer step and one evaluation, through Megatron's pipeline schedule.

A step runs ``get_forward_backward_func()`` (no pipelining, 1F1B, or the
interleaved schedule under virtual pipelining) over this data-parallel rank's
micro-batches, whose gradients accumulate. Then, in order:

1. ``megalora.sync_lora_grads(chunks)`` sums the TP-partial gradients of the
   replicated LoRA factors (one all-reduce per TP group); grads of
   ``sequence_parallel`` params (norms in ``modules_to_save``) are summed over
   TP. This is what megatron-core's ``finalize_model_grads`` does for a model
   wrapped in its DDP; this loop keeps plain ``.grad`` tensors instead, so it
   needs neither DDP buffers nor a CUDA device.
2. The gradients are averaged over the data-parallel group.
3. The global grad norm counts each TP-replicated parameter once
   (:func:`megalora.training.grad_reduce.grad_norm_fp32`) and clips all grads by it.
4. The LR for the step is set from the schedule, and AdamW steps.

The loss of every micro-batch is the sum of its answer-token losses divided
by the answer tokens of the whole *global* batch (times the factors Megatron's
schedule and the DP average divide by), so the step's loss and gradients are
the same at every layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..collectives import all_reduce_sum, group_size
from .grad_reduce import all_reduce_grads, grad_norm_fp32
from ..data import Batch
from .config import TrainSection


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


def trainable_params(chunks: list) -> list[torch.nn.Parameter]:
    """LoRA (and modules_to_save) params, in one fixed order on every rank of a stage."""
    return [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]


def make_optimizer(chunks: list, t: TrainSection) -> torch.optim.Optimizer:
    """AdamW over the trainable params only; the base model is frozen and never seen."""
    params = trainable_params(chunks)
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             weight_decay=t.weight_decay)


def _groups():
    from megatron.core import parallel_state as ps

    return dict(tp=ps.get_tensor_model_parallel_group(), dp=ps.get_data_parallel_group(),
                pp=ps.get_pipeline_model_parallel_group(), mp=ps.get_model_parallel_group(),
                tp_rank=ps.get_tensor_model_parallel_rank(), last=ps.is_pipeline_last_stage())


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


def clip_grads(params: list[torch.nn.Parameter], max_norm: float, total_norm: float) -> None:
    """Scale every grad by ``max_norm / total_norm`` when the norm is above ``max_norm`` (local)."""
    coeff = max_norm / (total_norm + 1e-6)
    if max_norm > 0 and coeff < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coeff)


def train_step(chunks: list, optimizer: torch.optim.Optimizer, batches: list[Batch], global_tokens: int,
               step: int, t: TrainSection, seq_length: int) -> StepResult:
    """One optimizer step over this rank's micro-batches (see the module docstring)."""
    from .. import sync_lora_grads

    groups = _groups()
    for chunk in chunks:
        chunk.train()
    optimizer.zero_grad(set_to_none=True)
    dp = group_size(groups["dp"])
    # Megatron divides each micro-batch loss by their count; the DP average divides by dp.
    scale = len(batches) * dp / max(global_tokens, 1)
    loss_sum, tokens = run_schedule(chunks, batches, seq_length, forward_only=False, scale=scale)

    params = trainable_params(chunks)
    sync_lora_grads(chunks)
    all_reduce_grads([p for p in params if getattr(p, "sequence_parallel", False)], groups["tp"])
    all_reduce_grads(params, groups["dp"], average=True)
    norm = grad_norm_fp32(params, groups["tp"], groups["mp"])
    clip_grads(params, t.clip_grad, norm)
    lr = lr_at(step, t)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
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
