"""LoRA on tensor-parallel layers whose forward megalora does not re-run itself.

Transformer Engine's ``TEColumnParallelLinear`` / ``TERowParallelLinear`` /
``TELayerNormColumnParallelLinear`` fuse their communication into the GEMM
(and may run in fp8), so the LoRA path cannot join the base layer's collective
the way :mod:`megalora.layers.parallel` does. Here the base layer runs its own
forward untouched and the LoRA path does its own communication, always on the
small ``[tokens, r]`` tensor, never on a hidden-size one:

* column: ``u = A x`` (A replicated); backward all-reduces ``du`` (or, under
  sequence parallelism, all-gathers ``u`` over the sequence);
* row: ``u = A_k x_k`` is a partial sum, all-reduced (or reduce-scattered over
  the sequence under SP) before the replicated B.

A replicated factor's gradient is then complete on every rank, except under
SP, where each rank sees its own sequence shard; there it is pre-scaled by the
TP size and averaged once per step, as for the other parallel layers.

The same classes serve any column/row-parallel layer type that megatron-core
adds later. Transformer Engine cannot be installed on the CPU machines this
library is tested on: the TE class mapping in :func:`te_layer_classes` is the
only part not run there; the variants themselves are tested on megatron-core's
own layers.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..grad_sync import scale_grad
from ..sharding import ShardSpec
from .parallel import _mappings, _ParallelLoraLayer


@functools.lru_cache(maxsize=1)
def te_layer_classes() -> tuple[tuple, tuple, tuple]:
    """``(column, row, layernorm_column)`` TE classes, empty when TE is not installed."""
    try:
        from megatron.core.extensions import transformer_engine as te_ext
    except Exception:  # ImportError, or TE present but broken for this torch/CUDA
        return (), (), ()
    if not getattr(te_ext, "HAVE_TE", False):
        # Without TE, megatron-core defines these names as placeholders.
        return (), (), ()
    return (te_ext.TEColumnParallelLinear,), (te_ext.TERowParallelLinear,), (te_ext.TELayerNormColumnParallelLinear,)


class _CallingBaseMixin:
    """What both directions share: plain LoRA only, and SP-dependent grad pre-scaling.

    The base weight stays inside the base layer's fused forward, so a variant
    that reads it (DoRA) refuses these layers (:meth:`Dora.check
    <megalora.layers.variants.Dora.check>`).
    """

    reads_base_weight = False
    runs_variants = False

    def _factor_weight(self, factor: nn.Module, spec: ShardSpec) -> torch.Tensor:
        if spec.sharded or self.tp_size == 1 or not self._sequence_parallel:
            return factor.weight
        return scale_grad(factor.weight, float(self.tp_size))

    def _dropout(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, nn.Identity) or not self.training:
            return dropout(x)
        ctx = contextlib.nullcontext()
        if self.tp_size > 1 and self._input_differs_across_ranks:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            ctx = get_cuda_rng_tracker().fork()
        with ctx:
            return dropout(x)


class LoraColumnCallingBase(_CallingBaseMixin, _ParallelLoraLayer):
    """LoRA on a column-parallel layer that keeps its own forward (A replicated, B row-sharded)."""

    def __init__(self, base_layer: nn.Module, *, global_name: str = "", out_chunks: int = 1, input_norm=None):
        super().__init__(base_layer, global_name=global_name, out_chunks=out_chunks)
        self.b_spec = ShardSpec(dim=0, chunks=out_chunks)
        # For a layer with a fused input norm: LoRA reads the normalised input.
        self._input_norm = input_norm

    @property
    def _input_differs_across_ranks(self) -> bool:
        return self._sequence_parallel

    def _forward_active(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base_layer(x, *args, **kwargs)
        h = self._input_norm(x) if self._input_norm is not None else x
        m, group = _mappings(), self.tp_group
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            hd = self._dropout(adapter, h.to(self.lora_A[adapter].weight.dtype))
            u = F.linear(hd, self._factor_weight(self.lora_A[adapter], self.a_spec))
            if self._sequence_parallel:
                u = m.gather_from_sequence_parallel_region(u, tensor_parallel_output_grad=True, group=group)
            elif self.tp_size > 1:
                u = m.copy_to_tensor_model_parallel_region(u, group=group)
            b = self.lora_B[adapter]
            out = out + (F.linear(u, b.weight, b.bias) * self.scaling[adapter]).to(out.dtype)
        return out, bias


class LoraRowCallingBase(_CallingBaseMixin, _ParallelLoraLayer):
    """LoRA on a row-parallel layer that keeps its own forward (A column-sharded, B replicated)."""

    a_spec = ShardSpec(dim=1)

    @property
    def _input_differs_across_ranks(self) -> bool:
        return True

    def _forward_active(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base_layer(x, *args, **kwargs)
        if not getattr(self.get_base_layer(), "input_is_parallel", True):
            raise NotImplementedError("LoRA on a row-parallel layer with input_is_parallel=False and its own forward")
        m, group = _mappings(), self.tp_group
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            xd = self._dropout(adapter, x.to(self.lora_A[adapter].weight.dtype))
            u = F.linear(xd, self.lora_A[adapter].weight)
            if self._sequence_parallel:
                u = m.reduce_scatter_to_sequence_parallel_region(u, group=group)
            elif self.tp_size > 1:
                u = m.reduce_from_tensor_model_parallel_region(u, group=group)
            b = self.lora_B[adapter]
            # Not ``bias``: that name holds the base layer's returned bias (skip_bias_add).
            lora_bias = b.bias
            if lora_bias is not None and self._sequence_parallel and self.tp_size > 1:
                lora_bias = scale_grad(lora_bias, float(self.tp_size))  # each rank adds it to its own shard
            y = F.linear(u, self._factor_weight(b, self.b_spec), lora_bias)
            out = out + (y * self.scaling[adapter]).to(out.dtype)
        return out, bias


def layernorm_of(base: nn.Module):
    """The input norm fused into a ``TELayerNormColumnParallelLinear``, as a function."""
    eps = getattr(base, "eps", 1e-5)
    zero_centered = getattr(base, "zero_centered_gamma", False)

    def norm(x: torch.Tensor) -> torch.Tensor:
        weight = base.layer_norm_weight + 1 if zero_centered else base.layer_norm_weight
        if getattr(base, "normalization", "LayerNorm") == "RMSNorm":
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return F.layer_norm(x, (x.shape[-1],), weight, getattr(base, "layer_norm_bias", None), eps)

    return norm
