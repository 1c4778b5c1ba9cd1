"""Greedy decoding through the Megatron model, at any TP/PP layout.

Each new token costs one forward pass over the whole sequence (no KV cache),
run through Megatron's schedule with ``forward_only=True`` so that pipeline
stages pass activations as in training. The last stage gathers the
last position's vocabulary shards across TP, takes the argmax, and
broadcasts the token to every stage. Answers here are a few tokens long, so
the missing cache costs little.
"""

from __future__ import annotations

import torch

from ..collectives import broadcast_object
from ..sharding import ShardSpec, gather_full
from ..data import Batch


def _next_token_logits(chunks: list, ids: list[int], pad_to: int, copies: int) -> torch.Tensor | None:
    """Full-vocab logits after ``ids`` on the last stage; ``None`` elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    length = -(-len(ids) // pad_to) * pad_to
    tokens = torch.zeros(1, length, dtype=torch.long)
    tokens[0, :len(ids)] = torch.tensor(ids)
    batch = Batch(tokens, tokens, torch.zeros_like(tokens, dtype=torch.float32),
                  torch.arange(length).unsqueeze(0))
    last = len(ids) - 1

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        logits = model(b.tokens, b.position_ids, None)
        return logits, lambda out: (out.new_zeros(()), {"logits": out[0, last].detach().float()})

    iterators = [iter([batch] * copies) for _ in chunks]
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks, num_microbatches=copies, seq_length=length, micro_batch_size=1, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return gather_full(outputs[0]["logits"], ShardSpec(dim=0), ps.get_tensor_model_parallel_group())


def greedy_generate(chunks: list, prompt_ids: list[int], max_new_tokens: int, eos_id: int,
                    vocab_limit: int, sequence_parallel: bool = False) -> list[int]:
    """The greedily decoded continuation of ``prompt_ids`` (without the prompt).

    Collective over the world group: every rank calls it with the same prompt.

    Args:
        chunks: This rank's model chunks.
        prompt_ids: The prompt tokens.
        max_new_tokens: Stop after this many tokens.
        eos_id: Stop after this token (it is not returned).
        vocab_limit: Only ids below it are candidates (padded vocab rows are not tokens).
        sequence_parallel: Whether the sequence must be padded to a multiple of TP.
    """
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    # The interleaved schedule needs at least PP micro-batches: send the prompt PP times.
    copies = pp if len(chunks) > 1 else 1
    pad_to = ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1
    modes = [c.training for c in chunks]
    for chunk in chunks:
        chunk.eval()
    ids, out = list(prompt_ids), []
    try:
        for _ in range(max_new_tokens):
            logits = _next_token_logits(chunks, ids, pad_to, copies)
            token = int(logits[:vocab_limit].argmax()) if logits is not None else None
            token = broadcast_object(token, src=pp - 1, group=ps.get_pipeline_model_parallel_group())
            if token == eos_id:
                break
            ids.append(token)
            out.append(token)
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)
    return out
