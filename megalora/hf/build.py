"""Build a megatron-core ``GPTModel`` from an HF model, loading only this rank's shards.

The map from HF config fields to megatron-core's ``TransformerConfig``:

=========================  =======================================================
Llama (``LlamaConfig``)     megatron-core
=========================  =======================================================
``num_key_value_heads``     ``num_query_groups`` (GQA)
``head_dim``                ``kv_channels``
``intermediate_size``       ``ffn_hidden_size``, ``gated_linear_unit=True``, SiLU
``rms_norm_eps``            ``layernorm_epsilon``, ``normalization="RMSNorm"``
``rope_theta``              ``GPTModel(rotary_base=...)``, ``position_embedding_type="rope"``
``tie_word_embeddings``     ``share_embeddings_and_output_weights``
``attention_bias``          ``add_qkv_bias`` (and zero biases where HF has none)
=========================  =======================================================

Mixtral / Qwen2-MoE / Qwen3-MoE map as Llama, plus ``num_local_experts`` /
``num_experts`` → ``num_moe_experts``, ``num_experts_per_tok`` →
``moe_router_topk``, ``moe_intermediate_size`` → ``moe_ffn_hidden_size``,
``norm_topk_prob=False`` → ``moe_router_pre_softmax``, Qwen2-MoE's
``shared_expert_intermediate_size`` → ``moe_shared_expert_intermediate_size``
with ``moe_shared_expert_gate``, ``qkv_bias`` → ``add_qkv_bias``, Qwen3-MoE's
q/k norms → ``qk_layernorm`` (see :func:`_moe_kwargs`).

GPT-2 maps to learned absolute positions, ``LayerNorm``, biases everywhere and
the tanh GELU (``openai_gelu``, which is HF's ``gelu_new``); its ``Conv1D``
weights are transposed.

The layer spec is megatron-core's local spec (no Transformer Engine). Every
parameter is overwritten from the source, and each rank reads only the shards
it holds (its pipeline stage's layers, its TP slice).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..collectives import agree_or_raise
from ..sharding import ShardSpec, param_shard_spec
from ..megatron_config import cpu_friendly_config_kwargs
from ..targeting import global_module_names
from .arch import MOE_TYPES, arch_from_hf, num_experts
from .convert import HFModelSource, WeightSource, source_name
from .models import clean_hf_config, is_hf_model, resolve_files

_UNEVEN_PP_FIELDS = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                     "pipeline_model_parallel_layout")


def _rope(hf_config) -> tuple[float, Optional[dict]]:
    """``(rope_theta, scaling)``, from transformers 5's ``rope_parameters`` or 4's fields."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    scaling = getattr(hf_config, "rope_scaling", None) or params
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    return float(theta), dict(scaling, rope_type=rope_type)


def _gpt2_activation(name: str):
    from megatron.core.transformer.utils import openai_gelu

    table = {"gelu_new": openai_gelu, "gelu_pytorch_tanh": openai_gelu, "gelu_fast": openai_gelu,
             "gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu}
    if name not in table:
        raise NotImplementedError(
            f"GPT2Config.activation_function={name!r} is not supported; use one of {sorted(table)}"
        )
    return table[name]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout_fits_model(hf_config, tp: int, pp: int, vpp: Optional[int] = None, uneven_pp: bool = False,
                            ep: int = 1) -> None:
    """Raise a clear error, naming the layouts that fit, if ``tp``/``pp``/``vpp`` do not fit the model.

    Raises:
        ValueError: With every reason and the TP and PP sizes that would work.
    """
    arch = arch_from_hf(hf_config)
    vocab = hf_config.vocab_size
    ffn = _ffn(hf_config)
    tp_needs = {"num_attention_heads": arch.num_heads, "num_key_value_heads (query groups)": arch.num_groups,
                "ffn hidden size": ffn, "vocab_size": vocab}
    problems = [f"{field}={value} is not divisible by tensor_model_parallel_size={tp}"
                for field, value in tp_needs.items() if value % tp]
    if arch.num_experts and arch.num_experts % ep:
        problems.append(f"num_experts={arch.num_experts} is not divisible by expert_model_parallel_size={ep}")
    chunks = pp * (vpp or 1)
    if not uneven_pp and arch.num_layers % chunks:
        what = f"pipeline_model_parallel_size={pp}" + (f" x virtual_pipeline_model_parallel_size={vpp}" if vpp else "")
        problems.append(f"num_layers={arch.num_layers} is not divisible by {what}")
    if problems:
        tp_ok = _divisors(math.gcd(*tp_needs.values()))
        pp_ok = _divisors(arch.num_layers)
        raise ValueError(
            f"the {arch.model_type} model does not fit this layout: " + "; ".join(problems)
            + f". Layouts that fit: tensor_model_parallel_size in {tp_ok}, pipeline_model_parallel_size in "
            f"{pp_ok} (times the virtual pipeline size, if any, must divide num_layers={arch.num_layers})"
        )


def _ffn(hf_config) -> int:
    if hf_config.model_type == "gpt2":
        return hf_config.n_inner or 4 * hf_config.n_embd
    return getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size


def _moe_kwargs(hf_config) -> dict:
    """The ``TransformerConfig`` MoE fields of Mixtral / Qwen2-MoE / Qwen3-MoE.

    HF's router: softmax over all experts, top-k, then (Mixtral, or
    ``norm_topk_prob``) renormalised over the k. Megatron's top-k on the logits
    followed by a softmax over the k is the same; without renormalisation it is
    megatron's ``moe_router_pre_softmax``. Load balancing only adds a training
    loss (HF adds it only with ``output_router_logits``): off here.
    """
    if hf_config.model_type not in MOE_TYPES:
        return {}
    renorm = hf_config.model_type == "mixtral" or bool(getattr(hf_config, "norm_topk_prob", False))
    out = dict(num_moe_experts=num_experts(hf_config), moe_router_topk=int(hf_config.num_experts_per_tok),
               moe_ffn_hidden_size=_ffn(hf_config), moe_router_pre_softmax=not renorm,
               moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_grouped_gemm=False,
               moe_token_dispatcher_type="alltoall", qk_layernorm=hf_config.model_type == "qwen3_moe")
    if hf_config.model_type == "qwen2_moe":
        out.update(moe_shared_expert_intermediate_size=int(hf_config.shared_expert_intermediate_size),
                   moe_shared_expert_gate=True)
    if float(getattr(hf_config, "router_jitter_noise", 0.0) or 0.0):
        raise NotImplementedError(f"router_jitter_noise={hf_config.router_jitter_noise}: set it to 0")
    return out


def _parallel_sizes() -> dict:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {}
    return dict(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
    )


def megatron_config_from_hf(hf_config, **overrides: Any):
    """A megatron-core ``TransformerConfig`` for an HF Llama or GPT-2 config.

    Parallel sizes default to megatron's initialized parallel state. Weights
    are allocated on the CPU (``use_cpu_initialization``) in fp32, dropouts
    are 0, and megatron's fused kernels are off; ``overrides`` set any field
    (``params_dtype``, ``sequence_parallel``, ...).

    Raises:
        ValueError: If the parallel layout does not fit the model (see :func:`check_layout_fits_model`).
        NotImplementedError: For an unsupported architecture or option.
    """
    from megatron.core.transformer import TransformerConfig

    arch = arch_from_hf(hf_config)
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=_ffn(hf_config),
        add_bias_linear=arch.add_bias_linear,
        add_qkv_bias=arch.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **cpu_friendly_config_kwargs(),
        **_parallel_sizes(),
        **_moe_kwargs(hf_config),
    )
    if arch.model_type in ("llama",) + MOE_TYPES:
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"LlamaConfig.hidden_act={act!r}: the bridge supports 'silu' (SwiGLU)")
        kwargs.update(hidden_size=hf_config.hidden_size, normalization="RMSNorm", gated_linear_unit=True,
                      activation_func=F.silu, layernorm_epsilon=float(hf_config.rms_norm_eps))
    else:
        if not getattr(hf_config, "scale_attn_weights", True) or getattr(hf_config, "scale_attn_by_inverse_layer_idx",
                                                                         False):
            raise NotImplementedError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
        kwargs.update(hidden_size=hf_config.n_embd, normalization="LayerNorm", gated_linear_unit=False,
                      activation_func=_gpt2_activation(hf_config.activation_function),
                      layernorm_epsilon=float(hf_config.layer_norm_epsilon))
    kwargs.update(overrides)
    kwargs.setdefault("pipeline_dtype", kwargs["params_dtype"])  # pipeline p2p buffers
    check_layout_fits_model(hf_config, kwargs.get("tensor_model_parallel_size", 1), kwargs.get("pipeline_model_parallel_size", 1),
                 kwargs.get("virtual_pipeline_model_parallel_size"),
                 uneven_pp=any(kwargs.get(f) is not None for f in _UNEVEN_PP_FIELDS),
                 ep=kwargs.get("expert_model_parallel_size") or 1)
    return TransformerConfig(**kwargs)


def gpt_model_kwargs(hf_config) -> dict:
    """``GPTModel`` arguments that are not part of the ``TransformerConfig``."""
    arch = arch_from_hf(hf_config)
    kwargs = dict(vocab_size=hf_config.vocab_size, share_embeddings_and_output_weights=arch.tied)
    if arch.model_type == "gpt2":
        return dict(kwargs, max_sequence_length=hf_config.n_positions, position_embedding_type="learned_absolute")
    theta, scaling = _rope(hf_config)
    kwargs.update(max_sequence_length=hf_config.max_position_embeddings, position_embedding_type="rope",
                  rotary_base=theta)
    if scaling is not None:
        # megatron-core implements only Llama 3.1's scaling, with its default constants.
        wanted = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
        ok = scaling["rope_type"] == "llama3" and all(float(scaling.get(k, v)) == v for k, v in wanted.items())
        if not ok:
            raise NotImplementedError(
                f"rope scaling {scaling} is not supported: megatron-core implements rope_type='llama3' with "
                f"{wanted} only"
            )
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(scaling.get("factor", 8.0)))
    return kwargs


def weight_source(source=None) -> WeightSource:
    """The :class:`WeightSource` of a source: converted in memory, or from the cache.

    For a path source, global rank 0 converts on a cache miss while the
    other ranks wait for the file (see :func:`megalora.hf.cache.cached_source`).
    """
    if is_hf_model(source):
        hf_config = clean_hf_config(source.config)
        return HFModelSource(arch_from_hf(hf_config), hf_config, source.state_dict())
    from .cache import cached_source

    return cached_source(resolve_files(source))


def param_spec(name: str, param: torch.Tensor, gated: bool) -> ShardSpec:
    """The shard spec of a megatron parameter; rank k of a gated fc1 holds ``[gate_k; up_k]``."""
    # mlp.linear_fc1, a routed expert's and the shared experts' linear_fc1 alike.
    return param_shard_spec(param, chunks=2 if gated and name.rpartition(".")[0].endswith("linear_fc1") else 1)


def global_param_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name → global megatron name (layer numbers made global)."""
    modules = global_module_names(model)
    out = {}
    for name, _ in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        out[name] = f"{modules[module]}.{leaf}" if module else leaf
    return out


def load_shards(model: torch.nn.Module, source: WeightSource) -> None:
    """Collective over the TP group: copy this rank's shard of every parameter from ``source``.

    Every rank checks its own parameters first; problems are raised on all
    ranks of the TP group (which hold the same parameter names) together.
    Only the TP group communicates: megatron-core's tied-embedding all-reduce
    between first and last stage may be pending while virtual chunks are built.
    """
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    gated = bool(getattr(model.config, "gated_linear_unit", False))
    names = global_param_names(model)
    known = set(source.arch.mcore_param_names())
    plan, problems = [], []
    for local, param in model.named_parameters():
        name = names[local]
        if source_name(source.arch, name) not in known:
            problems.append(f"the model has {name} but the HF {source.arch.model_type} model has no such tensor")
            continue
        # Experts are split over the expert-TP group: each parameter over its layer's own tp_group.
        owner = model.get_submodule(local.rpartition(".")[0]) if "." in local else model
        tp = getattr(owner, "tp_group", None) or group
        plan.append((name, param, param_spec(name, param, gated), tp.rank(), tp.size()))
    agree_or_raise("; ".join(problems[:4]) if problems else None, group)
    with torch.no_grad():
        for name, param, spec, rank, world in plan:
            value = source.local(name, spec, rank, world)
            if tuple(value.shape) != tuple(param.shape):
                problems.append(
                    f"{name}: the source shard is {tuple(value.shape)}, the model needs {tuple(param.shape)}"
                )
                continue
            param.copy_(value.to(dtype=param.dtype, device=param.device))
    agree_or_raise("; ".join(problems[:4]) if problems else None, group)


def _loaded_later(weight: torch.Tensor) -> None:
    """An init method that leaves the weight as allocated: :func:`load_shards` overwrites it."""


def _without_random_init(config):
    """A copy of ``config`` whose init methods draw nothing.

    :func:`load_shards` writes every parameter (a parameter with no HF tensor
    is an error), so megatron-core's random init, which draws each *full*
    weight on every rank on the CPU, would be thrown away: 1.4 s of a 2.0 s
    SmolLM2 build at TP=3. ``perform_initialization`` stays on, so megatron
    still tags its TP weights.
    """
    import copy

    config = copy.copy(config)
    config.init_method = config.output_layer_init_method = config.embedding_init_method = _loaded_later
    return config


def build_gpt_from_hf(
    source=None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    config=None,
    layer_spec=None,
    **config_overrides: Any,
):
    """A megatron-core ``GPTModel`` (this rank's stage and TP shards) with an HF model's weights.

    Every rank calls it (once per virtual pipeline chunk, with its
    ``vp_stage``, as megatron's ``get_model`` calls a model provider); it
    communicates only within the TP group. Call ``megalora.init_parallel``
    first; the layout must fit the model (:func:`check_layout_fits_model`).

    Args:
        source: ``None`` (SmolLM2), a ``.gguf`` file or HF directory (converted
            once, then read from the cache), or an HF ``PreTrainedModel`` in memory.
        pre_process: Whether this chunk holds the embedding; default from the parallel state.
        post_process: Whether it holds the output head; default from the parallel state.
        vp_stage: The virtual pipeline chunk index, under virtual pipelining.
        config: A ready ``TransformerConfig``; default :func:`megatron_config_from_hf`.
        layer_spec: A layer spec instead of megatron-core's local spec (MoE experts and
            q/k norms as the model needs, torch norms that accept sequence parallelism).
        **config_overrides: Fields for :func:`megatron_config_from_hf`.

    Returns:
        The ``GPTModel``, with the HF config as ``model.hf_config``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    src = weight_source(source)
    if config is None:
        config = megatron_config_from_hf(src.hf_config, **config_overrides)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if layer_spec is None:
        from ..training.models import local_layer_spec

        layer_spec = local_layer_spec(config, vp_stage)
    extra = {"vp_stage": vp_stage} if vp_stage is not None else {}
    config = _without_random_init(config)
    model = GPTModel(config, layer_spec, pre_process=pre_process, post_process=post_process,
                     **gpt_model_kwargs(src.hf_config), **extra)
    # megatron-core's local-spec torch norms ignore params_dtype; one dtype for all parameters.
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != config.params_dtype:
            param.data = param.data.to(config.params_dtype)
    load_shards(model, src)
    model.hf_config = src.hf_config
    return model
