"""Small real megatron-core GPT models for the parallel oracles.

A reference model is built at TP=1; its full state dict is the ground truth.
A model at another layout loads this rank's slices of the same full tensors,
so the two compute the same function. Gated ``linear_fc1`` weights are sliced
per ``[gate; up]`` block, as megatron-core lays them out per rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalora.sharding import ShardSpec
from megalora.megatron_config import cpu_friendly_config_kwargs

VOCAB = 128
SEQ = 16
BATCH = 2


def gpt_config(tp=1, pp=1, sp=False, gated=False, num_layers=2, dropout=0.0, bias=True, vpp=None,
               first_stage_layers=None):
    from megatron.core.transformer import TransformerConfig

    pipeline = dict(pipeline_dtype=torch.float32) if pp > 1 else {}
    if vpp is not None:
        pipeline["virtual_pipeline_model_parallel_size"] = vpp
    if first_stage_layers is not None:
        pipeline["num_layers_in_first_pipeline_stage"] = first_stage_layers
    return TransformerConfig(
        **pipeline,
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=96,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        gated_linear_unit=gated,
        activation_func=F.silu if gated else F.gelu,
        add_bias_linear=bias,
        **cpu_friendly_config_kwargs(),
    )


def layer_spec(config, vp_stage=None):
    """The local (no TE) spec; with SP, norms that accept sequence parallelism."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec()
    if config.sequence_parallel:
        from tests.sp_norm import sp_block_spec

        spec = sp_block_spec(spec, config, vp_stage)
    return spec


def build_gpt(config, pre_process=True, post_process=True, vp_stage=None, rope=False, tied=False):
    """A GPT; ``tied`` shares the output layer's weight with the embeddings (Megatron's default)."""
    from megatron.core.models.gpt import GPTModel

    kwargs = dict(vp_stage=vp_stage) if vp_stage is not None else {}
    if rope:
        kwargs["position_embedding_type"] = "rope"
    return GPTModel(
        config,
        layer_spec(config, vp_stage),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=tied,
        **kwargs,
    )


def build_stage(config, rope=False, tied=False) -> list:
    """This pipeline stage's model chunks (one per virtual stage), with Megatron's first/last flags."""
    from megatron.core import parallel_state as ps

    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for v in range(vpp or 1):
        vp_stage = v if vpp else None
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunks.append(build_gpt(config, first, last, vp_stage=vp_stage, rope=rope, tied=tied))
    return chunks


def global_param_name(model, name: str) -> str:
    """``decoder.layers.<local>.x`` → ``decoder.layers.<layer_number - 1>.x`` (the TP=1/PP=1 name)."""
    prefix = "decoder.layers."
    if not name.startswith(prefix):
        return name
    index, rest = name[len(prefix):].split(".", 1)
    return f"{prefix}{model.decoder.layers[int(index)].layer_number - 1}.{rest}"


def _spec_for(name: str, param, gated: bool) -> ShardSpec:
    if not getattr(param, "tensor_model_parallel", False):
        return ShardSpec()
    chunks = 2 if gated and "linear_fc1" in name else 1
    return ShardSpec(dim=param.partition_dim, chunks=chunks)


def load_full_state(model, full: dict, gated: bool = False) -> None:
    """Copy this rank's slices of ``full`` (a TP=1/PP=1 state dict) into ``model``.

    Under PP a stage's ``decoder.layers.<i>`` loads global layer ``layer_number - 1``. A tied
    output layer's own copy (last stage under PP) loads the embedding weight.
    """
    from megatron.core import parallel_state as ps

    rank, world = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = global_param_name(model, name)
            if key == "output_layer.weight" and key not in full:
                key = "embedding.word_embeddings.weight"
            source = full[key]
            param.copy_(_spec_for(name, param, gated).local(source, rank, world))


def batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def position_ids():
    return torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)


def causal_mask():
    return torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)


def lm_loss(model, batch) -> torch.Tensor:
    tokens, labels = batch
    per_token = model(tokens, position_ids(), causal_mask(), labels=labels)
    return per_token.float().mean()


def logits(model, tokens) -> torch.Tensor:
    """Full-vocab logits ``[b, s, v]`` (gathered across TP)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    out = model(tokens, position_ids(), causal_mask())
    return gather_from_tensor_model_parallel_region(out)


def train(model, data, lr=1e-3) -> list[float]:
    """A plain loop: Adam on trainable params, ``sync_lora_grads`` each step."""
    import megalora

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for batch in data:
        opt.zero_grad()
        loss = lm_loss(model, batch)
        loss.backward()
        megalora.sync_lora_grads(model)
        opt.step()
        losses.append(loss.item())
    return losses


def pipeline_train(chunks, steps, lr=1e-3, forward_only=False) -> list:
    """Adam steps through megatron-core's schedule (any PP/VPP layout).

    Args:
        chunks: This stage's model chunks (adapted in place).
        steps: One list of ``(tokens, labels)`` micro-batches per step.
        lr: Adam's learning rate.
        forward_only: Run the schedule without backward or optimizer step.

    Returns:
        Each step's mean micro-batch loss on the last stage, ``None`` elsewhere.
    """
    import megalora
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    params = [p for c in chunks for p in c.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if not forward_only else None

    def step(data_iterator, model):
        tokens, labels = next(data_iterator)
        out = model(tokens, position_ids(), causal_mask(), labels=labels)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    losses = []
    for micro in steps:
        if opt is not None:
            opt.zero_grad()
        iters = [iter(micro) for _ in chunks]
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters if len(chunks) > 1 else iters[0], model=chunks,
            num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=BATCH, forward_only=forward_only)
        if opt is not None:
            megalora.sync_lora_grads(chunks)
            opt.step()
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        losses.append(sum(d["loss"].item() for d in out) / len(out) if last else None)
    return losses


def pipeline_steps(n_steps: int, n_micro: int = 2, seed: int = 0) -> list:
    """``n_steps`` lists of ``n_micro`` micro-batches."""
    data = batches(n_steps * n_micro, seed=seed)
    return [data[i * n_micro:(i + 1) * n_micro] for i in range(n_steps)]


def step_collectives(model, batch):
    """Counted collectives of one forward+backward with the adapters off, then on, and of the LoRA grad sync.

    The embedding's weight requires grad during the two steps, so that backward runs through every layer
    with the adapters disabled too. Returns the three ``count_collectives`` logs ``(base, lora, sync)``.
    """
    import megalora
    from megalora.testing.collective_counter import count_collectives

    weight = model.base_model.model.embedding.word_embeddings.weight
    weight.requires_grad_(True)

    def step(enabled):
        model.zero_grad()
        (model.enable_adapter_layers if enabled else model.disable_adapter_layers)()
        with count_collectives() as log:
            lm_loss(model, batch).backward()
        return log

    base, lora = step(False), step(True)
    weight.requires_grad_(False)
    with count_collectives() as sync:
        megalora.sync_lora_grads(model)
    return base, lora, sync
