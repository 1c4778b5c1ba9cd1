"""Helpers for the HF bridge tests: tiny random HF models, and logits at any layout.

The tiny models are made in-process from transformers configs with a fixed
seed, so every rank builds the same one. Their parameters (norms included)
are perturbed away from their init, so that a wrong mapping of any tensor
shows in the logits.
"""

from __future__ import annotations

import torch

SEQ = 16
BATCH = 2
VOCAB = 96


# kind -> (config class, model class, the config field of the number of routed experts)
MOE_KINDS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "num_local_experts"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "num_experts"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "num_experts"),
}


def tiny_hf(kind: str, tied: bool = True, seed: int = 0, dtype=torch.float32, **overrides):
    """A small random ``LlamaForCausalLM`` (GQA: 6 heads, 3 groups), ``GPT2LMHeadModel`` or MoE model.

    Shapes divide by 3 (and 2), so TP=3 fits; 4 layers, so PP=2 (and VPP=2) fit.
    The MoE kinds (:data:`MOE_KINDS`) have 2 layers of 4 routed experts (top-2;
    Qwen2-MoE also a gated shared expert, Qwen3-MoE q/k norms) and 2 query
    groups, so EP=2, TP=2 and PP=2 fit.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        fields = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=64,
                      rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied)
        fields.update(overrides)
        model = LlamaForCausalLM(LlamaConfig(**fields))
    elif kind in MOE_KINDS:
        import transformers

        config_cls, model_cls, experts_field = MOE_KINDS[kind]
        fields = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                      rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, num_experts_per_tok=2)
        fields[experts_field] = 4
        if kind != "mixtral":
            fields.update(moe_intermediate_size=32, norm_topk_prob=kind == "qwen3_moe")
        if kind == "qwen2_moe":
            fields.update(shared_expert_intermediate_size=48)
        if kind == "qwen3_moe":
            fields.update(head_dim=8)
        fields.update(overrides)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields))
    elif kind == "gpt2":
        fields = dict(vocab_size=VOCAB, n_embd=48, n_head=6, n_layer=4, n_positions=32, bos_token_id=0,
                      eos_token_id=0, tie_word_embeddings=tied)
        fields.update(overrides)
        model = GPT2LMHeadModel(GPT2Config(**fields))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    # transformers' reference attention (the default sdpa kernel rounds differently).
    model.set_attn_implementation("eager")
    return model.to(dtype).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, toks) -> torch.Tensor:
    with torch.no_grad():
        return model(toks).logits


def mcore_logits(model, toks, hidden_size: int, dtype=torch.float32):
    """Full-vocab logits ``[b, s, v]`` on the last pipeline stage, ``None`` on the others.

    Pipeline stages pass activations with plain send/recv (one microbatch, forward only).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = toks.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(s, b, hidden_size, dtype=dtype)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(toks, position_ids, mask)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        return gather_from_tensor_model_parallel_region(out)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def perturb_lora(peft_model, seed: int = 3, scale: float = 0.05) -> None:
    """Give every LoRA factor (and DoRA magnitude) a TP-invariant random offset.

    Each full factor is drawn from a generator seeded by its global name and
    sliced with the layer's own shard spec, so every layout gets the same adapter.
    """
    import zlib

    from megalora.layers import LoraLayer
    from megalora.targeting import global_module_names

    for chunk in peft_model:
        names = global_module_names(chunk)
        for local, layer in chunk.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            for adapter in layer.lora_A:
                tags = {"B": "B", "magnitude": "m"}
                # A too where it starts at zero (PEFT's embedding init), so that the adapter acts.
                entries = [(e.param, e.spec, tags.get(e.role, e.role)) for e in layer.tensors(adapter)
                           if e.role in tags or (e.role == "A" and not e.param.any())]
                for param, spec, tag in entries:
                    full_shape = list(param.shape)
                    if spec.sharded:
                        full_shape[spec.dim] *= layer.tp_size
                    gen = torch.Generator().manual_seed(seed + zlib.crc32(f"{names[local]}|{tag}".encode()))
                    noise = torch.randn(full_shape, generator=gen) * scale
                    with torch.no_grad():
                        param.add_(spec.local(noise, layer.tp_rank, layer.tp_size))


def check_diffs(per_rank: list[dict], tol: float, required: set) -> None:
    """Assert every rank's ``{case: {check: value}}``: parity <= ``tol``, round trip exact, LoRA effects visible.

    ``required``: the checks that some rank must have run (the comparing ranks hold the logits).
    """
    seen = set()
    for rank, cases in enumerate(per_rank):
        for case, diffs in cases.items():
            for check, value in diffs.items():
                seen.add(check)
                if check == "export_identity":
                    assert value == 0.0, f"rank {rank} {case}: HF → megatron → HF changed the weights by {value}"
                elif check.endswith("changes_logits"):
                    assert -value > 1e-2, f"rank {rank} {case}: {check}: the adapter has no effect ({-value})"
                else:
                    assert value <= tol, f"rank {rank} {case}: {check} = {value} > {tol}"
    assert required <= seen, seen
