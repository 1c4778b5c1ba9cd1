"""The one LoRA layer class every variant derives from.

A :class:`LoraLayer` wraps a base layer and keeps, per adapter, the factors
``lora_A[name]`` (``[r, in]``) and ``lora_B[name]`` (``[out, r]``, with an
optional ``lora_bias``), a dropout, a scaling and, for DoRA, a magnitude
vector. Attribute names and state-dict keys are PEFT's, so code written
against ``peft.tuners.lora.LoraLayer`` reads the same.

A layer type (plain, column-parallel, row-parallel, TE) mostly declares:

* the shard spec of A and B (see :mod:`megalora.sharding`); every other
  spec follows from them in :meth:`LoraLayer.tensors`, the one table of an
  adapter's tensors that tagging, checkpoints and the export read,
* the base weight in ``[out, in]`` layout, and how to add a tensor to it,
* its forward, and where a weight norm needs a reduction.

What an adapter adds beyond ``B @ A`` (DoRA) is its variant object
(:mod:`megalora.layers.variants`). Everything else (init, merge, unmerge,
adapter bookkeeping) lives here, once.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..collectives import group_rank, group_size
from ..sharding import FULL, ShardSpec
from .. import lora_math
from .face import BaseLayerFace, unwrapped_keys_to
from .init import LoraFactor, LoraMagnitude, draw_full_factors, init_generator  # noqa: F401 (re-exported)
from .tensors import AdapterTensor
from .variants import LoraVariant, resolve_variant
from .weights import LoraWeights


class LoraLayer(LoraWeights, BaseLayerFace):
    """Base class of every megalora LoRA layer.

    Subclasses set ``a_spec``, ``b_spec`` and ``tp_group``, and implement
    :meth:`_full_features`, :meth:`base_weight_oi`, :meth:`_set_base_weight_oi`
    and :meth:`_forward_active`.

    Args:
        base_layer: The layer to adapt.
        tp_group: Its tensor-parallel group (``None``: not sharded).
        global_name: Its layout-independent module name: the salt of the init
            and the name in the tensor table.
        out_chunks: 2 for a gated ``linear_fc1`` (see
            :func:`~megalora.layers.tensors.gated_chunks`), else 1; decided once,
            when the layer is created.
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    a_spec: ShardSpec = FULL
    b_spec: ShardSpec = FULL
    # Whether forward may read the base weight outside the base layer's own
    # forward (DoRA's weight norm needs it; fused TE GEMMs keep it inside).
    reads_base_weight = True
    # Whether B's output is a partial sum that the base layer reduces later;
    # lora_bias must then be added after that reduction, not before.
    b_output_is_partial = False
    # Whether forward runs each adapter through its variant object
    # (``_apply_adapters``); TE layers with their own LoRA path do not, so a
    # variant that changes the forward (QALoRA) refuses them.
    runs_variants = True

    def __init__(self, base_layer: nn.Module, tp_group=None, *, global_name: str = "", out_chunks: int = 1):
        super().__init__()
        self.base_layer = base_layer
        self.tp_group = tp_group
        self.global_name = global_name
        self.out_chunks = out_chunks
        self.lora_variant: dict[str, LoraVariant] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        # What a variant's unmerge needs of a merged adapter (DoRA's weight norm).
        self._merged_norms: dict[str, torch.Tensor] = {}
        self.register_load_state_dict_pre_hook(unwrapped_keys_to("base_layer"))

    # ------------------------------------------------------------------ variant hooks

    def _full_features(self) -> tuple[int, int]:
        """``(in_features, out_features)`` of the full, unsharded base layer."""
        raise NotImplementedError

    def base_weight_oi(self) -> torch.Tensor:
        """The local base weight as ``[out_local, in_local]`` (a view where possible)."""
        raise NotImplementedError

    def _set_base_weight_oi(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def _forward_active(self, x: torch.Tensor, *args, **kwargs):
        """Forward with at least one active, unmerged adapter."""
        raise NotImplementedError

    def _dropout_context(self, adapter: str):
        """The RNG context dropout on this layer's LoRA input runs in."""
        return contextlib.nullcontext()

    def _factor_weight(self, factor: nn.Module, spec: ShardSpec) -> torch.Tensor:
        """The weight a forward uses; parallel variants pre-scale replicated grads."""
        return factor.weight

    def _reduce_row_norm_sq(self, norm_sq: torch.Tensor) -> torch.Tensor:
        """Sum a per-output-row squared norm over the sharded input dimension."""
        return norm_sq

    # ------------------------------------------------------------------ shapes

    @property
    def in_features(self) -> int:
        return self._full_features()[0]

    @property
    def out_features(self) -> int:
        return self._full_features()[1]

    @property
    def local_in_features(self) -> int:
        """The input features this rank sees (the full input unless A is split along it)."""
        return self.in_features // self.tp_size if self.a_spec.dim == 1 else self.in_features

    @property
    def tp_rank(self) -> int:
        return group_rank(self.tp_group)

    @property
    def tp_size(self) -> int:
        return group_size(self.tp_group)

    def local(self, full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
        return spec.local(full, self.tp_rank, self.tp_size)

    # ------------------------------------------------------------------ adapters

    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, LoraLayer):
            base = base.base_layer
        return base

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> list[str]:
        return self.active_adapters

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def update_layer(
        self, adapter_name: str, config, *, r: Optional[int] = None, lora_alpha: Optional[float] = None,
        seed: int = 0,
    ) -> None:
        """Add (or replace) an adapter on this layer.

        Args:
            adapter_name: The adapter's name.
            config: Its :class:`~megalora.config.LoraConfig` (dropout, init,
                rsLoRA, DoRA, ``lora_bias``, ``inference_mode``).
            r: This layer's rank (``rank_pattern``); ``config.r`` when ``None``.
            lora_alpha: This layer's alpha (``alpha_pattern``); ``config.lora_alpha`` when ``None``.
            seed: The base seed of the init (see :func:`~megalora.layers.init.init_generator`).
        """
        r = config.r if r is None else r
        lora_alpha = config.lora_alpha if lora_alpha is None else lora_alpha
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r} for adapter {adapter_name!r}")
        variant = resolve_variant(config)
        self.check_config(config, adapter_name)
        if config.lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(
                f"lora_bias=True on {self.global_name or type(self.get_base_layer()).__name__}, which has no bias: "
                "this adapter cannot be merged."
            )
        in_full, out_full = self._full_features()
        gen = init_generator(seed, self.global_name, adapter_name)
        a, b, bias = self._draw_factors(config, r, variant.a_features(in_full), out_full, gen)
        # dtype/device from any base parameter: an output layer tied to the
        # embeddings has no weight of its own.
        ref = next(self.get_base_layer().parameters(), None)
        floating = ref is not None and ref.is_floating_point()
        like = dict(dtype=ref.dtype if floating else torch.float32, device=ref.device if ref is not None else "cpu")
        self.lora_A[adapter_name] = LoraFactor(a)
        self.lora_B[adapter_name] = LoraFactor(b, bias)
        # Drawn in full, then each keeps this rank's slice by its spec in the table.
        for entry in self._factor_tensors(adapter_name):
            entry.param.data = self.local(entry.param.data, entry.spec).to(**like)
        self.lora_dropout[adapter_name] = (
            nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_math.scaling(lora_alpha, r, config.use_rslora)
        self.lora_bias[adapter_name] = bool(config.lora_bias)
        self.use_dora[adapter_name] = bool(config.use_dora)  # PEFT's attribute; the code reads the variant
        self.lora_variant[adapter_name] = variant
        if config.init_lora_weights == "corda":  # before the variant: DoRA's norm reads the rewritten base
            from ..initializers.corda import corda_init

            corda_init(self, adapter_name)
        variant.init(self, adapter_name, like)
        self._tag_parameters(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=config.inference_mode)

    def check_config(self, config, adapter_name: str) -> None:
        """Raise if this layer cannot carry ``config`` (its variant's refusals); changes nothing.

        :class:`~megalora.model.LoraModel` calls it on every rank before its one
        gather, so a refusal on one pipeline stage fails every rank together.
        """
        resolve_variant(config).check(self, adapter_name)

    def _draw_factors(self, config, r: int, a_in: int, out_full: int, gen: torch.Generator):
        """Full fp32 ``(A [r, a_in], B [out, r], B's bias or None)``; embeddings draw PEFT's own way."""
        return draw_full_factors(config.init_lora_weights, r, a_in, out_full, config.lora_bias, gen)

    # ------------------------------------------------------------------ the tensor table

    @property
    def out_spec(self) -> ShardSpec:
        """The spec of a per-output-row vector (B's bias, DoRA's magnitude and norm).

        Split like B's rows when B is split on its output dimension, else whole.
        """
        return self.b_spec if self.b_spec.dim == 0 else FULL

    def _tensor(self, role: str, param, spec: ShardSpec, local_key: str, saved_key: str) -> AdapterTensor:
        return AdapterTensor(role, param, spec, self.tp_group, self.global_name, local_key, saved_key)

    def _factor_tensors(self, adapter: str) -> list[AdapterTensor]:
        a, b = self.lora_A[adapter], self.lora_B[adapter]
        out = [
            self._tensor("A", a.weight, self.a_spec, f"lora_A.{adapter}.weight", "lora_A.weight"),
            self._tensor("B", b.weight, self.b_spec, f"lora_B.{adapter}.weight", "lora_B.weight"),
        ]
        if b.bias is not None:
            out.append(self._tensor("B_bias", b.bias, self.out_spec, f"lora_B.{adapter}.bias", "lora_B.bias"))
        return out

    def tensors(self, adapter: str) -> list[AdapterTensor]:
        """Every tensor ``adapter`` owns on this layer, with its role, spec, group and keys.

        A, B, B's bias (when ``lora_bias``) and the variant's own (DoRA's
        magnitude), in that order: the one table that gradient tagging,
        ``sharded_state_dict``, adapter files and the merged export read.
        """
        return self._factor_tensors(adapter) + self.lora_variant[adapter].tensors(self, adapter)

    def _tag_parameters(self, adapter_name: str) -> None:
        """Set megatron-core's TP attributes on the new parameters (parallel variants)."""

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names``; they become trainable unless ``inference_mode``."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for layer_name in self.adapter_layer_names:
            for key, module in getattr(self, layer_name).items():
                module.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        """Toggle the adapters; disabling unmerges first, as PEFT does."""
        if not enabled and self.merged:
            self.unmerge()
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining one becomes active."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
        for container in [getattr(self, n) for n in self.adapter_layer_names] + [self.lora_dropout]:
            if adapter_name in container:  # ModuleDict.pop takes no default
                del container[adapter_name]
        for attr in ("r", "lora_alpha", "scaling", "use_dora", "lora_bias", "lora_variant"):
            getattr(self, attr).pop(adapter_name, None)
        self.__dict__.get("initial_factors", {}).pop(adapter_name, None)  # set by base-weight inits
        if adapter_name in self._active_adapter:
            remaining = [a for a in self._active_adapter if a != adapter_name]
            if not remaining and self.lora_A:
                remaining = [next(iter(self.lora_A))]
            self.set_adapter(remaining)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not any(a in self.lora_A for a in self.active_adapters):
            return self.base_layer(x, *args, **kwargs)
        return self._forward_active(x, *args, **kwargs)

    def _lora_out(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``B(A(x))`` for already dropped-out ``x``; B's bias unless added later."""
        a = self._factor_weight(self.lora_A[adapter], self.a_spec)
        b_mod = self.lora_B[adapter]
        b = self._factor_weight(b_mod, self.b_spec)
        bias = None if self.b_output_is_partial else b_mod.bias
        return F.linear(F.linear(x, a), b, bias)

    def _add_lora_out(
        self, result: torch.Tensor, adapter: str, x: torch.Tensor, scaling: float, inplace: bool = False
    ) -> torch.Tensor:
        """``result + scaling · B(A(x))`` for already dropped-out ``x``.

        The operations and their order are PEFT's (``B(A(x))``, then the scale,
        then the add), so outputs match PEFT's bit for bit on the same weights;
        the scale and the add run in place on the fresh ``B(A(x))`` (and on
        ``result`` when the caller owns it) to spare output-sized allocations.
        """
        lora = self._lora_out(adapter, x)
        if lora.dtype != result.dtype:  # e.g. fp32 LoRA on a bf16 base: keep PEFT's type promotion
            return result + lora * scaling
        lora = lora.mul_(scaling)
        return result.add_(lora) if inplace else result + lora

    def _apply_adapters(
        self, x: torch.Tensor, result: torch.Tensor, base_bias: Optional[torch.Tensor], inplace: bool = False
    ) -> torch.Tensor:
        """Add every active adapter's output to ``result``, PEFT's way.

        ``base_bias`` is the bias already inside ``result``; DoRA rescales the
        bias-free base output. As in PEFT, a later DoRA adapter sees the
        outputs of the adapters before it as part of the "base" result.
        ``inplace`` lets LoRA add into ``result`` itself: only for a caller
        whose ``result`` is a fresh 2-D tensor that no autograd node saved
        (the parallel layers' own base matmul).
        """
        out_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            xa = x.to(self.lora_A[adapter].weight.dtype)
            result = self.lora_variant[adapter].forward(self, adapter, xa, result, base_bias, inplace)
        return result.to(out_dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self.active_adapters}, merged={self.merged_adapters}"
