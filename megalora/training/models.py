"""The base model of a job, built for this rank's place in the layout, with LoRA injected.

``model.source: hf`` goes through the HF bridge (:func:`megalora.hf.build_gpt_from_hf`),
which loads only this rank's shards. ``model.source: gpt`` builds a megatron-core
``GPTModel`` of the configured shape and overwrites every parameter with a draw
from a generator seeded by the parameter's *global* name, then keeps this
rank's slice. Megatron's own CPU init seeds each pipeline stage differently,
so its weights would depend on the layout; these do not, which is what lets
``megalora verify`` compare any layout with world size 1.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..sharding import param_shard_spec
from ..megatron_config import cpu_friendly_config_kwargs
from ..targeting import global_module_names
from .config import JobConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(cfg: JobConfig) -> torch.dtype:
    """The base model's params dtype: bf16 under ``train.bf16`` (Megatron-LM's ``--bf16``), else ``model.dtype``."""
    return torch.bfloat16 if cfg.train.bf16 else _DTYPES[cfg.model.dtype]


def padded_vocab_size(vocab: int, cfg: JobConfig) -> int:
    """``vocab`` rounded up to a multiple of ``make_vocab_size_divisible_by`` and of TP.

    Megatron-LM pads to a multiple of their *product*, so the vocabulary (and
    the random weights) would change with TP; the least common multiple keeps
    one padded size for TP = 1, 2, 4, 8, which ``megalora verify`` relies on.
    """
    multiple = math.lcm(cfg.model.make_vocab_size_divisible_by, cfg.parallel.tp)
    return -(-vocab // multiple) * multiple


def _sp_norm(normalization: str, on_sequence_shard: bool = True):
    """A torch norm for the local spec under sequence parallelism.

    The local spec's ``WrappedTorchNorm`` refuses ``sequence_parallel``
    (Megatron expects apex or TE there). A norm that runs on this rank's
    sequence shard has its params marked ``sequence_parallel`` so that, if
    trained, their TP-partial grads get summed; the q/k norms inside attention
    (``on_sequence_shard=False``) see the whole sequence and are not marked.
    """
    base = torch.nn.RMSNorm if normalization == "RMSNorm" else torch.nn.LayerNorm

    class SequenceParallelNorm(base):
        def __init__(self, config, hidden_size, eps=1e-5, **_):
            super().__init__(hidden_size, eps=eps)
            for p in self.parameters():
                p.sequence_parallel = config.sequence_parallel and on_sequence_shard

    return SequenceParallelNorm


def layer_spec(cfg: JobConfig, config, vp_stage: Optional[int]):
    """megatron-core's layer spec for the job (local or TE), SP-ready on CPU."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if cfg.model.transformer_impl == "transformer_engine":
        experts = dict(num_experts=config.num_moe_experts, moe_grouped_gemm=False) if config.num_moe_experts else {}
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm, **experts)
    return local_layer_spec(config, vp_stage)


def local_layer_spec(config, vp_stage: Optional[int] = None):
    """megatron-core's local spec for ``config`` (MoE experts, q/k norms), SP-ready on CPU."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    spec = specs.get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                          qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    if not config.sequence_parallel:
        return spec
    import copy

    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    norm = _sp_norm(config.normalization)
    spec = copy.deepcopy(spec)
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    if config.qk_layernorm:
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = _sp_norm(config.normalization, on_sequence_shard=False)
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=norm)


def gpt_transformer_config(cfg: JobConfig):
    """The ``TransformerConfig`` of a ``model.source: gpt`` job."""
    from megatron.core.transformer import TransformerConfig

    m, p = cfg.model, cfg.parallel
    dtype = dtype_of(cfg)
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        gated_linear_unit=m.gated_linear_unit, activation_func=F.silu if m.gated_linear_unit else F.gelu,
        normalization=m.normalization, add_bias_linear=m.add_bias_linear,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=m.init_std,
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp, sequence_parallel=p.sp,
        # perform_initialization stays on: with it off, megatron-core never tags its
        # TP weights (tensor_model_parallel, partition_dim), and sharding them breaks.
        pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        **_moe_kwargs(cfg),
        **cpu_friendly_config_kwargs(params_dtype=dtype, use_cpu_initialization=not torch.cuda.is_available()),
    )


def _moe_kwargs(cfg: JobConfig) -> dict:
    """The ``TransformerConfig`` fields of routed experts (none for a dense model)."""
    m, p = cfg.model, cfg.parallel
    if not m.num_moe_experts:
        return {}
    return dict(
        num_moe_experts=m.num_moe_experts, moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_token_dispatcher_type=m.moe_token_dispatcher_type, moe_grouped_gemm=False,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        # Without an aux loss the step's loss is the LM loss alone, the same at every layout.
        moe_router_load_balancing_type="aux_loss" if m.moe_aux_loss_coeff else "none",
        expert_model_parallel_size=p.ep, expert_tensor_parallel_size=p.expert_tp,
    )


def _init_value(global_name: str, shape, cfg: JobConfig) -> torch.Tensor:
    """The full tensor of one parameter, from its global name alone."""
    from ..layers.base import init_generator

    leaf = global_name.rpartition(".")[2]
    module = global_name.rpartition(".")[0]
    if "norm" in module.rpartition(".")[2] or module.endswith("layernorm"):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias" or len(shape) == 1:
        return torch.zeros(shape)
    std = cfg.model.init_std
    if module.endswith(("linear_proj", "linear_fc2")):  # Megatron's scaled init of output projections
        std = std / math.sqrt(2.0 * cfg.model.num_layers)
    gen = init_generator(cfg.model.init_seed, global_name, "base")
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def init_gpt_weights(model, cfg: JobConfig) -> None:
    """Overwrite every parameter with this rank's slice of a layout-independent draw.

    Each parameter is split over its own layer's TP group: the expert-TP group
    for routed experts, whose global names carry the global expert index.
    """
    from megatron.core import parallel_state as ps

    dense = ps.get_tensor_model_parallel_group()
    modules = global_module_names(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            module, _, leaf = name.rpartition(".")
            group = getattr(model.get_submodule(module), "tp_group", None)
            group = dense if group is None else group
            rank, world = group.rank(), group.size()
            global_name = f"{modules[module]}.{leaf}"
            if global_name == "output_layer.weight" and cfg.model.tie_embeddings:
                global_name = "embedding.word_embeddings.weight"  # the last stage's tied copy
            chunks = 2 if cfg.model.gated_linear_unit and module.endswith("linear_fc1") else 1
            spec = param_shard_spec(param, chunks=chunks)
            full_shape = list(param.shape)
            if spec.sharded:
                full_shape[spec.dim] *= world
            value = _init_value(global_name, full_shape, cfg)
            param.copy_(spec.local(value, rank, world).to(param.dtype))


def build_gpt(cfg: JobConfig, vocab_size: int, vp_stage: Optional[int]):
    """One chunk of a random ``GPTModel`` with layout-independent weights."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = gpt_transformer_config(cfg)
    m = cfg.model
    kwargs = {"vp_stage": vp_stage} if vp_stage is not None else {}
    model = GPTModel(
        config, layer_spec(cfg, config, vp_stage), vocab_size=padded_vocab_size(m.vocab_size or vocab_size, cfg),
        max_sequence_length=m.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        position_embedding_type=m.position_embedding_type, rotary_base=m.rotary_base,
        share_embeddings_and_output_weights=m.tie_embeddings, **kwargs,
    )
    init_gpt_weights(model, cfg)
    return model


def build_hf(cfg: JobConfig, vp_stage: Optional[int]):
    """One chunk of the HF model through the bridge (this rank's shards only)."""
    from ..hf import build_gpt_from_hf, megatron_config_from_hf
    from ..hf.build import weight_source

    dtype = dtype_of(cfg)
    overrides = dict(sequence_parallel=cfg.parallel.sp, params_dtype=dtype, pipeline_dtype=dtype,
                     bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    # Collective: rank 0 converts the model into megalora's cache once; the HF
    # config then comes from the cache (reading a GGUF's config costs seconds).
    config = megatron_config_from_hf(weight_source(cfg.model.hf_path).hf_config, **overrides)
    return build_gpt_from_hf(cfg.model.hf_path, vp_stage=vp_stage, config=config,
                             layer_spec=layer_spec(cfg, config, vp_stage))


def check_model_fits(cfg: JobConfig) -> None:
    """Raises before any rank starts when the layout does not fit the model's shape.

    A random GPT's shape is in the config (checked on load). An HF model's
    comes from the converted-weights cache: on a miss this process converts
    it (once, for every later run and rank), so the ranks only read it.
    """
    if cfg.model.source != "hf":
        return
    from ..hf.build import check_layout_fits_model, weight_source
    from ..hf.cache import cached_config_fields
    from ..hf.models import resolve_files

    p = cfg.parallel
    hf_config = cached_config_fields(resolve_files(cfg.model.hf_path)) or weight_source(cfg.model.hf_path).hf_config
    check_layout_fits_model(hf_config, p.tp, p.pp, p.vpp)


def build_chunks(cfg: JobConfig, vocab_size: int) -> list:
    """This rank's model chunks: one per virtual pipeline stage (one without VPP)."""
    stages = list(range(cfg.parallel.vpp)) if cfg.parallel.vpp else [None]
    if cfg.model.source == "hf":
        return [build_hf(cfg, v) for v in stages]
    return [build_gpt(cfg, vocab_size, v) for v in stages]


def model_vocab_size(chunks: list) -> int:
    """The (padded) vocabulary size the model was built with."""
    return int(chunks[0].vocab_size)


def hf_config_of(chunks: list):
    """The HF config the bridge recorded on a chunk, or ``None`` for a random GPT."""
    return getattr(chunks[0], "hf_config", None)
