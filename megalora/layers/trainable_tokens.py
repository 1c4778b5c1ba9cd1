"""Trainable tokens (PEFT's ``trainable_token_indices``): a few rows of an embedding table trained.

As PEFT's ``TrainableTokensLayer``, the adapter holds the trained rows
themselves (``trainable_tokens_delta``, ``[len(ids), dim]``, a copy of the
original rows at the start), and the forward replaces the listed rows of the
frozen table by them, which is what PEFT's ``index_copy`` does. File key:
``base_model.model.<module>.token_adapter.trainable_tokens_delta``.

**Sharding.** Under TP the vocabulary is split: each rank holds the delta rows
of the ids in its own vocab range (a :class:`~megalora.sharding.ShardSpec`
with ``rows``), so a row is held once and a lookup of an id outside the range
contributes nothing. The replacement happens on the local shard, before the
embedding's own all-reduce (or reduce-scatter under SP) and inside the output
layer's own matmul, so no collective is added. The frozen table is never
copied: the embedding swaps looked-up rows, the output layer overwrites the
logit columns of the listed ids (:class:`_ReplaceColumns`).

**Tied output layer.** At PP=1 megatron-core passes the embedding weight to the
output layer; its layer then shares the embedding layer's delta (``tied_to``,
kept out of the module tree, as PEFT does) and saves nothing. At PP>1 the last
stage holds a copy, saved under the embedding's key (so the file has one
tensor at every layout, and loading fills both), whose gradient is summed
with the first stage's over megatron's embedding group, as
``finalize_model_grads`` does for the shared weight (:mod:`megalora.layers.embedding_group`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..sharding import ShardSpec
from .embedding_group import link_embedding_group_grad
from .face import BaseLayerFace, unwrapped_keys_to
from .tensors import AdapterTensor

DELTA_KEY = "token_adapter.trainable_tokens_delta"


def _mappings():
    from megatron.core.tensor_parallel import mappings

    return mappings


def vocab_layout(base: nn.Module) -> tuple[int, int, int, Any]:
    """``(full vocab size, this rank's first id, TP size, TP group)`` of an embedding or output layer."""
    group = getattr(base, "tp_group", None)
    size = 1 if group is None else group.size()
    rank = 0 if group is None else group.rank()
    if hasattr(base, "vocab_start_index"):  # VocabParallelEmbedding
        return base.num_embeddings, base.vocab_start_index, size, group
    if hasattr(base, "output_size_per_partition"):  # ColumnParallelLinear
        return base.output_size, rank * base.output_size_per_partition, size, group
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, 0, 1, None
    if isinstance(base, nn.Linear):
        return base.out_features, 0, 1, None
    raise TypeError(f"trainable tokens need an embedding or an output layer, got {type(base).__name__}")


def rows_spec(ids: Sequence[int], vocab: int, tp_size: int) -> ShardSpec:
    """Which rank holds which delta row: the one whose vocab range (megatron's even split) holds the id."""
    per_rank = vocab // tp_size
    return ShardSpec(dim=0, rows=tuple(tuple(i for i, t in enumerate(ids) if r * per_rank <= t < (r + 1) * per_rank)
                                       for r in range(tp_size)))


class _ReplaceColumns(torch.autograd.Function):
    """``x Wᵀ + b`` with the columns ``cols`` computed from ``D`` instead of ``W[cols]`` (frozen ``W``).

    What ``F.linear(x, W.index_copy(0, cols, D), b)`` computes, without a copy
    of the (vocab-sized) table and with only ``x`` saved for backward.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, delta, cols):
        out = F.linear(x2, weight, bias)
        out.index_copy_(1, cols, F.linear(x2, delta.to(x2.dtype), None if bias is None else bias[cols]))
        ctx.save_for_backward(x2, weight, delta, cols)
        return out

    @staticmethod
    def backward(ctx, grad):
        x2, weight, delta, cols = ctx.saved_tensors
        g_cols = grad.index_select(1, cols)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).addmm_(g_cols, delta.to(weight.dtype) - weight.index_select(0, cols))
        if ctx.needs_input_grad[3]:
            grad_delta = (g_cols.t() @ x2).to(delta.dtype)
        return grad_x, None, None, grad_delta, None


class TrainableTokensLayer(BaseLayerFace):
    """An embedding or output layer with some rows trained (see the module docstring).

    Args:
        base_layer: ``VocabParallelEmbedding``, ``ColumnParallelLinear`` (an
            output layer), ``nn.Embedding`` or ``nn.Linear``.
        global_name: The layer's global module name.
        saved_name: The module name the delta is saved under (the
            embedding's, for the last stage's tied copy at PP>1).
        tied_to: At PP=1, the embedding's layer whose delta this (output)
            layer shares; it then owns no tensor.
        embedding_group_synced: Whether the delta's gradient is summed over
            megatron's embedding group (both ends of a tied model at PP>1).
    """

    adapter_layer_names = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Module, global_name: str, saved_name: Optional[str] = None,
                 tied_to: Optional["TrainableTokensLayer"] = None, embedding_group_synced: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.global_name = global_name
        self.saved_name = saved_name or global_name
        self.is_embedding = isinstance(base_layer, nn.Embedding) or hasattr(base_layer, "vocab_start_index")
        self.vocab, self.vocab_start, self.tp_size, self.tp_group = vocab_layout(base_layer)
        self.tp_rank = 0 if self.tp_group is None else self.tp_group.rank()
        # A list keeps the tied layer out of the module tree (and the state dict), as PEFT does.
        self._tied = [tied_to] if tied_to is not None else []
        self.embedding_group_synced = embedding_group_synced
        self.token_adapter = nn.Module()
        self.token_adapter.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}
        self._originals: dict[str, torch.Tensor] = {}
        self.merged_adapters: list[str] = []
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.register_load_state_dict_pre_hook(unwrapped_keys_to("base_layer"))

    # ------------------------------------------------------------------ adapters

    @property
    def tied_to(self) -> Optional["TrainableTokensLayer"]:
        return self._tied[0] if self._tied else None

    @property
    def trainable_tokens_delta(self) -> nn.ParameterDict:
        return (self.tied_to or self).token_adapter.trainable_tokens_delta

    def indices(self, adapter: str) -> list[int]:
        return (self.tied_to or self).token_indices[adapter]

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def spec(self, adapter: str) -> ShardSpec:
        return rows_spec(self.indices(adapter), self.vocab, self.tp_size)

    def local_rows(self, adapter: str) -> torch.Tensor:
        """The table rows (local indices) this rank's delta rows replace, in delta order."""
        ids = self.indices(adapter)
        owned = self.spec(adapter).rows[self.tp_rank]
        return torch.tensor([ids[i] - self.vocab_start for i in owned], dtype=torch.long)

    def update_layer(self, adapter: str, token_indices: Sequence[int], source: Optional[torch.Tensor]) -> None:
        """Add ``adapter``'s delta, a copy of ``source``'s rows (this rank's shard of the table).

        A layer tied to the embedding's (``tied_to``) only records the ids.
        """
        if self.tied_to is not None:
            return
        self.token_indices[adapter] = list(token_indices)
        rows = self.local_rows(adapter).to(source.device)
        delta = nn.Parameter(source.detach().index_select(0, rows).clone())
        if self.tp_size > 1:
            # Each rank's rows are its own: grad clipping counts them once per rank.
            delta.tensor_model_parallel, delta.partition_dim, delta.partition_stride = True, 0, 1
        if self.embedding_group_synced and not self.is_embedding:
            delta.shared = True  # the last stage's copy: counted once, on the first stage
        self.token_adapter.trainable_tokens_delta[adapter] = delta

    def tensors(self, adapter: str) -> list[AdapterTensor]:
        """The delta (full rows in the file), or nothing for a layer that shares the embedding's."""
        if self.tied_to is not None or adapter not in self.trainable_tokens_delta:
            return []
        return [AdapterTensor("tokens", self.trainable_tokens_delta[adapter], self.spec(adapter), self.tp_group,
                              self.saved_name, f"{DELTA_KEY}.{adapter}", DELTA_KEY)]

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if self.tied_to is None:
            for key, param in self.trainable_tokens_delta.items():
                param.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled and self.merged:
            self.unmerge()
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
        if self.tied_to is None and adapter_name in self.token_adapter.trainable_tokens_delta:
            del self.token_adapter.trainable_tokens_delta[adapter_name]
            self.token_indices.pop(adapter_name, None)
        self._active_adapter = [a for a in self._active_adapter if a != adapter_name]

    def _adapter(self) -> Optional[str]:
        """The one active adapter with rows here (PEFT allows one at a time)."""
        return next((a for a in self._active_adapter if a in self.trainable_tokens_delta), None)

    # ------------------------------------------------------------------ merging

    def _table(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "weight", None)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Write the delta rows into this rank's shard of the table (the originals are kept for unmerge)."""
        names = [a for a in (self._active_adapter if adapter_names is None else adapter_names)
                 if a in self.trainable_tokens_delta and a not in self.merged_adapters]
        if not names:
            return
        if self.tied_to is not None:
            # The table is the embedding's, which its own layer merges.
            self.merged_adapters.extend(names)
            return
        table = self._table()
        if table is None:
            raise ValueError(
                f"{self.global_name}: trainable tokens cannot be merged into an output layer tied to the word "
                "embeddings with rows of its own (it would change the embeddings too); use the same ids as the "
                "embedding, or an untied model")
        with torch.no_grad():
            for adapter in names:
                rows = self.local_rows(adapter).to(table.device)
                delta = self.trainable_tokens_delta[adapter].detach().to(table.dtype)
                if safe_merge and not torch.isfinite(delta).all():
                    raise ValueError(f"NaNs detected in the trainable tokens of adapter {adapter!r}")
                self._originals[adapter] = table.data.index_select(0, rows).clone()
                table.data.index_copy_(0, rows, delta)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        table = self._table()
        with torch.no_grad():
            while self.merged_adapters:
                adapter = self.merged_adapters.pop()
                if adapter in self._originals:
                    rows = self.local_rows(adapter).to(table.device)
                    table.data.index_copy_(0, rows, self._originals.pop(adapter))

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if self._disable_adapters and self.merged:
            self.unmerge()
        adapter = None if self._disable_adapters or self.merged else self._adapter()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        delta = self.trainable_tokens_delta[adapter]
        if self.embedding_group_synced:
            link_embedding_group_grad(self._table(), delta)
        if self.is_embedding:
            return self._embed(x, delta, self.local_rows(adapter).to(x.device))
        return self._output(x, delta, self.local_rows(adapter).to(x.device), *args, **kwargs)

    def _embed(self, ids: torch.Tensor, delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(ids, base.weight, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
            return _swap_rows(out, ids, None, delta, rows)
        # megatron-core's VocabParallelEmbedding.forward, with the rows swapped before its reduction.
        input_mask = None
        masked = ids
        if self.tp_size > 1:
            input_mask = (ids < base.vocab_start_index) | (ids >= base.vocab_end_index)
            masked = ids.clone() - base.vocab_start_index
            masked[input_mask] = 0
        out = base.weight[masked] if base.deterministic_mode else F.embedding(masked, base.weight)
        if input_mask is not None:
            out[input_mask, :] = 0.0
        out = _swap_rows(out, masked, input_mask, delta, rows)
        m = _mappings()
        if base.reduce_scatter_embeddings:
            out = out.transpose(0, 1).contiguous()
            return m.reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
        return m.reduce_from_tensor_model_parallel_region(out, group=self.tp_group)

    def _output(self, x: torch.Tensor, delta: torch.Tensor, cols: torch.Tensor, weight=None,
                runtime_gather_output=None):
        base = self.base_layer
        if isinstance(base, nn.Linear):
            x2 = x.reshape(-1, x.shape[-1])
            out = _replace_columns(x2, base.weight, base.bias, delta, cols)
            return out.view(*x.shape[:-1], out.shape[-1])
        # megatron-core's ColumnParallelLinear.forward, the columns replaced inside its matmul.
        weight = base.weight if weight is None else weight
        m = _mappings()
        if getattr(base, "sequence_parallel", False):
            x = m.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.tp_group)
        elif self.tp_size > 1 and not getattr(base, "disable_grad_reduce", False):
            x = m.copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        bias = base.bias if base.bias is not None and not base.skip_bias_add else None
        out = _replace_columns(x.reshape(-1, x.shape[-1]), weight, bias, delta, cols)
        out = out.view(*x.shape[:-1], out.shape[-1])
        gather = base.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            out = m.gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, (base.bias if base.skip_bias_add else None)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict = None) -> dict:
        """megatron-core distributed checkpointing: the base layer's tensors under its own keys, then the rows.

        The base keys are unchanged, so megatron-core's ``LanguageModule`` finds
        ``output_layer.weight`` and a base checkpoint loads. Each trained row is
        one tensor, keyed by its token id (``<module>.token_adapter.trainable_tokens_delta.<adapter>.<id>``)
        and written by the TP rank that owns it, so the checkpoint reshards to
        any layout; the last stage's tied copy is a replica of the embedding's rows.
        """
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        from ..collectives import group_rank

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = dict(self.base_layer.sharded_state_dict(prefix, sharded_offsets, metadata))
        if self.tied_to is not None:
            return out
        dp_rank = group_rank(metadata["dp_cp_group"])
        head = prefix[: len(prefix) - len(self.global_name) - 1] if prefix.endswith(self.global_name + ".") else None
        base = f"{head}{self.saved_name}." if head is not None else prefix
        copy = int(self.embedding_group_synced and not self.is_embedding)
        for adapter, delta in self.token_adapter.trainable_tokens_delta.items():
            ids = self.indices(adapter)
            for j, i in enumerate(self.spec(adapter).rows[self.tp_rank]):
                key = f"{DELTA_KEY}.{adapter}.{ids[i]}"
                out[prefix + key] = ShardedTensor.from_rank_offsets(base + key, delta[j], replica_id=(copy, 0, dp_rank))
        return out

    def extra_repr(self) -> str:
        return f"global_name={self.global_name!r}, tied={self.tied_to is not None}"


def _replace_columns(x2, weight, bias, delta, cols):
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        # A trainable base (not megalora's case): let autograd see the replaced table.
        return F.linear(x2, weight.index_copy(0, cols, delta.to(weight.dtype)), bias)
    return _ReplaceColumns.apply(x2, weight, bias, delta, cols)


def _swap_rows(out: torch.Tensor, ids: torch.Tensor, outside: Optional[torch.Tensor], delta: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
    """``out`` with the looked-up row of every listed id taken from ``delta`` (``ids`` local to the shard)."""
    if rows.numel() == 0:
        # No listed id in this rank's range: the output must still need a gradient, as on the
        # ranks that own rows, or the first layer's backward all-reduce would run on those only.
        return out + delta.sum().to(out.dtype) if delta.requires_grad else out
    order = torch.argsort(rows)
    ordered = rows[order]
    pos = torch.searchsorted(ordered, ids).clamp_(max=rows.numel() - 1)
    hit = ordered[pos] == ids
    if outside is not None:
        hit &= ~outside
    return torch.where(hit.unsqueeze(-1), delta[order[pos]].to(out.dtype), out)


def merged_table(layer: TrainableTokensLayer, adapters: Sequence[str]) -> Optional[torch.Tensor]:
    """Collective over the layer's TP group: the full table with ``adapters``' rows written in.

    The merged export's tensor for the layer's weight (on the TP group's rank
    0; ``None`` elsewhere): the table and the rows are gathered whole and
    merged there, so the export is the same at every layout.
    """
    from ..sharding import gather_full, param_shard_spec

    table = gather_full(layer.get_base_layer().weight.detach(), param_shard_spec(layer.get_base_layer().weight),
                        layer.tp_group, dst=0)
    rows = [(layer.indices(a), gather_full(layer.trainable_tokens_delta[a].detach(), layer.spec(a), layer.tp_group,
                                           dst=0)) for a in adapters]
    if table is None:
        return None
    for ids, delta in rows:
        table = table.index_copy(0, torch.tensor(ids, dtype=torch.long), delta.to(table.dtype))
    return table
