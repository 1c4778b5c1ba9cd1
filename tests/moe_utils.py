"""A tiny megatron-core mixture-of-experts GPT for the expert-parallel oracles.

Four routed experts (top-2) plus a shared expert, ``SequentialMLP`` experts,
the local (no TE) spec. ``use_cpu_initialization`` alone does not give the
same experts at every expert-parallel layout (each EP rank draws its local
experts from the same RNG stream), so :func:`fill_from_global_names` draws
every base weight in full from a generator seeded by its *global* name
(global layer index, global expert index) and copies in this rank's slice:
the full model is then identical at every TP / EP / expert-TP / PP layout.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from megalora.megatron_config import cpu_friendly_config_kwargs
from megalora.sharding import ShardSpec
from tests.gpt_utils import SEQ, VOCAB, global_param_name

NUM_EXPERTS = 4
TOPK = 2
HIDDEN = 32
FFN = 48          # dense and shared-expert ffn
MOE_FFN = 32      # per routed expert
_EXPERTS = ".mlp.experts.local_experts."


def moe_config(tp=1, pp=1, ep=1, etp=None, dispatcher="alltoall", num_layers=2, sp=None,
               shared_expert=True):
    """The tiny MoE ``TransformerConfig``: gated (SwiGLU) experts, no aux loss, no token dropping.

    Load balancing is off (``moe_router_load_balancing_type="none"``, aux
    coefficient 0) so a layout's loss is the language-model loss alone, the
    same function at every layout. Megatron requires sequence parallelism for
    MoE under TP > 1, so ``sp`` defaults to ``tp > 1``.
    """
    from megatron.core.transformer import TransformerConfig

    pipeline = dict(pipeline_dtype=torch.float32) if pp > 1 else {}
    shared = dict(moe_shared_expert_intermediate_size=FFN) if shared_expert else {}
    return TransformerConfig(
        **pipeline, **shared,
        num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp if etp is not None else tp,
        sequence_parallel=(tp > 1) if sp is None else sp,
        hidden_dropout=0.0, attention_dropout=0.0,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        num_moe_experts=NUM_EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=MOE_FFN,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=False,
        **cpu_friendly_config_kwargs(),
    )


def moe_layer_spec(config, vp_stage=None):
    """The local spec with SequentialMLP experts (and SP-capable norms under SP)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    if config.sequence_parallel:
        from tests.sp_norm import sp_block_spec

        spec = sp_block_spec(spec, config, vp_stage)
    return spec


def build_moe_gpt(config, pre_process=True, post_process=True, seed=0):
    """A tiny MoE GPT whose base weights come from their global names (see module docstring)."""
    from megatron.core.models.gpt import GPTModel

    model = GPTModel(config, moe_layer_spec(config), vocab_size=VOCAB, max_sequence_length=SEQ,
                     pre_process=pre_process, post_process=post_process,
                     share_embeddings_and_output_weights=False)
    fill_from_global_names(model, seed)
    return model


def build_moe_stage(config, seed=0) -> list:
    """This pipeline stage's one model chunk, with Megatron's first/last flags."""
    from megatron.core import parallel_state as ps

    return [build_moe_gpt(config, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(), seed)]


def global_expert_name(model, name: str) -> str:
    """A parameter's layout-independent name: global layer index and global expert index.

    ``decoder.layers.<local>.mlp.experts.local_experts.<i>.x`` on EP rank ``e``
    with ``n`` local experts is global expert ``e * n + i`` (megatron-core's
    own assignment of experts to EP ranks).
    """
    if _EXPERTS not in name:
        return global_param_name(model, name)
    head, rest = name.split(_EXPERTS, 1)
    local, tail = rest.split(".", 1)
    experts = model.get_submodule(head + ".mlp.experts")
    ep_rank = experts.ep_group.rank() if experts.ep_group is not None else 0
    name = f"{head}{_EXPERTS}{ep_rank * experts.num_local_experts + int(local)}.{tail}"
    return global_param_name(model, name)


def _full_shape(param, world: int) -> tuple:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= world
    return tuple(shape)


def _draw(name: str, shape: tuple, seed: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    if name.endswith("layer_norm_weight") or "norm.weight" in name:
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    return 0.05 * torch.randn(shape, generator=gen)


def _tp_group_of(model, name: str):
    """The group a parameter is tensor-parallel over: the owning layer's ``tp_group``."""
    from megatron.core import parallel_state as ps

    module = model.get_submodule(name.rsplit(".", 1)[0])
    group = getattr(module, "tp_group", None)
    return group if group is not None else ps.get_tensor_model_parallel_group()


def fill_from_global_names(model, seed: int = 0) -> dict:
    """Overwrites every parameter with this rank's slice of a full tensor drawn from its global name.

    Expert weights are split over the expert-TP group, the rest over the dense
    TP group (each layer's own ``tp_group``); gated ``linear_fc1`` weights
    split per ``[gate; up]`` block.

    Returns:
        ``{global name: full tensor}`` of the parameters this rank holds.
    """
    full = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            group = _tp_group_of(model, name)
            rank, world = group.rank(), group.size()
            key = global_expert_name(model, name)
            tensor = _draw(key, _full_shape(param, world), seed)
            full[key] = tensor
            if getattr(param, "tensor_model_parallel", False):
                chunks = 2 if "linear_fc1" in name else 1  # all fc1s here are gated
                tensor = ShardSpec(dim=param.partition_dim, chunks=chunks).local(tensor, rank, world)
            param.copy_(tensor)
    return full


def ddp_train(chunks, steps, lr=1e-2, optimizer="adamw"):
    """Optimizer steps through the trainer's wrappers: megatron-core DDP, finalize, optimizer.

    The path a real job takes (:mod:`megalora.training.optim`): DDP reduces the
    dense LoRA grads over data parallelism and the expert ones (``allreduce=False``)
    over expert data parallelism, ``finalize_model_grads`` sums the TP-partial
    ones. Every rank reads the same micro-batches, so the data-parallel average
    is the single-replica gradient. No clipping (the expert optimizer's norm
    group is megatron-core's business, not LoRA's).

    Args:
        chunks: This stage's (adapted) model chunks.
        steps: One list of ``(tokens, labels)`` micro-batches per step.
        lr: The learning rate.
        optimizer: ``"adamw"`` or ``"sgd"``.

    Returns:
        ``(losses, norms)``: each step's mean micro-batch loss on the last
        stage (``None`` elsewhere), and megatron-core's global grad norm.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megalora.training.config import TrainSection
    from megalora.training.optim import make_optimizer, optimizer_step, wrap_chunks, zero_grads
    from tests.gpt_utils import BATCH, causal_mask, position_ids

    t = TrainSection(lr=lr, optimizer=optimizer, clip_grad=0.0)
    model = wrap_chunks(chunks, t)
    opt = make_optimizer(model, t)

    def step(data_iterator, module):
        tokens, labels = next(data_iterator)
        out = module(tokens, position_ids(), causal_mask(), labels=labels)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    losses, norms = [], []
    for micro in steps:
        zero_grads(model, opt)
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(micro), model=model, num_microbatches=len(micro),
            seq_length=SEQ, micro_batch_size=BATCH, forward_only=False)
        norms.append(optimizer_step(opt, lr, 0.0))
        last = ps.is_pipeline_last_stage()
        losses.append(sum(d["loss"].item() for d in out) / len(out) if last else None)
    return losses, norms
