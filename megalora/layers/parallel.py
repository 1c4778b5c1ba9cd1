"""LoRA on megatron-core's tensor-parallel linear layers.

The sharding rule (see :mod:`megalora.sharding`):

==================  =================  ===================  =================
base layer          A ``[r, in]``      B ``[out, r]``       DoRA magnitude
==================  =================  ===================  =================
column-parallel     replicated         split on dim 0       split on dim 0
row-parallel        split on dim 1     replicated           replicated
==================  =================  ===================  =================

No collective of its own. Each layer runs the base layer's matmul itself, so
the LoRA path shares the base layer's one collective:

* column: the input copy (all-reduce of dgrad in backward) or, under sequence
  parallelism, the all-gather (reduce-scatter in backward) covers both the base
  and the LoRA input gradient;
* row: the LoRA partial output ``B · A_k x_k`` is added to the base partial
  output before the base's all-reduce (or reduce-scatter under SP).

The price is that a replicated factor's gradient is a per-rank partial sum. The
forward multiplies that gradient by the TP size and tags the parameter with
``average_gradients_across_tp_domain``, so megatron-core's
``finalize_model_grads`` (one coalesced all-reduce per step, for all layers)
turns it into the sum. A plain loop calls :func:`megalora.sync_lora_grads`
after backward instead.

DoRA on a row-parallel layer is the one exception: its weight norm runs over
the sharded input dimension, so each forward all-reduces one ``[out]`` vector
of squared norms (a weight-sized vector, not an activation).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..collectives import all_reduce_sum, group_rank
from ..dist_checkpoint_tensors import sharded_tensor
from ..experts import follows_base_allreduce
from ..grad_sync import is_dense_tp_group, mark_tp_replicated, mark_tp_sharded, scale_grad
from ..sharding import ShardSpec
from .base import LoraLayer


def _mappings():
    from megatron.core.tensor_parallel import mappings

    return mappings


def _tp_group(base: nn.Module):
    group = getattr(base, "tp_group", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group


class _FrozenLinearLora(torch.autograd.Function):
    """``x Wᵀ + bias + s·(x Aᵀ) Bᵀ`` for a frozen ``W``, as one autograd node (2-D ``x``).

    Built from autograd ops, the LoRA path costs more than its four small
    GEMMs: the input gradient arrives as two tensors summed in one more pass,
    B's gradient comes out of the slower GEMM orientation, and the TP grad
    scale of a replicated factor is one more node. Here the backward
    accumulates LoRA's input gradient into the base's (``addmm_``), and only
    ``x`` (for A's gradient; the frozen ``W`` needs none), ``x Aᵀ`` and the
    weights are saved.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, a_grad_scale, b_grad_scale):
        out = F.linear(x, weight, bias)
        h = F.linear(x, a)
        # PEFT's order (product, scale, add) so that outputs match PEFT's bit
        # for bit; addmm's alpha would round differently.
        out.add_(F.linear(h, b).mul_(scale))
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scales = (scale, a_grad_scale, b_grad_scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b, h = ctx.saved_tensors
        scale, a_grad_scale, b_grad_scale = ctx.scales
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_a = grad_b = None
        if need_b:
            # h^T·grad is the fast orientation; transposed back, it is B's [out, r] gradient.
            grad_b = (h.t() @ grad).mul_(scale * b_grad_scale).t()
        if need_x or need_a:
            grad_h = (grad @ b).mul_(scale)
            if need_a:
                grad_a = (grad_h.t() @ x).mul_(a_grad_scale)
            if need_x:
                grad_x = (grad @ weight).addmm_(grad_h, a)
        return grad_x, None, None, grad_a, grad_b, None, None, None


class _ParallelLoraLayer(LoraLayer):
    """What column and row variants share."""

    def __init__(self, base_layer: nn.Module, *, global_name: str = "", out_chunks: int = 1):
        super().__init__(base_layer, tp_group=_tp_group(base_layer), global_name=global_name, out_chunks=out_chunks)

    def _full_features(self) -> tuple[int, int]:
        base = self.get_base_layer()
        return base.input_size, base.output_size

    def base_weight_oi(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        if weight is None:
            raise RuntimeError(
                "this layer has no weight of its own (it is given one at forward, e.g. an output layer tied "
                "to the embeddings): DoRA and merging need a weight; target another module or untie it"
            )
        return weight

    def _set_base_weight_oi(self, weight: torch.Tensor) -> None:
        # In place, so megatron-core's attributes and DDP buffers stay attached.
        self.get_base_layer().weight.data.copy_(weight)

    @property
    def _sequence_parallel(self) -> bool:
        base = self.get_base_layer()
        return bool(getattr(base, "sequence_parallel", False)) and not getattr(base, "explicit_expert_comm", False)

    def _factor_weight(self, factor: nn.Module, spec: ShardSpec) -> torch.Tensor:
        if spec.sharded or self.tp_size == 1:
            return factor.weight
        return scale_grad(factor.weight, float(self.tp_size))

    def _base_and_lora(self, x2: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """Base GEMM (bias folded in) plus every active adapter, for a 2-D ``x2``.

        The common training case (a frozen base, one plain LoRA adapter, no
        dropout, one dtype, no autocast) runs as one :class:`_FrozenLinearLora`
        node; anything else composes autograd ops through ``_apply_adapters``.
        """
        names = [n for n in self.active_adapters if n in self.lora_A]
        if len(names) == 1:
            name = names[0]
            a, b = self.lora_A[name].weight, self.lora_B[name]
            dropout = self.lora_dropout[name]
            if not (
                not self.lora_variant[name].fusable
                or b.bias is not None
                or weight.requires_grad
                or (bias is not None and bias.requires_grad)
                or (self.training and not isinstance(dropout, nn.Identity))
                or not (x2.dtype == weight.dtype == a.dtype == b.weight.dtype)
                or torch.is_autocast_enabled(x2.device.type)
            ):
                tp = float(self.tp_size)
                a_scale = 1.0 if self.a_spec.sharded else tp
                b_scale = 1.0 if self.b_spec.sharded else tp
                return _FrozenLinearLora.apply(x2, weight, bias, a, b.weight, self.scaling[name], a_scale, b_scale)
        return self._apply_adapters(x2, F.linear(x2, weight, bias), bias, inplace=True)

    def _tag_parameters(self, adapter_name: str) -> None:
        # A routed expert's layer is split over the expert-TP group and its
        # weight reduced over the expert-DP group: its factors follow both.
        dense = is_dense_tp_group(self.tp_group)
        base_weight = getattr(self.get_base_layer(), "weight", None)
        for entry in self.tensors(adapter_name):
            follows_base_allreduce(entry.param, base_weight)
            if entry.spec.sharded:
                mark_tp_sharded(entry.param, entry.spec.dim, 1)
            elif not dense and self.tp_size == 1:
                mark_tp_sharded(entry.param, 0, 1)  # whole on this rank, unique in its group
            else:
                mark_tp_replicated(entry.param, dense)
                if not dense:
                    # megatron-core's grad norm drops TP duplicates by the *dense* TP rank;
                    # ``shared`` keeps the other expert-TP ranks' copies out of it instead.
                    entry.param.shared = self.tp_rank != 0

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict = None) -> dict:
        """megatron-core distributed checkpointing: the base layer's tensors, then every adapter's.

        The base layer's entries keep its own names, as checkpoint keys and as dict
        keys (``<prefix>weight``), as on an unwrapped layer: a base-model checkpoint
        loads into the adapted model, and megatron-core's ``LanguageModule`` finds
        ``output_layer.weight`` to tie or mark. ``load_state_dict`` maps them back to
        ``base_layer.*`` (:func:`~megalora.layers.face.unwrapped_keys_to`).
        Each factor is one :func:`~megalora.dist_checkpoint_tensors.sharded_tensor` under
        ``<prefix>lora_A.<adapter>.weight`` with its own shard spec: sharded
        factors are written by every TP rank, replicated ones once, and a gated
        ``linear_fc1``'s B (and base weight) in the canonical ``[gate; up]``
        layout, so an adapter saved at one TP/PP layout loads at any other.
        """
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = bool(metadata.get("singleton_local_shards", False))
        # Unchanged keys also let megatron-core's MLP apply its SwiGLU layout to a gated
        # linear_fc1's base weight, as it does on the unwrapped layer.
        out = dict(self.get_base_layer().sharded_state_dict(prefix, sharded_offsets, metadata))
        dp_rank = group_rank(metadata["dp_cp_group"])
        for adapter in self.lora_A:
            for entry in self.tensors(adapter):
                key = f"{prefix}{entry.local_key}"
                out[key] = sharded_tensor(
                    entry.param, key, entry.spec, self.tp_rank, self.tp_size, dp_rank, tuple(sharded_offsets),
                    singleton,
                )
        return out


class LoraColumnParallelLinear(_ParallelLoraLayer):
    """LoRA on a ``ColumnParallelLinear``: A replicated, B sharded on its output rows.

    Args:
        base_layer: The megatron-core column-parallel layer.
        global_name: Its global module name.
        out_chunks: Blocks of the output dimension that are sharded separately
            (2 for a gated ``linear_fc1``, whose rank ``k`` holds ``[gate_k; up_k]``).
    """

    def __init__(self, base_layer: nn.Module, *, global_name: str = "", out_chunks: int = 1):
        super().__init__(base_layer, global_name=global_name, out_chunks=out_chunks)
        self.b_spec = ShardSpec(dim=0, chunks=out_chunks)

    def _forward_active(self, x: torch.Tensor, weight=None, runtime_gather_output=None):
        base = self.get_base_layer()
        weight = base.weight if weight is None else weight
        m = _mappings()
        group = self.tp_group
        if self._sequence_parallel:
            x_in = m.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
        elif self.tp_size > 1 and not (
            getattr(base, "explicit_expert_comm", False) or getattr(base, "disable_grad_reduce", False)
        ):
            x_in = m.copy_to_tensor_model_parallel_region(x, group=group)
        else:
            x_in = x
        # In 2-D, the bias joins the base GEMM and LoRA adds into its output in
        # place: no pass over the output outside a GEMM (DoRA takes the bias back out).
        x2 = x_in.reshape(-1, x_in.shape[-1])
        bias = base.bias if base.bias is not None and not base.skip_bias_add else None
        out = self._base_and_lora(x2, weight, bias)
        out = out.view(*x_in.shape[:-1], out.shape[-1])
        gather = base.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            out = m.gather_from_tensor_model_parallel_region(out, group=group)
        return out, (base.bias if base.skip_bias_add else None)


class LoraRowParallelLinear(_ParallelLoraLayer):
    """LoRA on a ``RowParallelLinear``: A sharded on its input columns, B replicated."""

    a_spec = ShardSpec(dim=1)
    b_output_is_partial = True

    def _dropout_context(self, adapter: str):
        # The input is sharded, so each rank needs its own mask: draw it from
        # megatron-core's model-parallel RNG, as Megatron does for sharded dropout.
        dropout = self.lora_dropout[adapter]
        if self.tp_size == 1 or isinstance(dropout, nn.Identity) or not self.training:
            return contextlib.nullcontext()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        return get_cuda_rng_tracker().fork()

    def _reduce_row_norm_sq(self, norm_sq: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(norm_sq, self.tp_group)

    def _forward_active(self, x: torch.Tensor):
        base = self.get_base_layer()
        m = _mappings()
        group = self.tp_group
        if base.input_is_parallel:
            x_par = x
        else:
            x_par = m.scatter_to_tensor_model_parallel_region(x, group=group)
        x2 = x_par.reshape(-1, x_par.shape[-1])
        partial = self._base_and_lora(x2, base.weight, None)
        partial = partial.view(*x_par.shape[:-1], partial.shape[-1])
        if getattr(base, "explicit_expert_comm", False):
            out = partial
        elif self._sequence_parallel:
            out = m.reduce_scatter_to_sequence_parallel_region(partial, group=group)
        else:
            out = m.reduce_from_tensor_model_parallel_region(partial, group=group)
        out = self._add_lora_biases(out)
        if base.skip_bias_add:
            return out, base.bias
        return (out + base.bias if base.bias is not None else out), None

    def _add_lora_biases(self, out: torch.Tensor) -> torch.Tensor:
        """B's bias is replicated: add it once, after the reduction."""
        for adapter in self.active_adapters:
            if adapter in self.lora_B and self.lora_bias.get(adapter):
                bias = self.lora_B[adapter].bias
                if self._sequence_parallel and self.tp_size > 1:
                    # Each rank adds it to its own sequence shard: a partial grad.
                    bias = scale_grad(bias, float(self.tp_size))
                out = out + bias.to(out.dtype) * self.scaling[adapter]
        return out
