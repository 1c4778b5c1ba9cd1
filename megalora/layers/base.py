"""The one LoRA layer class every variant derives from.

A :class:`LoraLayer` wraps a base layer and keeps, per adapter, the factors
``lora_A[name]`` (``[r, in]``) and ``lora_B[name]`` (``[out, r]``, with an
optional ``lora_bias``), a dropout, a scaling and, for DoRA, a magnitude
vector. Attribute names and state-dict keys are PEFT's, so code written
against ``peft.tuners.lora.LoraLayer`` reads the same.

A variant (plain, column-parallel, row-parallel, TE) mostly declares:

* the shard spec of each factor (see :mod:`megalora.sharding`),
* the base weight in ``[out, in]`` layout, and how to add a tensor to it,
* its forward, and where a DoRA weight norm needs a reduction.

Everything else (init, merge, unmerge, DoRA, adapter bookkeeping) lives here,
once.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import zlib
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..collectives import group_rank, group_size
from ..sharding import FULL, ShardSpec


class LoraFactor(nn.Linear):
    """An ``nn.Linear`` built from given tensors, drawing nothing from the global RNG.

    ``nn.Linear.__init__`` would initialise with the global generator, whose state
    would then depend on the (local, layout-dependent) factor shapes.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias)


class LoraMagnitude(nn.Module):
    """DoRA's per-output-row magnitude, stored as ``weight`` like PEFT's."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def init_generator(seed: int, global_name: str, adapter_name: str) -> torch.Generator:
    """A CPU generator that depends only on the seed and the names.

    Drawing each factor in full from it, then slicing, makes the init identical
    at every TP/PP layout and on every rank of a TP group.
    """
    salt = zlib.crc32(f"{global_name}|{adapter_name}".encode())
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) * 1_000_003 + salt) % (2**63 - 1))
    return gen


def draw_full_factors(
    init: Any, r: int, in_features: int, out_features: int, lora_bias: bool, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Full fp32 ``A [r, in]``, ``B [out, r]`` and B's bias for an init scheme.

    ``True`` is PEFT's default: A as ``nn.Linear``'s Kaiming-uniform (a=√5, so
    the bound is ``1/sqrt(in)`` on the *full* fan-in) and B zero. ``False``
    leaves both as ``nn.Linear`` would, ``"gaussian"`` draws A from
    ``N(0, 1/r)``, and ``"orthogonal"`` builds A and B from the odd and even rows
    of a random orthogonal matrix so that ``B @ A`` starts at zero.
    """
    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)

    bias = torch.zeros(out_features) if lora_bias else None
    if init is True:
        a, b = uniform((r, in_features), in_features), torch.zeros(out_features, r)
    elif init is False:
        a, b = uniform((r, in_features), in_features), uniform((out_features, r), r)
        if lora_bias:
            bias = uniform((out_features,), r)
    elif isinstance(init, str) and init.lower() == "gaussian":
        a = torch.empty(r, in_features).normal_(0.0, 1.0 / r, generator=gen)
        b = torch.zeros(out_features, r)
    elif init == "orthogonal":
        if r % 2:
            raise ValueError(f"init_lora_weights='orthogonal' needs an even r, got r={r}; use an even rank.")
        q, _ = torch.linalg.qr(torch.randn(r, r, generator=gen))
        a = (torch.randn(in_features, r // 2, generator=gen) @ q[0::2, :]).T / 10.0
        b = torch.randn(r // 2, out_features, generator=gen).T @ q[1::2, :] / 10.0
    else:
        raise NotImplementedError(
            f"init_lora_weights={init!r} is not implemented by megalora yet; "
            "use True, False, 'gaussian' or 'orthogonal'."
        )
    return a.contiguous(), b.contiguous(), bias


class LoraLayer(nn.Module):
    """Base class of every megalora LoRA layer.

    Subclasses set ``a_spec``, ``b_spec``, ``magnitude_spec`` and ``tp_group``,
    and implement :meth:`_full_features`, :meth:`base_weight_oi`,
    :meth:`_set_base_weight_oi` and :meth:`_forward_active`.
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    a_spec: ShardSpec = FULL
    b_spec: ShardSpec = FULL
    magnitude_spec: ShardSpec = FULL
    # Whether B's output is a partial sum that the base layer reduces later;
    # lora_bias must then be added after that reduction, not before.
    b_output_is_partial = False

    def __init__(self, base_layer: nn.Module, tp_group=None):
        super().__init__()
        self.base_layer = base_layer
        self.tp_group = tp_group
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
        # DoRA weight norms of merged adapters, needed again to unmerge.
        self._merged_norms: dict[str, torch.Tensor] = {}

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
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: Any = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        *,
        seed: int = 0,
        global_name: str = "",
        inference_mode: bool = False,
    ) -> None:
        """Add (or replace) an adapter on this layer."""
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r} for adapter {adapter_name!r}")
        if lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(
                f"lora_bias=True on {global_name or type(self.get_base_layer()).__name__}, which has no bias: "
                "this adapter cannot be merged."
            )
        in_full, out_full = self._full_features()
        gen = init_generator(seed, global_name, adapter_name)
        a, b, bias = draw_full_factors(init_lora_weights, r, in_full, out_full, lora_bias, gen)
        # dtype/device from any base parameter: an output layer tied to the
        # embeddings has no weight of its own.
        ref = next(self.get_base_layer().parameters(), None)
        floating = ref is not None and ref.is_floating_point()
        like = dict(dtype=ref.dtype if floating else torch.float32, device=ref.device if ref is not None else "cpu")
        bias_spec = self.b_spec if self.b_spec.dim == 0 else FULL
        self.lora_A[adapter_name] = LoraFactor(self.local(a, self.a_spec).to(**like))
        self.lora_B[adapter_name] = LoraFactor(
            self.local(b, self.b_spec).to(**like), None if bias is None else self.local(bias, bias_spec).to(**like)
        )
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_bias[adapter_name] = bool(lora_bias)
        self.use_dora[adapter_name] = bool(use_dora)
        if use_dora:
            with torch.no_grad():
                magnitude = self._row_norm(self._unmerged_weight_oi() + self._delta_oi(adapter_name))
            self.lora_magnitude_vector[adapter_name] = LoraMagnitude(magnitude.to(**like))
        self._tag_parameters(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

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
        for attr in ("r", "lora_alpha", "scaling", "use_dora", "lora_bias"):
            getattr(self, attr).pop(adapter_name, None)
        if adapter_name in self._active_adapter:
            remaining = [a for a in self._active_adapter if a != adapter_name]
            if not remaining and self.lora_A:
                remaining = [next(iter(self.lora_A))]
            self.set_adapter(remaining)

    # ------------------------------------------------------------------ weights

    def _delta_oi(self, adapter: str) -> torch.Tensor:
        """The local ΔW = scale · B @ A in ``[out_local, in_local]`` layout.

        The local product already is this rank's shard of the full ΔW, for
        column (B sharded) and row (A sharded) layers alike: no communication.
        """
        a = self.lora_A[adapter].weight
        b = self.lora_B[adapter].weight
        dtype = b.dtype
        if b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            # CPU half-precision matmuls are slow and lossy; merge in fp32.
            return ((b.float() @ a.float()) * self.scaling[adapter]).to(dtype)
        return (b @ a) * self.scaling[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW in the base weight's own layout (transposed for ``fan_in_fan_out``)."""
        return self._to_base_layout(self._delta_oi(adapter))

    def _to_base_layout(self, weight_oi: torch.Tensor) -> torch.Tensor:
        return weight_oi

    def _row_norm(self, weight_oi: torch.Tensor) -> torch.Tensor:
        """Per-output-row L2 norm of a ``[out_local, in_local]`` weight, over the full input."""
        norm_sq = weight_oi.float().pow(2).sum(dim=1)
        return self._reduce_row_norm_sq(norm_sq).sqrt().to(weight_oi.dtype)

    def _dora_factor(self, adapter: str, norm: torch.Tensor) -> torch.Tensor:
        return (self.lora_magnitude_vector[adapter].weight / norm).view(-1, 1)

    def _unmerged_weight_oi(self) -> torch.Tensor:
        """The base weight with every merged adapter taken out (a copy if any are merged).

        DoRA's norm is defined on the base weight as forward sees it, so a
        second DoRA adapter merged on top of a first needs the original weight.
        """
        weight = self.base_weight_oi()
        if not self.merged_adapters:
            return weight
        weight = weight.detach().clone()
        for adapter in reversed(self.merged_adapters):
            weight = self._unmerge_math(weight, adapter)
        return weight

    def _unmerge_math(self, weight_oi: torch.Tensor, adapter: str) -> torch.Tensor:
        delta = self._delta_oi(adapter).to(weight_oi.dtype)
        if self.use_dora.get(adapter):
            return weight_oi / self._dora_factor(adapter, self._merged_norms[adapter]) - delta
        return weight_oi - delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Add the adapters' ΔW to the local base weight shard.

        Args:
            safe_merge: Compute on a copy and refuse to write non-finite values.
            adapter_names: Adapters to merge; the active ones when ``None``.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if n in self.lora_A and n not in self.merged_adapters]
        base = self.get_base_layer()
        for adapter in names:
            with torch.no_grad():
                weight = self.base_weight_oi()
                delta = self._delta_oi(adapter).to(weight.dtype)
                norm = None
                if self.use_dora[adapter]:
                    norm = self._row_norm(self._unmerged_weight_oi() + delta).detach()
                    new_weight = self._dora_factor(adapter, norm).to(weight.dtype) * (weight + delta)
                else:
                    new_weight = weight + delta
                new_bias = None
                if self.lora_bias[adapter]:
                    if getattr(base, "bias", None) is None:
                        raise RuntimeError(
                            f"cannot merge adapter {adapter!r}: lora_bias=True but the base layer has no bias"
                        )
                    new_bias = base.bias + self.lora_B[adapter].bias * self.scaling[adapter]
                if safe_merge and not (
                    torch.isfinite(new_weight).all() and (new_bias is None or torch.isfinite(new_bias).all())
                ):
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
                    )
                self._set_base_weight_oi(new_weight)
                if new_bias is not None:
                    base.bias.data.copy_(new_bias)
            if norm is not None:
                self._merged_norms[adapter] = norm
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        with torch.no_grad():
            while self.merged_adapters:
                adapter = self.merged_adapters.pop()
                self._set_base_weight_oi(self._unmerge_math(self.base_weight_oi(), adapter))
                self._merged_norms.pop(adapter, None)
                if self.lora_bias[adapter]:
                    base.bias.data -= self.lora_B[adapter].bias * self.scaling[adapter]

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
        a = self._factor_weight(self.lora_A[adapter], self.a_spec)
        b_mod = self.lora_B[adapter]
        b = self._factor_weight(b_mod, self.b_spec)
        bias = None if self.b_output_is_partial else b_mod.bias
        lora = F.linear(F.linear(x, a), b, bias)
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
            dropout = self.lora_dropout[adapter]
            scaling = self.scaling[adapter]
            if not self.use_dora[adapter]:
                with self._dropout_context(adapter):
                    xd = dropout(xa)
                result = self._add_lora_out(result, adapter, xd, scaling, inplace)
                continue
            if isinstance(dropout, nn.Identity) or not self.training:
                base_result = result if base_bias is None else result - base_bias
                xd = xa
            else:
                with self._dropout_context(adapter):
                    xd = dropout(xa)
                base_result = F.linear(xd, self.base_weight_oi().to(xd.dtype))
            result = result + self._dora_out(adapter, xd, base_result, scaling)
        return result.to(out_dtype)

    def _dora_out(self, adapter: str, x: torch.Tensor, base_result: torch.Tensor, scaling: float):
        """DoRA's addition to the output: ``(m/‖W+sBA‖ − 1)·base + (m/‖W+sBA‖)·s·BAx``.

        The norm is detached (DoRA paper, section 4.3), as PEFT does.
        """
        with torch.no_grad():
            lora_w = self.lora_B[adapter].weight @ self.lora_A[adapter].weight
            norm = self._row_norm(self.base_weight_oi().to(x.dtype) + scaling * lora_w.to(x.dtype))
        magnitude = self._factor_weight(self.lora_magnitude_vector[adapter], self.magnitude_spec)
        mag_norm_scale = (magnitude / norm).view(1, -1) if x.dim() > 1 else magnitude / norm
        lora_result = self._lora_out(adapter, x)
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self.active_adapters}, merged={self.merged_adapters}"
