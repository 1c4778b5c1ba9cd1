"""Trainable tokens on megatron-core's embedding and (tied) output layer, and ``ensure_weight_tying``.

Each oracle trains the world-size-1 layout (TP=1, PP=1; two ranks are
data-parallel replicas of it) and the layout under test from the same full
weights, through megatron-core's schedule with its DDP and unmodified
``finalize_model_grads``, and compares losses and the gathered adapter (trained
token rows included) after several Adam steps. One launch checks several layouts.
"""

from __future__ import annotations

import logging
import os

import torch

from tests import gpt_utils as G
from tests import io_utils as U
from tests.layers.test_output_layer import _ddp_train, _full_weights
from tests.test_targeting import assert_close_dicts, assert_losses_close

STEPS = 4
# Ids on both halves of the 128-token vocabulary (TP=2 splits it at 64), the
# first and last id of each half included.
IDS = [0, 7, 63, 64, 100, 127]
DELTA = "base_model.model.embedding.word_embeddings.token_adapter.trainable_tokens_delta"
EMB_COPY = "base_model.model.embedding.word_embeddings.weight"


def _lora(**overrides):
    import megalora

    kwargs = dict(r=4, lora_alpha=8, target_modules=["linear_fc2"], init_lora_weights=False, lora_dropout=0.0,
                  trainable_token_indices=IDS)
    kwargs.update(overrides)
    return megalora.LoraConfig(**kwargs)


def _build(full: dict, tp=1, pp=1, sp=False):
    import megalora

    megalora.init_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=1234)
    model = G.build_stage(G.gpt_config(tp=tp, pp=pp, sp=sp, num_layers=2), tied=True)[0]
    G.load_full_state(model, full)
    return model


def _run(full, layout, lora, save_dir=None, plain=False):
    """Train at ``layout`` (megatron DDP, or a plain loop with ``megalora.sync_lora_grads``)."""
    import megalora
    from megalora.parallel_start import destroy_parallel
    from tests.test_targeting import last_stage_losses

    peft = megalora.get_peft_model(_build(full, **layout), lora)
    if plain:
        losses = last_stage_losses(G.pipeline_train([peft.get_base_model()], G.pipeline_steps(STEPS)))
    else:
        losses = _ddp_train(peft, STEPS)
    adapter = U.gathered(peft)
    if save_dir is not None:
        peft.save_pretrained(save_dir)
    destroy_parallel()
    return losses, adapter


def _logged(fn):
    """``fn()``'s result and the megalora log lines emitted meanwhile."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("megalora").addHandler(handler)
    try:
        return fn(), [r.getMessage() for r in records]
    finally:
        logging.getLogger("megalora").removeHandler(handler)


# Tolerances: the layouts compute the same function from the same weights in
# another summation order only (TP splits the vocab and hidden sums, PP moves
# activations), so losses agree to float32 rounding (1e-5 relative over 4
# steps); the token rows and LoRA factors get O(1e-1) gradients, so Adam's
# normalised updates do not amplify that noise, and 1e-5 absolute is ~100x above it.
def _tokens_body(layouts: dict, root: str):
    import megalora
    from megalora.parallel_start import destroy_parallel

    full = _full_weights(tied=True)
    ref_losses, ref = _run(full, {}, _lora())
    rows = full["embedding.word_embeddings.weight"][IDS]
    assert not torch.allclose(ref[DELTA], rows, atol=1e-4), "the token rows did not train"
    assert ref[DELTA].shape == (len(IDS), 64)
    assert sorted(ref) == sorted(k for k in ref if "lora_" in k or k == DELTA), sorted(ref)
    # Without the token rows, the same LoRA gives other losses: the rows change the model.
    plain_losses, _ = _run(full, {}, _lora(trainable_token_indices=None))
    assert all(abs(a - b) > 1e-5 for a, b in zip(plain_losses[1:], ref_losses[1:])), (plain_losses, ref_losses)
    out = {}
    for name, layout in layouts.items():
        path = os.path.join(root, name)
        losses, got = _run(full, layout, _lora(), save_dir=path)
        assert_losses_close(ref_losses, losses, f"trainable tokens, {name}")
        assert_close_dicts(ref, got, 1e-5, f"adapter after Adam steps, {name}")
        # The file loads at the world-size-1 layout, rows included, and merges into the table.
        peft = megalora.PeftModel.from_pretrained(_build(full), path)
        assert_close_dicts(got, U.gathered(peft), 0.0, f"reloaded at TP=1, {name}")
        tokens = torch.tensor([IDS + IDS[:2] + [1] * (G.SEQ - len(IDS) - 2)] * G.BATCH)
        with torch.no_grad():
            before = G.logits(peft, tokens)
            merged = G.logits(peft.merge_and_unload(), tokens)
        U.assert_close(before, merged, 1e-5, f"merge_and_unload of the token rows, {name}")
        destroy_parallel()
        out[name] = losses
    return out


def test_trainable_tokens_match_world_size_1(dist2, tmp_path):
    layouts = {"tp2": dict(tp=2), "tp2-sp": dict(tp=2, sp=True), "pp2": dict(pp=2)}
    dist2(_tokens_body, layouts, str(tmp_path), timeout_s=600)


def test_trainable_tokens_tp2_pp2(dist4, tmp_path):
    dist4(_tokens_body, {"tp2pp2": dict(tp=2, pp=2)}, str(tmp_path), timeout_s=600)


def _tying_body(root: str):
    """``ensure_weight_tying`` both ways, modules_to_save and trainable tokens, PP=2 against PP=1 (tied)."""
    import megalora

    full = _full_weights(tied=True)
    cases = {
        "mts-tied": _lora(trainable_token_indices=None, modules_to_save=["output_layer"], ensure_weight_tying=True),
        "mts-untied": _lora(trainable_token_indices=None, modules_to_save=["output_layer"]),
        "tokens-untied": _lora(trainable_token_indices={"embedding": [1, 70], "output_layer": [3, 90]}),
        "tokens-tied": _lora(trainable_token_indices={"output_layer": IDS, "embedding": IDS},
                             ensure_weight_tying=True),
    }
    cases["tokens-plain-loop"] = _lora()
    keys, logs = {}, {}
    for name, lora in cases.items():
        plain = name.endswith("plain-loop")  # the embedding-group sum comes from megalora.sync_lora_grads
        (ref_losses, ref), logs[name] = _logged(lambda: _run(full, {}, lora, plain=plain))
        losses, got = _run(full, dict(pp=2), lora, save_dir=os.path.join(root, name), plain=plain)
        assert_losses_close(ref_losses, losses, f"{name}, PP=2")
        assert_close_dicts(ref, got, 1e-5, f"{name}: adapter after Adam steps, PP=2")
        keys[name] = sorted(k for k in got if "lora_" not in k)
    # ensure_weight_tying=True: one shared copy, trained (it left the embeddings), saved once.
    _, ref = _run(full, {}, cases["mts-tied"])
    assert keys["mts-tied"] == [EMB_COPY], keys
    assert not torch.allclose(ref[EMB_COPY], full["embedding.word_embeddings.weight"], atol=1e-4)
    assert keys["mts-untied"] == ["base_model.model.output_layer.weight"], keys
    assert keys["tokens-untied"] == [DELTA, DELTA.replace("embedding.word_embeddings", "output_layer")], keys
    assert keys["tokens-tied"] == [DELTA], keys
    # Different ids with ensure_weight_tying=True: PEFT's ValueError, on every rank, before anything changes.
    bad = _lora(trainable_token_indices={"embedding": [1], "output_layer": [3]}, ensure_weight_tying=True)
    try:
        megalora.get_peft_model(_build(full, pp=2), bad)
        error = None
    except ValueError as exc:
        error = str(exc)
    finally:
        from megalora.parallel_start import destroy_parallel

        destroy_parallel()
    return logs, error


def test_ensure_weight_tying_pp2_matches_pp1(dist2, tmp_path):
    results = dist2(_tying_body, str(tmp_path), timeout_s=600)
    logs, error = results[0]
    assert error and "ensure_weight_tying" in error and "\n" not in error and results[1][1] == error, results
    assert any("untied" in m and "ensure_weight_tying" in m for m in logs["mts-untied"]), logs
    assert any("untied" in m for m in logs["tokens-untied"]), logs
    assert not any("untied" in m for m in logs["mts-tied"] + logs["tokens-tied"]), logs
    assert not any(results[1][0].values()), "only rank 0 logs"


def _one_rank_body():
    """Ids all in TP rank 0's half: rank 1 holds no rows, yet both ranks take the same backward collectives."""
    full = _full_weights(tied=True)
    lora = _lora(trainable_token_indices=[1, 2])
    ref_losses, ref = _run(full, {}, lora)
    losses, got = _run(full, dict(tp=2), lora)
    assert_losses_close(ref_losses, losses, "rows on one TP rank only")
    assert_close_dicts(ref, got, 1e-5, "rows on one TP rank only")


def test_trainable_tokens_on_one_tp_rank_only(dist2):
    dist2(_one_rank_body, timeout_s=300)
