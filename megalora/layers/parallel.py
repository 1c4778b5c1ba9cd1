"""LoRA on megatron-core's tensor-parallel linear layers.

The sharding rule (see :mod:`megalora.distributed`):

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

from .. import distributed as D
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


class _ParallelLoraLayer(LoraLayer):
    """What column and row variants share."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer, tp_group=_tp_group(base_layer))

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

    def _factor_weight(self, factor: nn.Module, spec: D.ShardSpec) -> torch.Tensor:
        if spec.sharded or self.tp_size == 1:
            return factor.weight
        return D.scale_grad(factor.weight, float(self.tp_size))

    def _tag_parameters(self, adapter_name: str) -> None:
        specs = {
            "lora_A": (self.a_spec, self.a_spec),
            "lora_B": (self.b_spec, self.b_spec if self.b_spec.dim == 0 else D.FULL),
            "lora_magnitude_vector": (self.magnitude_spec, self.magnitude_spec),
        }
        for layer_name, (weight_spec, bias_spec) in specs.items():
            module = getattr(self, layer_name)
            if adapter_name not in module:
                continue
            for pname, param in module[adapter_name].named_parameters():
                spec = weight_spec if pname == "weight" else bias_spec
                if spec.sharded:
                    D.mark_tp_sharded(param, spec.dim, 1)
                else:
                    D.mark_tp_replicated(param)


class LoraColumnParallelLinear(_ParallelLoraLayer):
    """LoRA on a ``ColumnParallelLinear``: A replicated, B sharded on its output rows.

    Args:
        base_layer: The megatron-core column-parallel layer.
        out_chunks: Blocks of the output dimension that are sharded separately
            (2 for a gated ``linear_fc1``, whose rank ``k`` holds ``[gate_k; up_k]``).
    """

    def __init__(self, base_layer: nn.Module, out_chunks: int = 1):
        super().__init__(base_layer)
        self.b_spec = D.ShardSpec(dim=0, chunks=out_chunks)
        self.magnitude_spec = D.ShardSpec(dim=0, chunks=out_chunks)

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
        out = F.linear(x_in, weight)
        out = self._apply_adapters(x_in, out, None)
        if base.bias is not None and not base.skip_bias_add:
            out = out + base.bias
        gather = base.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            out = m.gather_from_tensor_model_parallel_region(out, group=group)
        return out, (base.bias if base.skip_bias_add else None)


class LoraRowParallelLinear(_ParallelLoraLayer):
    """LoRA on a ``RowParallelLinear``: A sharded on its input columns, B replicated."""

    a_spec = D.ShardSpec(dim=1)
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
        return D.all_reduce_sum(norm_sq, self.tp_group)

    def _forward_active(self, x: torch.Tensor):
        base = self.get_base_layer()
        m = _mappings()
        group = self.tp_group
        if base.input_is_parallel:
            x_par = x
        else:
            x_par = m.scatter_to_tensor_model_parallel_region(x, group=group)
        partial = F.linear(x_par, base.weight)
        partial = self._apply_adapters(x_par, partial, None)
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
                    bias = D.scale_grad(bias, float(self.tp_size))
                out = out + bias.to(out.dtype) * self.scaling[adapter]
        return out
