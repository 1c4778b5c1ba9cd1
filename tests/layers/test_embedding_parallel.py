"""LoRA on megatron-core's ``VocabParallelEmbedding`` against world size 1.

A is split along the vocabulary and B replicated; each rank adds its LoRA
partial before the embedding's own all-reduce (reduce-scatter under SP). The
oracles train the world-size-1 layout, rebuild the model at TP=2, TP=2+SP,
PP=2 (tied embeddings, Megatron's default) and TP=2×PP=2 (untied) from the same full weights, and compare losses and the
gathered adapter after 5 Adam steps (the tolerances are the other oracles':
bit-equal init, summation-order rounding after that). The TP body also checks
merging into the sharded table, saving at TP=2 and loading at TP=1, and that
the adapter adds no collective.
"""

from __future__ import annotations

import torch

from tests import gpt_utils as G
from tests import test_targeting as T
from tests.layers import test_parallel as P

# init_lora_weights=True: PEFT's embedding init (A zero, B ~ N(0, 1)); the
# linear layers get theirs (B zero). Both factors train from step 1.
EMB = dict(target_modules=["word_embeddings", "linear_qkv", "linear_fc2"], init_lora_weights=True)


def lora_grads(model) -> dict:
    """Collective: every LoRA factor's full gradient after one backward and ``sync_lora_grads``.

    The oracles compare weights after Adam steps, which a uniform scale of a
    gradient (a partial sum averaged instead of summed) leaves almost
    unchanged; gradients show it.
    """
    import megalora
    from megalora.sharding import gather_full

    model.zero_grad()
    G.lm_loss(model, G.batches(1)[0]).backward()
    megalora.sync_lora_grads(model)
    out = {}
    for _, layer in model.base_model.lora_layers():
        for e in layer.tensors("default"):
            out[f"{e.global_name}.{e.saved_key}"] = gather_full(e.param.grad.detach(), e.spec, e.group).clone()
    model.zero_grad()
    return out


def assert_grads_close(ref: dict, got: dict, what: str) -> None:
    """Relative to each gradient's largest entry.

    Taken after the 5 training steps (at init an embedding's A is zero, so
    B's gradient is too): the weights then agree to ~1e-5, so 1e-4 relative;
    a partial sum averaged instead of summed is off by 50%.
    """
    assert ref.keys() == got.keys(), what
    for key in ref:
        scale = ref[key].abs().max().item()
        diff = (ref[key] - got[key]).abs().max().item()
        assert scale > 0 and diff <= 1e-4 * scale, f"{what}: gradient of {key} differs by {diff} (max {scale})"


def _collectives(model):
    base, lora, sync = G.step_collectives(model, G.batches(1)[0])
    return dict(base.calls), dict(lora.calls), sync.total_calls


def _rope_sp_oracle():
    """TP=2+SP with rope: no learned position embedding, so the embedding reduce-scatters its output.

    That is the path where the LoRA partial must join the reduce-scatter (the
    other SP oracles have learned positions and all-reduce); same tolerances.
    """
    import megalora
    from megalora.parallel_start import destroy_parallel

    def build(tp, full=None):
        megalora.init_parallel(tensor_model_parallel_size=tp, seed=1234)
        model = G.build_gpt(G.gpt_config(tp=tp, sp=tp > 1), rope=True)
        if full is not None:
            G.load_full_state(model, full)
        full = {k: v.detach().clone() for k, v in model.named_parameters()}
        return megalora.get_peft_model(model, P._lora_config(**EMB)), full

    ref, full = build(1)
    ref_init, ref_losses, ref_final = P._adapter(ref), G.train(ref, G.batches(1) * 5), P._adapter(ref)
    ref_grads = lora_grads(ref)
    destroy_parallel()
    par, _ = build(2, full)
    assert par.base_model.model.embedding.word_embeddings.reduce_scatter_embeddings
    P._assert_close_dicts(ref_init, P._adapter(par), 0.0, "init")
    losses = G.train(par, G.batches(1) * 5)
    for a, b in zip(ref_losses, losses):
        assert abs(a - b) <= 1e-5 * abs(a), f"TP=1 loss {a} vs TP=2+SP (reduce-scatter) loss {b}"
    P._assert_close_dicts(ref_final, P._adapter(par), 1e-5, "LoRA weights after training")
    assert_grads_close(ref_grads, lora_grads(par), "TP=2+SP (reduce-scatter)")
    counts = _collectives(par)
    destroy_parallel()
    return counts


def _tp_body(path):
    from megalora.parallel_start import destroy_parallel
    import megalora

    P._oracle_body(False, False, dict(EMB))
    destroy_parallel()
    P._oracle_body(True, True, dict(EMB))
    destroy_parallel()
    counts = [_rope_sp_oracle(), _collectives(P._build(2, True, True, **EMB)[0])]
    destroy_parallel()
    # B's partial gradients through megatron-core's DDP and finalize_model_grads (its grad_sync tag).
    P._ddp_body(True, dict(EMB))
    destroy_parallel()

    _, full = P._build(1, False, False, **EMB)  # the full base weights
    destroy_parallel()
    model, _ = P._build(2, False, False, full=full, **EMB)
    G.train(model, G.batches(2))
    tokens = G.batches(1, seed=9)[0][0]
    model.eval()
    with torch.no_grad():
        unmerged = G.logits(model, tokens)
        table = model.base_model.model.embedding.word_embeddings.get_base_layer().weight
        before = table.clone()
        model.merge_adapter()
        merged = (G.logits(model, tokens) - unmerged).abs().max().item()
        changed = (table - before).abs().max().item()
        model.unmerge_adapter()
    model.save_pretrained(path)
    destroy_parallel()

    megalora.init_parallel(seed=1234)
    base = G.build_gpt(G.gpt_config())
    G.load_full_state(base, full)
    loaded = megalora.PeftModel.from_pretrained(base, path)
    loaded.eval()
    with torch.no_grad():
        reloaded = (G.logits(loaded, tokens) - unmerged).abs().max().item()
    destroy_parallel()
    return counts, merged, changed, reloaded


def test_tp2_and_sp_match_tp1_merge_save_load(dist2, tmp_path):
    for counts, merged, changed, reloaded in dist2(_tp_body, str(tmp_path)):
        for base_calls, lora_calls, sync_calls in counts:  # reduce-scatter (rope) and all-reduce paths
            assert lora_calls == base_calls, f"embedding LoRA changed the collectives: {base_calls} -> {lora_calls}"
            assert sync_calls == 1, "the replicated grads should be reduced in one coalesced all-reduce"
        assert changed > 1e-3, "merging did not write into the sharded table"
        # fp32 rounding of reordered sums on logits of size ~1.
        assert merged < 1e-5, merged
        assert reloaded < 1e-5, reloaded


def _tp2_pp2_body():
    """Embedding LoRA, then QALoRA (groups of 16 on 4 layers), at TP=2 x PP=2 against world size 1."""
    from megalora.parallel_start import destroy_parallel

    emb = T._oracle_body(dict(tp=2, pp=2), dict(EMB))
    destroy_parallel()
    qalora = T._oracle_body(dict(tp=2, pp=2, gated=True), dict(use_qalora=True, qalora_group_size=16))
    destroy_parallel()
    return emb[0], qalora[0]


def test_tp2_pp2_matches_world_size_1(dist4):
    results = dist4(_tp2_pp2_body, timeout_s=900)
    assert "embedding.word_embeddings" in results[0][0]
    assert len(results[0][1]) == 16  # QALoRA on the 4 linear layers of all 4 transformer layers


def _tied_body(layout: dict, path: str):
    """Tied embeddings (Megatron's default) at a PP layout against PP=1, and the merge refusals.

    At PP=2 the output layer is on the last stage with its own copy of the
    base table; LoRA on the first stage's embedding must not change it, at
    any layout, so the losses match PP=1 (where the head reads the table itself).
    """
    import pytest

    import megalora
    from megalora.parallel_start import destroy_parallel

    megalora.init_parallel(seed=1234)
    model = G.build_gpt(G.gpt_config(num_layers=4), tied=True)
    full = {k: v.detach().clone() for k, v in model.named_parameters()}
    ref = megalora.get_peft_model(model, T._lora_config(**EMB))
    ref_init = T.gathered_adapter(ref)
    ref_losses = G.pipeline_train(list(ref), T.train_data())
    ref_final = T.gathered_adapter(ref)
    destroy_parallel()

    tp, pp = layout.get("tp", 1), layout["pp"]
    megalora.init_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=1234)
    chunks = G.build_stage(G.gpt_config(tp=tp, pp=pp, num_layers=4), tied=True)
    G.load_full_state(chunks[0], full)
    peft = megalora.get_peft_model(chunks[0], T._lora_config(**EMB))
    T.assert_close_dicts(ref_init, T.gathered_adapter(peft), 0.0, "init")
    losses = T.last_stage_losses(G.pipeline_train(list(peft), T.train_data()))
    T.assert_losses_close(ref_losses, losses, f"tied, layout {layout}")
    T.assert_close_dicts(ref_final, T.gathered_adapter(peft), 1e-5, "LoRA weights after 5 Adam steps")

    embedding = getattr(getattr(peft.base_model.model, "embedding", None), "word_embeddings", None)
    refused_merge = None
    if embedding is not None:  # the first stage
        with pytest.raises(ValueError, match="the output layer is tied to it") as info:
            peft.merge_adapter()
        refused_merge = str(info.value)
    with pytest.raises(ValueError, match="the output layer is tied to these embeddings") as export_info:
        megalora.export_merged(peft, path, progressbar=False)
    destroy_parallel()
    return refused_merge, str(export_info.value)


def test_tied_pp2_matches_pp1_and_merge_is_refused(dist2, tmp_path):
    (merge0, export0), (merge1, export1) = dist2(_tied_body, dict(pp=2), str(tmp_path), timeout_s=600)
    assert merge0 is not None and merge1 is None  # the embedding lives on stage 0 only
    assert export0 == export1  # every rank raises the same error
