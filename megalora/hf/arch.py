"""Which HF module becomes which megatron-core module, and how their tensors relate.

An :class:`Arch` lists, per transformer layer and for the model as a whole,
one :class:`ModuleRule` per megatron module: the HF module(s) it comes from
and how their tensors combine along the output dimension (dim 0 of an
``[out, in]`` weight, of a bias, of a LoRA ``B`` and of a DoRA magnitude):

* ``copy``: one HF module, same tensor.
* ``qkv``: megatron's ``linear_qkv`` holds, for each query group ``g``, the rows
  ``[q_g; k_g; v_g]`` (``q_g`` has ``heads / groups`` heads). HF keeps q, k and
  v apart (Llama) or stacked as ``[q; k; v]`` in one module (GPT-2's
  ``c_attn``).
* ``cat``: HF modules stacked on dim 0 (gated ``linear_fc1`` is ``[gate; up]``).
  Megatron's per-rank ``[gate_k; up_k]`` is a TP shard of that, which
  :class:`megalora.sharding.ShardSpec` with ``chunks=2`` expresses.
* ``expert``: routed expert ``e``'s linear layer
  (``mlp.experts.local_experts.<e>.linear_fc1``) is slice ``[e]`` of one 3-D HF
  parameter of the experts module (transformers 5: ``mlp.experts.gate_up_proj``
  ``[E, 2·ffn, hidden]`` = ``[gate; up]`` per expert, ``down_proj``
  ``[E, hidden, ffn]``): already megatron's ``[out, in]`` layout.

The same fuse/split serves base weights, biases and LoRA factors, so the base
model and its adapters can never disagree on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

MCORE_LAYER_PREFIX = "decoder.layers.{i}."


@dataclass(frozen=True)
class ModuleRule:
    """One megatron module and the HF module(s) it is made of.

    Attributes:
        mcore: The megatron module path (relative to the layer for layer rules).
        hf: The HF module path(s), same convention.
        kind: ``"copy"``, ``"qkv"`` or ``"cat"`` (see the module docstring).
        conv1d: Whether the HF module is a transformers ``Conv1D`` (weight ``[in, out]``).
        linear: Whether it is a linear layer (a LoRA target), not a norm or an embedding.
        hf_bias: Whether the HF module has a bias. Megatron switches biases on for
            whole groups of layers; a bias megatron has but HF lacks is zero.
        leaf: The megatron parameter name of the weight (``weight``; the shared
            expert gate is ``mlp.shared_experts.gate_weight``).
        hf_param: For ``expert``: the 3-D HF parameter of the experts module.
        expert: For ``expert``: the (global) expert index.
    """

    mcore: str
    hf: tuple
    kind: str = "copy"
    conv1d: bool = False
    linear: bool = True
    hf_bias: bool = False
    leaf: str = "weight"
    hf_param: Optional[str] = None
    expert: Optional[int] = None


@dataclass(frozen=True)
class Arch:
    """The module map of one HF architecture with its shapes.

    Attributes:
        model_type: HF's ``config.model_type``.
        hf_layer_prefix: HF path of layer ``i`` with ``{i}`` (``"model.layers.{i}."``).
        layer_rules: Rules inside each transformer layer.
        global_rules: Rules outside the layers (embeddings, final norm, output head).
        num_layers: Number of transformer layers.
        num_heads: Query heads.
        num_groups: Key/value heads (query groups).
        head_dim: Channels per head.
        tied: Whether the output head shares the input embedding.
    """

    model_type: str
    hf_layer_prefix: str
    layer_rules: tuple
    global_rules: tuple
    num_layers: int
    num_heads: int
    num_groups: int
    head_dim: int
    tied: bool

    # ---------------------------------------------------------------- names

    def rules(self) -> list[tuple[str, str, ModuleRule]]:
        """``(megatron prefix, HF prefix, rule)`` for every module of the model."""
        out = [("", "", rule) for rule in self.global_rules]
        for i in range(self.num_layers):
            mprefix, hprefix = MCORE_LAYER_PREFIX.format(i=i), self.hf_layer_prefix.format(i=i)
            out.extend((mprefix, hprefix, rule) for rule in self.layer_rules)
        return out

    def rule_for_mcore(self, module: str) -> tuple[str, str, ModuleRule]:
        """The rule of a global megatron module path, with both prefixes."""
        for mprefix, hprefix, rule in self.rules():
            if mprefix + rule.mcore == module:
                return mprefix, hprefix, rule
        raise KeyError(f"megatron module {module!r} has no HF counterpart in the {self.model_type} map")

    def hf_module_to_mcore(self) -> dict[str, tuple[str, int]]:
        """HF module path → (megatron module path, position among the rule's HF modules)."""
        out = {}
        for mprefix, hprefix, rule in self.rules():
            for pos, hf in enumerate(rule.hf):
                out[hprefix + hf] = (mprefix + rule.mcore, pos)
        return out

    def linear_hf_modules(self) -> list[str]:
        """Every HF linear module path (the universe LoRA targets are matched in)."""
        return [h + hf for _, h, rule in self.rules() if rule.linear for hf in rule.hf]

    def linear_mcore_modules(self) -> list[str]:
        """Every megatron linear module path."""
        return [m + rule.mcore for m, _, rule in self.rules() if rule.linear]

    @property
    def num_experts(self) -> int:
        """Routed experts per layer (0 for a dense model)."""
        return sum(1 for r in self.layer_rules if r.kind == "expert" and r.hf_param == HF_EXPERT_PARAMS[0][0])

    # ---------------------------------------------------------------- biases

    def _linear_rule(self, mcore: str) -> Optional[ModuleRule]:
        return next((r for r in self.layer_rules if r.mcore == mcore), None)

    @property
    def add_qkv_bias(self) -> bool:
        return self._linear_rule("self_attention.linear_qkv").hf_bias

    @property
    def add_bias_linear(self) -> bool:
        """Megatron's switch for every linear bias but the output head's."""
        names = ("self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
        return any(rule.hf_bias for rule in map(self._linear_rule, names) if rule is not None)

    def mcore_has_bias(self, rule: ModuleRule) -> bool:
        """Whether megatron's module of ``rule`` has a bias."""
        if rule.mcore == "output_layer" or not rule.linear:
            return rule.hf_bias and rule.mcore != "output_layer"
        if rule.mcore == "self_attention.linear_qkv":
            return self.add_bias_linear or self.add_qkv_bias
        return self.add_bias_linear

    def mcore_param_names(self) -> list[str]:
        """Every parameter of the whole megatron model (TP=1, PP=1), global names."""
        out = []
        for mprefix, _, rule in self.rules():
            if rule.mcore == "output_layer" and self.tied:
                continue  # the output head reads the embedding's weight
            out.append(f"{mprefix}{rule.mcore}.{rule.leaf}")
            if self.mcore_has_bias(rule):
                out.append(f"{mprefix}{rule.mcore}.bias")
        return out

    # ---------------------------------------------------------------- tensors

    @property
    def qkv_rows(self) -> tuple[int, int, int]:
        """Rows of q, k and v in the HF layout."""
        kv = self.num_groups * self.head_dim
        return self.num_heads * self.head_dim, kv, kv

    def fuse(self, rule: ModuleRule, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Megatron's tensor from the HF tensors of ``rule`` (all along dim 0)."""
        if rule.kind == "copy":
            return parts[0]
        if rule.kind == "expert":
            return parts[0][rule.expert]
        if rule.kind == "cat":
            return torch.cat(list(parts), dim=0)
        if rule.kind == "qkv":
            if len(parts) == 1:  # GPT-2's c_attn: [q; k; v] in one tensor
                parts = torch.split(parts[0], list(self.qkv_rows), dim=0)
            g = self.num_groups
            grouped = [p.reshape(g, p.shape[0] // g, *p.shape[1:]) for p in parts]
            return torch.cat(grouped, dim=1).reshape(-1, *parts[0].shape[1:])
        raise ValueError(f"unknown rule kind {rule.kind!r}")

    def split(self, rule: ModuleRule, fused: torch.Tensor) -> list[torch.Tensor]:
        """The HF tensors of ``rule`` from megatron's (inverse of :meth:`fuse`)."""
        if rule.kind in ("copy", "expert"):
            return [fused]  # an expert's slice of the HF tensor (see HFNames for the whole)
        if rule.kind == "cat":
            return list(fused.chunk(len(rule.hf), dim=0))
        if rule.kind == "qkv":
            g = self.num_groups
            rows = [r // g for r in self.qkv_rows]
            grouped = fused.reshape(g, sum(rows), *fused.shape[1:])
            parts = [p.reshape(-1, *fused.shape[1:]) for p in torch.split(grouped, rows, dim=1)]
            if len(rule.hf) == 1:
                return [torch.cat(parts, dim=0)]
            return parts
        raise ValueError(f"unknown rule kind {rule.kind!r}")


def _llama_rules(cfg) -> tuple[tuple, tuple]:
    attn_bias = bool(getattr(cfg, "attention_bias", False))
    mlp_bias = bool(getattr(cfg, "mlp_bias", False))
    layer = (
        ModuleRule("input_layernorm", ("input_layernorm",), linear=False),
        ModuleRule("self_attention.linear_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   "qkv", hf_bias=attn_bias),
        ModuleRule("self_attention.linear_proj", ("self_attn.o_proj",), hf_bias=attn_bias),
        ModuleRule("pre_mlp_layernorm", ("post_attention_layernorm",), linear=False),
        ModuleRule("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj"), "cat", hf_bias=mlp_bias),
        ModuleRule("mlp.linear_fc2", ("mlp.down_proj",), hf_bias=mlp_bias),
    )
    glob = (
        ModuleRule("embedding.word_embeddings", ("model.embed_tokens",), linear=False),
        ModuleRule("decoder.final_layernorm", ("model.norm",), linear=False),
        ModuleRule("output_layer", ("lm_head",)),
    )
    return layer, glob


def _gpt2_rules(cfg) -> tuple[tuple, tuple]:
    layer = (
        ModuleRule("input_layernorm", ("ln_1",), linear=False, hf_bias=True),
        ModuleRule("self_attention.linear_qkv", ("attn.c_attn",), "qkv", conv1d=True, hf_bias=True),
        ModuleRule("self_attention.linear_proj", ("attn.c_proj",), conv1d=True, hf_bias=True),
        ModuleRule("pre_mlp_layernorm", ("ln_2",), linear=False, hf_bias=True),
        ModuleRule("mlp.linear_fc1", ("mlp.c_fc",), conv1d=True, hf_bias=True),
        ModuleRule("mlp.linear_fc2", ("mlp.c_proj",), conv1d=True, hf_bias=True),
    )
    glob = (
        ModuleRule("embedding.word_embeddings", ("transformer.wte",), linear=False),
        ModuleRule("embedding.position_embeddings", ("transformer.wpe",), linear=False),
        ModuleRule("decoder.final_layernorm", ("transformer.ln_f",), linear=False, hf_bias=True),
        ModuleRule("output_layer", ("lm_head",)),
    )
    return layer, glob


MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
# The 3-D parameters of a transformers 5 experts module, in its definition order
# (PEFT nests its ParamWrappers in that order), and the megatron layer of each.
HF_EXPERT_PARAMS = (("gate_up_proj", "linear_fc1"), ("down_proj", "linear_fc2"))


def num_experts(cfg) -> int:
    """Routed experts per MoE layer (Mixtral's ``num_local_experts``, Qwen's ``num_experts``)."""
    return int(getattr(cfg, "num_local_experts", None) or cfg.num_experts)


def _moe_rules(cfg) -> tuple[tuple, tuple]:
    """Llama's attention and norms with a mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE)."""
    layer, glob = _llama_rules(cfg)
    qkv_bias = bool(getattr(cfg, "qkv_bias", False) or getattr(cfg, "attention_bias", False))
    o_bias = bool(getattr(cfg, "attention_bias", False))
    attention = [
        ModuleRule("input_layernorm", ("input_layernorm",), linear=False),
        ModuleRule("self_attention.linear_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   "qkv", hf_bias=qkv_bias),
        ModuleRule("self_attention.linear_proj", ("self_attn.o_proj",), hf_bias=o_bias),
        ModuleRule("pre_mlp_layernorm", ("post_attention_layernorm",), linear=False),
    ]
    if cfg.model_type == "qwen3_moe":
        attention += [ModuleRule("self_attention.q_layernorm", ("self_attn.q_norm",), linear=False),
                      ModuleRule("self_attention.k_layernorm", ("self_attn.k_norm",), linear=False)]
    moe = [ModuleRule("mlp.router", ("mlp.gate",), linear=False)]
    for e in range(num_experts(cfg)):
        moe += [ModuleRule(f"mlp.experts.local_experts.{e}.{mcore}", ("mlp.experts",), "expert", hf_param=hf, expert=e)
                for hf, mcore in HF_EXPERT_PARAMS]
    if cfg.model_type == "qwen2_moe":
        moe += [
            ModuleRule("mlp.shared_experts.linear_fc1", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                       "cat"),
            ModuleRule("mlp.shared_experts.linear_fc2", ("mlp.shared_expert.down_proj",)),
            ModuleRule("mlp.shared_experts", ("mlp.shared_expert_gate",), linear=False, leaf="gate_weight"),
        ]
    return tuple(attention + moe), glob


def _check_moe(cfg) -> None:
    sparse = [i for i in range(cfg.num_hidden_layers)
              if i not in (getattr(cfg, "mlp_only_layers", None) or [])
              and (i + 1) % int(getattr(cfg, "decoder_sparse_step", 1) or 1) == 0]
    if len(sparse) != cfg.num_hidden_layers:
        raise NotImplementedError(
            f"{cfg.model_type}: only models whose every layer is a MoE layer are supported (mlp_only_layers="
            f"{getattr(cfg, 'mlp_only_layers', None)}, decoder_sparse_step={getattr(cfg, 'decoder_sparse_step', 1)})")
    if getattr(cfg, "use_sliding_window", False):
        raise NotImplementedError(f"{cfg.model_type}: use_sliding_window=True is not supported")


SUPPORTED = ("llama", "gpt2") + MOE_TYPES


def arch_from_hf(cfg) -> Arch:
    """The :class:`Arch` of an HF config (``LlamaConfig`` or ``GPT2Config``).

    Raises:
        NotImplementedError: For another ``model_type``.
    """
    model_type = getattr(cfg, "model_type", None)
    if model_type in ("llama",) + MOE_TYPES:
        if model_type in MOE_TYPES:
            _check_moe(cfg)
        layer, glob = _moe_rules(cfg) if model_type in MOE_TYPES else _llama_rules(cfg)
        heads = cfg.num_attention_heads
        return Arch(
            model_type, "model.layers.{i}.", layer, glob, cfg.num_hidden_layers, heads,
            getattr(cfg, "num_key_value_heads", None) or heads,
            getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            bool(getattr(cfg, "tie_word_embeddings", False)),
        )
    if model_type == "gpt2":
        layer, glob = _gpt2_rules(cfg)
        return Arch(
            model_type, "transformer.h.{i}.", layer, glob, cfg.n_layer, cfg.n_head, cfg.n_head,
            cfg.n_embd // cfg.n_head, bool(getattr(cfg, "tie_word_embeddings", True)),
        )
    raise NotImplementedError(
        f"the HF bridge supports model_type in {SUPPORTED} (LlamaForCausalLM, GPT2LMHeadModel, "
        "MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM), "
        f"got {model_type!r}"
    )


def layer_suffix(name: str, layer_prefix: str) -> tuple[Optional[int], str]:
    """``(layer index, path inside the layer)`` of a module path, or ``(None, name)``.

    ``layer_prefix`` is ``"model.layers.{i}."`` style.
    """
    head, _, _ = layer_prefix.partition("{i}")
    if not name.startswith(head):
        return None, name
    rest = name[len(head):]
    index, dot, inner = rest.partition(".")
    if not index.isdigit() or not dot:
        return None, name
    return int(index), inner
