"""Tokenized examples, and the micro-batches each rank feeds Megatron's schedule.

Every rank tokenizes (or receives) the whole data set and computes the same
sample order, so a step's global batch is known everywhere without
communication: data-parallel rank ``d`` takes its contiguous slice, cut into
micro-batches. The loss is averaged over the answer tokens of the *global*
batch, whose count every rank computes from the same order, so the loss and
gradients do not depend on how the batch is split across ranks and
micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tasks import Example


@dataclass
class Batch:
    """One micro-batch, ``[b, s]`` tensors; the loss counts where ``loss_mask`` is 1."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor


@dataclass
class TokenizedSet:
    """Fixed-length rows: inputs, next-token labels, and a mask on the answer tokens."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index: list[int] | torch.Tensor) -> Batch:
        index = torch.as_tensor(index, dtype=torch.long)
        b, s = len(index), self.tokens.shape[1]
        return Batch(self.tokens[index], self.labels[index], self.loss_mask[index],
                     torch.arange(s).unsqueeze(0).expand(b, s).contiguous())


def tokenize(examples: list[Example], tokenizer, seq_length: int) -> TokenizedSet:
    """Prompt + answer + end token, shifted into inputs and labels, padded to ``seq_length``.

    Raises:
        ValueError: When an example does not fit ``seq_length`` (naming the
            longest, so the fix is obvious).
    """
    rows, longest = [], 0
    for ex in examples:
        prompt = tokenizer.prompt_ids(ex.question)
        answer = tokenizer.encode(ex.answer) + [tokenizer.eos_id]
        ids = prompt + answer
        longest = max(longest, len(ids) - 1)
        rows.append((ids, len(prompt)))
    if longest > seq_length:
        raise ValueError(f"data.seq_length={seq_length} is too short: the longest example needs {longest} "
                         f"tokens; set data.seq_length={longest} or more")
    n = len(rows)
    tokens = torch.full((n, seq_length), tokenizer.eos_id, dtype=torch.long)
    labels = torch.full((n, seq_length), tokenizer.eos_id, dtype=torch.long)
    mask = torch.zeros((n, seq_length), dtype=torch.float32)
    for i, (ids, prompt_len) in enumerate(rows):
        length = len(ids) - 1
        tokens[i, :length] = torch.tensor(ids[:-1])
        labels[i, :length] = torch.tensor(ids[1:])
        # Position t predicts token t+1: the answer starts at label prompt_len - 1.
        mask[i, prompt_len - 1:length] = 1.0
    return TokenizedSet(tokens, labels, mask)


def sample_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The permutation of ``n`` examples used in ``epoch`` (same on every rank)."""
    gen = torch.Generator().manual_seed(int(seed) * 7919 + int(epoch))
    return torch.randperm(n, generator=gen)


def global_batch_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Example indices of step ``step``'s global batch; epochs follow each other seamlessly."""
    out, orders = [], {}
    for k in range(step * global_batch, (step + 1) * global_batch):
        epoch, pos = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = sample_order(n, epoch, seed)
        out.append(int(orders[epoch][pos]))
    return out


def step_microbatches(data: TokenizedSet, step: int, global_batch: int, micro_batch: int, dp_rank: int,
                      dp_size: int, seed: int) -> tuple[list[Batch], int]:
    """This DP rank's micro-batches for ``step``, and the global batch's answer-token count."""
    index = global_batch_indices(len(data), step, global_batch, seed)
    tokens = int(data.loss_mask[torch.tensor(index)].sum().item())
    per_rank = global_batch // dp_size
    mine = index[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return [data.rows(mine[i:i + micro_batch]) for i in range(0, per_rank, micro_batch)], tokens


def eval_microbatches(data: TokenizedSet, micro_batch: int, dp_rank: int, dp_size: int,
                      multiple: int = 1) -> list[Batch]:
    """All of ``data``, split over DP ranks, padded with fully masked rows.

    The padding makes every DP rank run the same number of micro-batches, a
    multiple of ``multiple`` (the interleaved pipeline schedule needs one of PP).
    """
    per_step = micro_batch * dp_size * multiple
    total = -(-len(data) // per_step) * per_step
    index = list(range(len(data))) + [0] * (total - len(data))
    valid = [1.0] * len(data) + [0.0] * (total - len(data))
    per_rank = total // dp_size
    lo = dp_rank * per_rank
    out = []
    for i in range(lo, lo + per_rank, micro_batch):
        batch = data.rows(index[i:i + micro_batch])
        batch.loss_mask = batch.loss_mask * torch.tensor(valid[i:i + micro_batch]).unsqueeze(1)
        out.append(batch)
    return out
