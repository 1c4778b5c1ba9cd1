"""LoRA on embeddings: ``nn.Embedding`` and megatron-core's ``VocabParallelEmbedding``.

PEFT's semantics and file format (``peft.tuners.lora.layer.Embedding``): A is
``[r, num_embeddings]``, B is ``[embedding_dim, r]``, the lookup adds
``F.embedding(ids, Aᵀ) @ Bᵀ · scaling``, and the files name them
``lora_embedding_A`` / ``lora_embedding_B``. In memory they are the layer's
``lora_A`` / ``lora_B`` factors like on every other layer, so init, merge,
the tensor table and the export treat an embedding as the linear map
``one_hot(ids) ↦ W_oi · one_hot(ids)`` with ``W_oi = weightᵀ`` (``[dim, vocab]``);
``load_state_dict`` also accepts PEFT's in-memory keys (``lora_embedding_A.<adapter>``).
As in PEFT, ``lora_dropout`` is not applied to a lookup, and ``lora_bias``,
DoRA and QALoRA are refused on embeddings.

Under tensor parallelism the vocabulary is split, so A is split along it
(dim 1) and B is replicated, like a row-parallel layer. Each rank looks up
only the ids in its vocab range (zeros elsewhere, as the base does) and adds
its LoRA partial to the base's partial output *before* the embedding's own
all-reduce (reduce-scatter under sequence parallelism): no collective is
added. B's gradient is then a per-rank partial, pre-scaled and tagged like any
replicated factor (:mod:`megalora.grad_sync`).

**Tied output layer.** LoRA on the input embedding leaves the output layer as
it is, as in PEFT: megatron-core's tied output layer (and an HF ``lm_head``)
reads the base table, which LoRA does not change. Merging would write the
delta into that shared table and so change the output layer too (and, at
PP>1, only the first stage's copy of it): merging an embedding LoRA of a tied
model is refused with an error instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..sharding import ShardSpec
from .base import LoraLayer
from .parallel import _mappings, _ParallelLoraLayer


def _embedding_problem(layer: LoraLayer, config) -> str | None:
    """What of ``config`` an embedding cannot carry (PEFT refuses or has no such variant)."""
    name = layer.global_name or type(layer.get_base_layer()).__name__
    for field, value, why in (
        ("lora_bias", config.lora_bias, "an embedding LoRA has no bias (PEFT refuses it too)"),
        ("use_dora", config.use_dora, "megalora has no DoRA for embeddings yet"),
        ("use_qalora", config.use_qalora, "QALoRA pools input features; an embedding's input is token ids"),
    ):
        if value:
            return f"{field}=True is not supported on the embedding {name}: {why}; set {field}=False or leave " \
                   f"{name} out of target_modules"
    init = config.init_lora_weights
    if not (isinstance(init, bool) or init == "gaussian"):
        return f"init_lora_weights={init!r} is not supported on the embedding {name}; use True, False or 'gaussian'"
    return None


class _EmbeddingLora:
    """What plain and vocab-parallel embedding LoRA layers share (a mixin ahead of their ``LoraLayer``)."""

    # Set by the model when the output layer reads this embedding's table (tied embeddings).
    tied_output = False

    def _full_features(self) -> tuple[int, int]:
        base = self.get_base_layer()
        return base.num_embeddings, base.embedding_dim

    def base_weight_oi(self) -> torch.Tensor:
        # The table is [vocab, dim]: as a linear map on one-hot ids its (out, in) weight is the transpose.
        return self.get_base_layer().weight.T

    def _accept_peft_keys(self) -> None:
        """Let ``load_state_dict`` take PEFT's in-memory keys (``lora_embedding_A.<adapter>``) too."""

        def hook(module, state_dict, prefix, *_args):
            for key in [k for k in state_dict if k.startswith(prefix)]:
                rest = key[len(prefix):]
                # The unwrapped-keys hook (registered first) has moved them under base_layer.
                rest = rest[len("base_layer."):] if rest.startswith("base_layer.lora_embedding_") else rest
                head, _, adapter = rest.partition(".")
                if head in ("lora_embedding_A", "lora_embedding_B") and adapter and "." not in adapter:
                    state_dict[f"{prefix}lora_{head[-1]}.{adapter}.weight"] = state_dict.pop(key)

        self.register_load_state_dict_pre_hook(hook)

    def check_config(self, config, adapter: str) -> None:
        problem = _embedding_problem(self, config)
        if problem:
            raise ValueError(problem)

    def _draw_factors(self, config, r: int, a_in: int, out_full: int, gen: torch.Generator):
        """PEFT's embedding init: A zero and B ``N(0, 1)`` (True, 'gaussian'); both ``N(0, 1)`` for False."""
        a = torch.randn(r, a_in, generator=gen)
        b = torch.randn(out_full, r, generator=gen)
        if config.init_lora_weights is not False:
            a.zero_()
        return a, b, None

    def _factor_tensors(self, adapter: str):
        return [
            self._tensor("A", self.lora_A[adapter].weight, self.a_spec, f"lora_A.{adapter}.weight",
                         "lora_embedding_A"),
            self._tensor("B", self.lora_B[adapter].weight, self.b_spec, f"lora_B.{adapter}.weight",
                         "lora_embedding_B"),
        ]

    @property
    def lora_embedding_A(self) -> dict[str, nn.Parameter]:
        """PEFT's name for the A factors (read-only view; the parameters live in ``lora_A``)."""
        return {name: factor.weight for name, factor in self.lora_A.items()}

    @property
    def lora_embedding_B(self) -> dict[str, nn.Parameter]:
        """PEFT's name for the B factors (read-only view; the parameters live in ``lora_B``)."""
        return {name: factor.weight for name, factor in self.lora_B.items()}

    def _to_base_layout(self, weight_oi: torch.Tensor) -> torch.Tensor:
        return weight_oi.T

    def merge(self, *args, **kwargs) -> None:
        if self.tied_output:
            raise ValueError(
                f"cannot merge LoRA into the embedding {self.global_name}: the output layer is tied to it, so "
                "merging would change the output layer too; keep the adapter unmerged, or untie the embeddings")
        super().merge(*args, **kwargs)

    def _lookup(self, adapter: str, ids: torch.Tensor, mask=None) -> torch.Tensor:
        """``s · F.embedding(ids, Aᵀ) @ Bᵀ``, with the rows of ``mask`` (ids of other ranks) zero."""
        a = self._factor_weight(self.lora_A[adapter], self.a_spec)
        b = self._factor_weight(self.lora_B[adapter], self.b_spec)
        after_a = self._embed(ids, a.T)
        if mask is not None:
            after_a = after_a.masked_fill(mask.unsqueeze(-1), 0.0)
        return (after_a @ b.T) * self.scaling[adapter]

    def _embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, weight)


class LoraEmbedding(_EmbeddingLora, LoraLayer):
    """LoRA on a ``torch.nn.Embedding`` (PEFT's ``lora.Embedding``)."""

    def __init__(self, base_layer: nn.Module, *, global_name: str = ""):
        super().__init__(base_layer, global_name=global_name)
        self._accept_peft_keys()

    def _set_base_weight_oi(self, weight: torch.Tensor) -> None:
        base = self.get_base_layer()
        base.weight.data = weight.T.to(base.weight.dtype).contiguous()

    def _embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # PEFT's ``_embed``: the base layer's lookup options apply to the LoRA table too.
        base = self.get_base_layer()
        return F.embedding(ids, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def _forward_active(self, x: torch.Tensor, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                result = result + self._lookup(adapter, x)
        return result


class LoraVocabParallelEmbedding(_EmbeddingLora, _ParallelLoraLayer):
    """LoRA on megatron-core's ``VocabParallelEmbedding``: A split on the vocabulary, B replicated."""

    a_spec = ShardSpec(dim=1)
    b_output_is_partial = True

    def __init__(self, base_layer: nn.Module, *, global_name: str = ""):
        super().__init__(base_layer, global_name=global_name)
        self._accept_peft_keys()

    def _set_base_weight_oi(self, weight: torch.Tensor) -> None:
        # In place, so megatron-core's attributes and DDP buffers stay attached.
        self.get_base_layer().weight.data.copy_(weight.T)

    def _forward_active(self, ids: torch.Tensor):
        """megatron-core's ``VocabParallelEmbedding.forward`` with the LoRA partial added before its reduction."""
        base = self.get_base_layer()
        mask = None
        if self.tp_size > 1:
            mask = (ids < base.vocab_start_index) | (ids >= base.vocab_end_index)
            local_ids = ids.clone() - base.vocab_start_index
            local_ids[mask] = 0
        else:
            local_ids = ids
        out = base.weight[local_ids] if getattr(base, "deterministic_mode", False) else F.embedding(
            local_ids, base.weight)
        if mask is not None:
            out[mask, :] = 0.0
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                out = out + self._lookup(adapter, local_ids, mask).to(out.dtype)
        m, group = _mappings(), self.tp_group
        if getattr(base, "reduce_scatter_embeddings", False):
            # megatron-core's layout change: [b, s, h] -> [s, b, h] before the reduce-scatter.
            return m.reduce_scatter_to_sequence_parallel_region(out.transpose(0, 1).contiguous(), group=group)
        return m.reduce_from_tensor_model_parallel_region(out, group=group)


def mark_tied_embeddings(model: nn.Module) -> None:
    """Flag embedding LoRA layers whose table the output layer also reads (so merging them is refused).

    megatron-core: a ``GPTModel`` with ``share_embeddings_and_output_weights``
    (its ``embedding.word_embeddings``); HF: a model whose output embeddings'
    weight is its input embeddings' base weight.
    """
    for module in model.modules():
        if getattr(module, "share_embeddings_and_output_weights", False) and hasattr(module, "embedding"):
            layer = getattr(module.embedding, "word_embeddings", None)
            if isinstance(layer, _EmbeddingLora):
                layer.tied_output = True
        get_in, get_out = getattr(module, "get_input_embeddings", None), getattr(module, "get_output_embeddings", None)
        if callable(get_in) and callable(get_out):
            inp, out = get_in(), get_out()
            if isinstance(inp, _EmbeddingLora) and getattr(out, "weight", None) is inp.get_base_layer().weight:
                inp.tied_output = True
