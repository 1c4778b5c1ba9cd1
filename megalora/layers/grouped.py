"""LoRA on grouped expert weights: megatron-core's ``GroupedMLP`` and ``TEGroupedMLP`` (``target_parameters``).

A grouped experts module keeps every local expert's weight in one tensor:

* ``GroupedMLP``: ``weight1`` is ``[hidden, E·ffn(×2 gated)/etp]``, used per
  expert as ``x @ W1[e]`` after ``.view(E, hidden, -1)``; ``weight2`` is
  ``[E·ffn/etp, hidden]``, used as ``h @ W2[e]`` after ``.view(E, -1, hidden)``;
* ``TEGroupedMLP``: ``linear_fc1.weight{e}`` / ``linear_fc2.weight{e}``, each ``[out, in]``.

The adapter is a per-expert LoRA, ``A [E, r, in]`` and ``B [E, out, r]``,
applied to each expert's split of the permuted tokens (``tokens_per_expert``)
by :func:`grouped_lora`, plain tensor math in that layout. Each expert's
factors live in one :class:`~megalora.layers.base.LoraLayer` per weight
(:class:`LoraExpertColumn`, :class:`LoraExpertRow`) at the module path
``local_experts.<i>.linear_fc1`` / ``linear_fc2`` under the wrapper, with
the global name ``...experts.local_experts.<ep_rank·E + i>.linear_fc1``:
the keys, init, shard specs (over the expert-TP group), merge and export are
exactly those of LoRA on a ``SequentialMLP`` expert, so an adapter file moves
between the two expert implementations. The base weight of each per-expert
layer is a view into the grouped tensor (:class:`ExpertWeight`).

``GroupedMLP`` needs ``grouped_gemm`` and TE a GPU: the classes are matched by
``isinstance`` only when megatron-core exposes them, and the wrapper's base
GEMMs use ``grouped_gemm`` only when it is importable and the tensors are on
CUDA (else one matmul per expert split, the same math).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import LoraColumnParallelLinear, LoraRowParallelLinear

FC1, FC2 = "linear_fc1", "linear_fc2"


# ---------------------------------------------------------------------- plain tensor math


def split_tokens(x: torch.Tensor, tokens_per_expert: Sequence[int]) -> tuple:
    """``x``'s rows per expert, in expert order (the permuted layout megatron's dispatchers produce)."""
    return torch.split(x, [int(n) for n in tokens_per_expert])


def grouped_matmul(x: torch.Tensor, tokens_per_expert: Sequence[int], weight_eio: torch.Tensor) -> torch.Tensor:
    """``x_e @ W[e]`` for each expert's rows ``x_e``, with ``weight_eio`` ``[E, in, out]`` (GroupedMLP's view)."""
    if x.is_cuda:
        try:
            import grouped_gemm as gg  # GroupedMLP's own kernel, where it exists

            return gg.ops.gmm(x, weight_eio, torch.as_tensor(list(tokens_per_expert)), trans_b=False)
        except ImportError:
            pass
    parts = [xe @ weight_eio[e] for e, xe in enumerate(split_tokens(x, tokens_per_expert))]
    return torch.cat(parts, dim=0) if parts else x.new_zeros(0, weight_eio.shape[-1])


def grouped_lora(x: torch.Tensor, tokens_per_expert: Sequence[int], a: torch.Tensor, b: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """``scaling · B[e] A[e] x_e`` per expert split: ``a`` is ``[E, r, in]``, ``b`` ``[E, out, r]``.

    PEFT's order per expert (``B(A(x))``, then the scale), so each expert's rows
    equal a ``SequentialMLP`` expert's LoRA output on the same factors.
    """
    parts = [F.linear(F.linear(xe, a[e]), b[e]) for e, xe in enumerate(split_tokens(x, tokens_per_expert))]
    out = torch.cat(parts, dim=0) if parts else x.new_zeros(0, b.shape[1])
    return out * scaling


def glu_or_act(config, h: torch.Tensor) -> torch.Tensor:
    """megatron-core's expert activation: ``act(gate) * up`` for a gated fc1, else ``act(h)``."""
    if config.gated_linear_unit:
        gate, up = torch.chunk(h, 2, dim=-1)
        return config.activation_func(gate) * up
    return config.activation_func(h)


# ---------------------------------------------------------------------- the grouped layouts


def grouped_classes() -> tuple:
    """megatron-core's grouped experts classes that exist in this install (importable without a GPU)."""
    try:
        from megatron.core.transformer.moe.experts import GroupedMLP, TEGroupedMLP
    except ImportError:
        return ()
    return (GroupedMLP, TEGroupedMLP)


def is_grouped_experts(module: nn.Module) -> bool:
    classes = grouped_classes()
    return bool(classes) and isinstance(module, classes)


def _is_te_grouped(module: nn.Module) -> bool:
    return hasattr(module, FC1) and not hasattr(module, "weight1")


def expert_weight_oi(module: nn.Module, which: str, i: int) -> torch.Tensor:
    """Local expert ``i``'s weight ``which`` (fc1/fc2) of a grouped module as an ``[out, in]`` view."""
    if _is_te_grouped(module):
        return getattr(getattr(module, which), f"weight{i}")
    e, hidden = module.num_local_experts, module.config.hidden_size
    if which == FC1:
        return module.weight1.view(e, hidden, -1)[i].t()
    return module.weight2.view(e, -1, hidden)[i].t()


def _grouped_param(module: nn.Module, which: str, i: int) -> torch.Tensor:
    if _is_te_grouped(module):
        return getattr(getattr(module, which), f"weight{i}")
    return module.weight1 if which == FC1 else module.weight2


class ExpertWeight(nn.Module):
    """The base layer of one expert's LoRA: a view of its slice of a grouped weight.

    It owns no parameter (the grouped module does) and shows the attributes of a
    megatron-core expert linear layer that the parallel LoRA layers read:
    ``explicit_expert_comm`` (the experts' communication is the dispatcher's),
    the expert-TP group, full sizes and the base weight as ``[out_local, in_local]``.
    """

    explicit_expert_comm = True
    is_expert = True
    sequence_parallel = False
    skip_bias_add = False
    gather_output = False
    input_is_parallel = True
    bias = None

    def __init__(self, owner: nn.Module, which: str, index: int, input_size: int, output_size: int, tp_group):
        super().__init__()
        self._owner = (owner,)  # a tuple: not a registered submodule (the wrapper owns it once)
        self.which, self.index = which, index
        self.input_size, self.output_size = input_size, output_size
        self.tp_group = tp_group
        self.config = owner.config

    @property
    def weight(self) -> torch.Tensor:
        view = expert_weight_oi(self._owner[0], self.which, self.index)
        # The LoRA factors copy the grouped weight's DDP flag from here (megalora.experts).
        flag = getattr(_grouped_param(self._owner[0], self.which, self.index), "allreduce", None)
        if flag is not None:
            view.allreduce = flag
        return view

    @property
    def allreduce(self) -> bool:
        return bool(getattr(_grouped_param(self._owner[0], self.which, self.index), "allreduce", True))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        return {}  # the grouped module writes its own weights

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The expert's weight view as ``weight``, tagged as a megatron expert linear layer's would be.

        Only direct calls see it (the merged export reads a LoRA layer's base
        ``named_parameters(recurse=False)``, init reads its dtype); a model's
        own ``named_parameters`` reads ``_parameters`` and lists the grouped
        tensor once, under the grouped module.
        """
        weight = self.weight
        sharded = self.tp_group is not None and self.tp_group.size() > 1
        weight.tensor_model_parallel = sharded
        weight.partition_dim = (0 if self.which == FC1 else 1) if sharded else -1
        weight.partition_stride = 1
        yield f"{prefix}weight", weight


class _ExpertLayer:
    """What both per-expert layers add: PEFT's refusals for parameter targets, and the grouped weight's dtype."""

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        for field in ("use_dora", "lora_bias"):
            if getattr(config, field):
                raise ValueError(f"{field}=True is not supported on grouped expert weights ({self.global_name}), "
                                 f"as in PEFT's target_parameters; set {field}=False")
        super().update_layer(adapter_name, config, **kwargs)
        weight = self.get_base_layer().weight
        for factors in (self.lora_A, self.lora_B):
            factors[adapter_name].to(dtype=weight.dtype, device=weight.device)


    def parameter_names(self) -> list[str]:
        """The names ``target_parameters`` may use for this expert's weight (see :func:`grouped_parameter_names`)."""
        base = self.get_base_layer()
        experts = self.global_name.rsplit(".local_experts.", 1)[0]
        names = grouped_parameter_names(base._owner[0], experts, base.which)
        own = f"{self.global_name}.weight"
        return names if own in names else names + [own]


class LoraExpertColumn(_ExpertLayer, LoraColumnParallelLinear):
    """One expert's LoRA on a grouped fc1: A replicated, B split over expert-TP (``[gate_k; up_k]`` when gated)."""


class LoraExpertRow(_ExpertLayer, LoraRowParallelLinear):
    """One expert's LoRA on a grouped fc2: A split over expert-TP, B replicated (output a partial sum)."""


def _ep_rank(module: nn.Module) -> int:
    group = getattr(module, "ep_group", None)
    return group.rank() if group is not None else 0


class LoraGroupedMLP(nn.Module):
    """A grouped experts module with per-expert LoRA on its fc1 and/or fc2 weights.

    Args:
        base_layer: The ``GroupedMLP`` / ``TEGroupedMLP``.
        global_name: Its global module name (``decoder.layers.<l>.mlp.experts``).
    """

    def __init__(self, base_layer: nn.Module, global_name: str):
        super().__init__()
        config = base_layer.config
        unsupported = [name for name in ("glu_linear_offset", "activation_func_clamp_value", "fp8", "fp4",
                                         "add_bias_linear", "moe_latent_size", "use_te_activation_func")
                       if getattr(config, name, None)]
        if unsupported:
            raise NotImplementedError(f"target_parameters on grouped experts ({global_name}) does not support "
                                      f"{unsupported}; turn them off or use SequentialMLP (moe_grouped_gemm=False)")
        self.base_layer = base_layer
        self.global_name = global_name
        group = base_layer.tp_group
        etp = group.size() if group is not None else 1
        e = base_layer.num_local_experts
        ffn = config.moe_ffn_hidden_size
        fc1_out = ffn * (2 if config.gated_linear_unit else 1)
        first = _ep_rank(base_layer) * e
        chunks = 2 if config.gated_linear_unit else 1
        experts = []
        for i in range(e):
            name = f"{global_name}.local_experts.{first + i}"
            fc1 = LoraExpertColumn(ExpertWeight(base_layer, FC1, i, config.hidden_size, fc1_out, group),
                                   global_name=f"{name}.{FC1}", out_chunks=chunks)
            fc2 = LoraExpertRow(ExpertWeight(base_layer, FC2, i, ffn, config.hidden_size, group),
                                global_name=f"{name}.{FC2}")
            experts.append(nn.ModuleDict({FC1: fc1, FC2: fc2}))
        self.local_experts = nn.ModuleList(experts)
        self.num_local_experts = e
        self.etp = etp

    # The merged export walks the per-expert layers (SequentialMLP's names), not the grouped tensors.
    export_skips = ("base_layer",)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def lora_layers(self, which: str) -> list:
        return [expert[which] for expert in self.local_experts]

    # ------------------------------------------------------------------ forward

    def _base(self, which: str, x: torch.Tensor, tokens_per_expert: list) -> torch.Tensor:
        base = self.base_layer
        if _is_te_grouped(base):
            return getattr(base, which)(x, tokens_per_expert)[0]  # no bias (refused in __init__)
        e, hidden = self.num_local_experts, base.config.hidden_size
        w = base.weight1.view(e, hidden, -1) if which == FC1 else base.weight2.view(e, -1, hidden)
        return grouped_matmul(x, tokens_per_expert, w)

    def _add_lora(self, which: str, x: torch.Tensor, out: torch.Tensor, tokens_per_expert: list) -> torch.Tensor:
        layers = self.lora_layers(which)
        first = layers[0]
        if first.disable_adapters:
            return out
        for adapter in first.active_adapters:
            live = [layer for layer in layers if adapter in layer.lora_A and adapter not in layer.merged_adapters]
            if len(live) != len(layers):
                continue
            # A [E, r, in], B [E, out, r]; replicated factors pre-scale their grads as on a SequentialMLP expert.
            a = torch.stack([layer._factor_weight(layer.lora_A[adapter], layer.a_spec) for layer in layers])
            b = torch.stack([layer._factor_weight(layer.lora_B[adapter], layer.b_spec) for layer in layers])
            splits = split_tokens(x, tokens_per_expert)
            xd = torch.cat([layer.lora_dropout[adapter](xe) for layer, xe in zip(layers, splits)], dim=0) \
                if splits else x
            out = out + grouped_lora(xd.to(a.dtype), tokens_per_expert, a, b, first.scaling[adapter]).to(out.dtype)
        return out

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """The experts' forward (megatron-core's signature), base and LoRA per token split."""
        config = self.base_layer.config
        x, probs = permuted_local_hidden_states, permuted_probs
        if config.moe_apply_probs_on_input:
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        counts = [int(n) for n in (tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert)
                                   else tokens_per_expert)]
        h = self._add_lora(FC1, x, self._base(FC1, x, counts), counts)
        h = (glu_or_act(config, h) * probs.unsqueeze(-1)).to(h.dtype)
        out = self._add_lora(FC2, h, self._base(FC2, h, counts), counts)
        return out, None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The grouped module's own entries, then each expert's adapters exactly as ``SequentialMLP`` keys them.

        Sharded keys ``<prefix>experts.linear_fc1.lora_A.<adapter>.weight`` with
        a global-expert axis (or ``experts.<g>.`` under ``singleton_local_shards``)
        and the expert-DP rank as replica id: an adapter-only distributed
        checkpoint moves between the two expert implementations and across EP.
        """
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        base = self.base_layer
        out = dict(base.sharded_state_dict(prefix, sharded_offsets, metadata))
        n = self.num_local_experts
        total, first = (base.ep_group.size() * n, base.ep_group.rank() * n) if base.ep_group is not None else (n, 0)
        singleton = bool(metadata.get("singleton_local_shards", False))
        dp_rank = base.dp_group.rank() if getattr(base, "dp_group", None) is not None else 0
        for i, expert in enumerate(self.local_experts):
            for which in (FC1, FC2):
                local = f"{prefix}local_experts.{i}.{which}."
                if singleton:
                    sharded, offsets = f"{prefix}experts.{first + i}.{which}.", sharded_offsets
                else:
                    sharded = f"{prefix}experts.{which}."
                    offsets = (*sharded_offsets, (len(sharded_offsets), first + i, total))
                entries = dict(expert[which].sharded_state_dict(local, offsets, metadata))
                replace_prefix_for_sharding(entries, local, sharded)
                for entry in entries.values():
                    entry.replica_id = (*entry.replica_id[:2], dp_rank)
                out.update(entries)
        return out


def expert_module_names(module: nn.Module, global_name: str, which: str) -> list[str]:
    """The global ``SequentialMLP`` module names of a grouped module's experts' fc1/fc2."""
    first = _ep_rank(module) * module.num_local_experts
    return [f"{global_name}.local_experts.{first + i}.{which}" for i in range(module.num_local_experts)]


def grouped_parameter_names(module: nn.Module, global_name: str, which: str) -> list[str]:
    """Every name ``target_parameters`` may use for a grouped module's fc1/fc2 weights.

    The canonical ``<experts>.linear_fc1.weight``, the module's own parameter
    names (``weight1`` / ``linear_fc1.weight<i>``) and the ``SequentialMLP``
    names of its experts (``local_experts.<i>.linear_fc1.weight``, global ``i``).
    """
    names = [f"{global_name}.{which}.weight"]
    e = module.num_local_experts
    if _is_te_grouped(module):
        names += [f"{global_name}.{which}.weight{i}" for i in range(e)]
    else:
        names.append(f"{global_name}.{'weight1' if which == FC1 else 'weight2'}")
    return names + [f"{name}.weight" for name in expert_module_names(module, global_name, which)]
