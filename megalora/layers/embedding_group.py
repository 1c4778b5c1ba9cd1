"""The gradient of trainable-token rows tied across the first and last pipeline stage.

At PP>1 a tied model holds the rows twice: the embedding's on the first stage,
the output layer's copy on the last. Both must get the sum of the two stages'
gradients, as megatron-core's ``finalize_model_grads`` gives the shared
embedding weight over its embedding group; and both stages must always take
part, so that one without a gradient cannot leave the other waiting.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


def link_embedding_group_grad(weight: Optional[torch.Tensor], delta: nn.Parameter) -> None:
    """Make megatron's embedding-group all-reduce of the frozen tied weight sum ``delta``'s gradient.

    ``finalize_model_grads`` all-reduces ``shared_embedding_or_output_weight()``'s
    ``main_grad`` over the embedding group (first and last stage) whenever it
    exists; the frozen table has none. Pointing it at the delta's DDP gradient
    buffer (which DDP creates for every trainable parameter, on both stages
    alike) makes that one all-reduce sum the two stages' delta gradients in
    place, so both ends always take part together and no collective is added.
    """
    if weight is None:
        return
    main_grad = getattr(delta, "main_grad", None)
    if delta.requires_grad and main_grad is not None:
        weight.main_grad = main_grad
    elif "main_grad" in vars(weight):
        del weight.main_grad


def sync_embedding_group_grads(layers: Sequence[nn.Module]) -> int:
    """Collective over megatron's embedding group: sum the tied deltas' ``.grad`` (a plain loop's step call).

    Both the first and the last stage hold a synced delta for the same
    adapters, so both call this with the same list; a missing gradient is sent
    as zeros, so one stage without a gradient cannot leave the other waiting.
    """
    from megatron.core import parallel_state as ps

    from ..collectives import all_reduce_coalesced

    deltas = [p for layer in layers if layer.embedding_group_synced
              for _, p in sorted(layer.token_adapter.trainable_tokens_delta.items()) if p.requires_grad]
    if not deltas:
        return 0
    for p in deltas:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_coalesced([p.grad for p in deltas], ps.get_embedding_group(), average=False)
    return len(deltas)
