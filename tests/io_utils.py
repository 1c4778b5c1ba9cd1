"""Helpers for the adapter I/O tests: layouts built from one set of full weights.

Every model is built from the full TP=1/PP=1 weights of one reference GPT, and
every adapter is moved away from its (layout-invariant) init by noise drawn in
full from a generator seeded by the tensor's global name, then sliced. Two
layouts then hold the same adapter, while a fresh model does not, so a load
that silently did nothing fails the tests.
"""

from __future__ import annotations

import zlib

import torch

from tests import gpt_utils as G

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def lora_config(**overrides):
    import megalora

    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0)
    kwargs.update(overrides)
    return megalora.LoraConfig(**kwargs)


def reference_weights(num_layers: int = 4, gated: bool = True) -> dict:
    """Full base weights of the reference model (built at TP=1/PP=1, then torn down)."""
    import megalora
    from megalora.parallel_start import destroy_parallel

    megalora.init_parallel(seed=1234)
    model = G.build_gpt(G.gpt_config(num_layers=num_layers, gated=gated))
    full = {k: v.detach().clone() for k, v in model.named_parameters()}
    destroy_parallel()
    return full


def build(full: dict, tp=1, pp=1, vpp=None, num_layers=4, gated=True):
    """This rank's chunks at a layout, holding the reference weights (a model, or a list under VPP)."""
    import megalora

    megalora.init_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                           virtual_pipeline_model_parallel_size=vpp, seed=1234)
    chunks = G.build_stage(G.gpt_config(tp=tp, pp=pp, vpp=vpp, num_layers=num_layers, gated=gated))
    for chunk in chunks:
        G.load_full_state(chunk, full, gated=gated)
    return chunks if vpp else chunks[0]


@torch.no_grad()
def perturb(peft_model, adapter: str, scale: float = 0.05) -> None:
    """Add layout-invariant noise to every tensor of ``adapter`` (DoRA magnitudes are set, not moved)."""
    from megalora.collectives import group_rank, group_size
    from megalora.checkpoint import _adapter_entries

    for key, param, spec, group in _adapter_entries(peft_model, adapter):
        shape = list(spec.full_shape(param.shape, group_size(group)))
        gen = torch.Generator().manual_seed(zlib.crc32(f"{key}|{adapter}".encode()))
        noise = spec.local(torch.randn(shape, generator=gen) * scale, group_rank(group), group_size(group))
        if key.endswith("lora_magnitude_vector"):
            # DoRA's initial magnitude is a weight norm, summed in another order when the
            # input is sharded; set it outright so that every layout holds the same bits.
            param.copy_(1.0 + noise.abs())
        else:
            param.add_(noise.to(param.dtype))


def pipeline_logits(chunks, n_micro: int = 2, seed: int = 3) -> torch.Tensor:
    """Collective: full-vocab logits of ``n_micro`` micro-batches, on every rank, at any PP/VPP layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megalora.collectives import all_gather_objects

    chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
    data = G.batches(n_micro, seed=seed)
    captured = []

    def step(data_iterator, model):
        tokens, _ = next(data_iterator)
        out = model(tokens, G.position_ids(), G.causal_mask())

        def loss_func(logits):
            captured.append(gather_from_tensor_model_parallel_region(logits).detach().clone())
            return logits.sum() * 0, {}

        return out, loss_func

    for chunk in chunks:
        chunk.eval()
    iters = [iter(data) for _ in chunks]
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters if len(chunks) > 1 else iters[0], model=chunks,
            num_microbatches=n_micro, seq_length=G.SEQ, micro_batch_size=G.BATCH, forward_only=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    parts = all_gather_objects(torch.stack(captured) if last and captured else None)
    return next(p for p in parts if p is not None)


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float, what: str) -> None:
    diff = (a - b).abs().max().item()
    scale = max(a.abs().max().item(), 1e-12)
    assert diff <= rel * scale, f"{what}: differs by {diff} (scale {scale})"


def everywhere(local: dict) -> dict:
    """Collective: the union of every rank's dict."""
    from megalora.collectives import all_gather_objects

    merged = {}
    for part in all_gather_objects(local):
        merged.update(part)
    return merged


def gathered(peft_model, adapter: str = "default") -> dict:
    """Collective: every stage's full tensors of ``adapter``, PEFT keys, on every rank."""
    from megalora.checkpoint import adapter_state_dict

    return everywhere(adapter_state_dict(peft_model, adapter))
