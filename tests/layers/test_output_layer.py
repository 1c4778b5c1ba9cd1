"""``output_layer`` as a LoRA target and in ``modules_to_save``, tied to the embeddings or not.

Megatron ties the output layer to the word embeddings by default. At PP=1 the
output layer then has no weight of its own (``GPTModel`` passes the embedding
weight at forward); under PP the last stage holds a duplicate that
``finalize_model_grads`` all-reduces with the first stage's embedding. Each
oracle trains a world-size-1 layout (TP=1, PP=1; the two ranks are data-parallel
replicas) and the layout under test from the same full weights, through
megatron-core's schedule with its DDP and ``finalize_model_grads``, and compares
losses and gathered adapters after several Adam steps.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests import gpt_utils as G
from tests import io_utils as U
from tests.test_targeting import assert_close_dicts, assert_losses_close, last_stage_losses

STEPS = 4
NUM_LAYERS = 2


def _lora(**overrides):
    import megalora

    kwargs = dict(r=4, lora_alpha=8, target_modules=["linear_fc2", "output_layer"], init_lora_weights=False,
                  lora_dropout=0.0)
    kwargs.update(overrides)
    return megalora.LoraConfig(**kwargs)


def _full_weights(tied: bool, gated: bool = False) -> dict:
    """Full base weights of the world-size-1 model (a tied one has no ``output_layer.weight``)."""
    import megalora
    from megalora.parallel_start import destroy_parallel

    megalora.init_parallel(seed=1234)
    model = G.build_gpt(G.gpt_config(num_layers=NUM_LAYERS, gated=gated), tied=tied)
    full = {k: v.detach().clone() for k, v in model.named_parameters()}
    destroy_parallel()
    return full


def _build(full: dict, tied: bool, tp=1, pp=1, gated=False):
    """This rank's (single-chunk) stage at a layout, holding ``full``."""
    import megalora

    megalora.init_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=1234)
    model = G.build_stage(G.gpt_config(tp=tp, pp=pp, num_layers=NUM_LAYERS, gated=gated), tied=tied)[0]
    G.load_full_state(model, full, gated=gated)
    return model


def _ddp_train(peft, steps: int) -> list:
    """Adam steps through megatron-core's schedule, DDP and ``finalize_model_grads`` (no megalora call).

    Returns the last stage's losses, on every rank.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = peft.config
    config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), peft)
    params = [p for p in ddp.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)

    def step(data_iterator, model):
        tokens, labels = next(data_iterator)
        out = model(tokens, G.position_ids(), G.causal_mask(), labels=labels)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    losses = []
    for micro in G.pipeline_steps(1) * steps:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(micro), model=[ddp], num_microbatches=len(micro),
            seq_length=G.SEQ, micro_batch_size=G.BATCH, forward_only=False)
        for p in params:
            p.grad = p.main_grad
        opt.step()
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        losses.append(sum(d["loss"].item() for d in out) / len(out) if last else None)
    return last_stage_losses(losses)


def _run(full, tied, layout, lora, save_dir=None):
    """Train at ``layout``; returns losses and the gathered adapter (saving it first if asked)."""
    import megalora
    from megalora.parallel_start import destroy_parallel

    peft = megalora.get_peft_model(_build(full, tied, **layout), lora)
    losses = _ddp_train(peft, STEPS)
    adapter = U.gathered(peft)
    if save_dir is not None:
        peft.save_pretrained(save_dir)
    destroy_parallel()
    return losses, adapter


# Tolerances: the layouts compute the same function from the same weights, in
# another summation order only (TP splits the vocab and hidden sums, PP moves
# nothing but activations), so losses agree to float32 rounding (1e-5 relative
# covers the ~1e-7 per-op noise accumulated over 4 steps); init_lora_weights=False
# gives every factor an O(1e-1) gradient, so Adam's normalised updates do not
# amplify that noise, and 1e-5 absolute on the factors is ~100x above it.
LAYOUTS = {"pp2": dict(pp=2), "tp2": dict(tp=2)}


def _lora_target_body(layout):
    full = _full_weights(tied=True)
    ref_losses, ref = _run(full, True, {}, _lora())
    losses, got = _run(full, True, layout, _lora())
    assert any(".output_layer.lora_B" in k for k in got), sorted(got)
    assert_losses_close(ref_losses, losses, f"LoRA on tied output_layer, {layout}")
    assert_close_dicts(ref, got, 1e-5, "LoRA weights after Adam steps")
    assert ref_losses[-1] < ref_losses[0], "training did not lower the loss"
    return losses


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lora_on_tied_output_layer_matches_world_size_1(dist2, name):
    dist2(_lora_target_body, LAYOUTS[name], timeout_s=400)


def test_tied_output_layer_tp2_pp2(dist4, tmp_path):
    dist4(_lora_target_body, dict(tp=2, pp=2), timeout_s=400)
    messages = dist4(_modules_to_save_body, dict(tp=2, pp=2), str(tmp_path), timeout_s=400)
    assert messages[0] and not any(messages[1:]), messages


def _saved_keys(directory: str) -> list:
    from safetensors import safe_open

    with safe_open(os.path.join(directory, "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def _modules_to_save_body(layout, root):
    import logging

    import megalora
    from megalora.parallel_start import destroy_parallel

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("megalora").addHandler(handler)
    try:
        full = _full_weights(tied=True)
        saved = _lora(target_modules=["linear_fc2"], modules_to_save=["output_layer"])
        frozen_losses, _ = _run(full, True, {}, _lora(target_modules=["linear_fc2"]))
        ref_losses, ref = _run(full, True, {}, saved)
        path = os.path.join(root, "adapter")
        losses, got = _run(full, True, layout, saved, save_dir=path)
    finally:
        logging.getLogger("megalora").removeHandler(handler)
    untied = [r.getMessage() for r in records if "untied" in r.getMessage()]

    # The copy trains: the same LoRA without it gives other losses from the second step on.
    assert all(abs(a - b) > 1e-4 for a, b in zip(frozen_losses[1:], ref_losses[1:])), (frozen_losses, ref_losses)
    copy_keys = [k for k in got if ".output_layer." in k]
    assert copy_keys, f"no output_layer copy in the adapter: {sorted(got)}"
    assert not torch.equal(got[copy_keys[0]], full["embedding.word_embeddings.weight"]), "the copy did not move"
    assert_losses_close(ref_losses, losses, f"modules_to_save output_layer, {layout}")
    assert_close_dicts(ref, got, 1e-5, "adapter after Adam steps")
    assert any(".output_layer." in k for k in _saved_keys(path)), _saved_keys(path)

    # The saved adapter reloads at the world-size-1 layout, onto a fresh tied model.
    peft = megalora.PeftModel.from_pretrained(_build(full, True), path)
    assert_close_dicts(got, U.gathered(peft), 0.0, "reloaded adapter")
    destroy_parallel()
    return untied


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_modules_to_save_tied_output_layer_unties_and_trains(dist2, tmp_path, name):
    messages = dist2(_modules_to_save_body, LAYOUTS[name], str(tmp_path), timeout_s=240)
    # Logged once, by rank 0 (each of the three models built there with the copy logs it).
    assert messages[1] == [] and messages[0], messages
    assert all("ensure_weight_tying" in m and "\n" not in m for m in messages[0]), messages[0]


def _dist_ckpt_body(tied, pp, root):
    """A full-model megatron dist checkpoint (as Megatron-LM writes it) saves and reloads."""
    import megalora
    from megatron.core import dist_checkpointing
    from megalora.parallel_start import destroy_parallel

    # Gated: megatron-core's MLP must still find linear_fc1's base keys for its SwiGLU layout.
    full = _full_weights(tied, gated=True)
    base_dir, full_dir = os.path.join(root, "base"), os.path.join(root, "full")
    for d in (base_dir, full_dir):
        os.makedirs(d, exist_ok=True)
    dist_checkpointing.save(_build(full, tied, pp=pp, gated=True).sharded_state_dict(), base_dir)
    destroy_parallel()

    lora = _lora(target_modules=["linear_fc1", "linear_fc2", "output_layer"])
    peft = megalora.get_peft_model(_build(full, tied, pp=pp, gated=True), lora)
    U.perturb(peft, "default")
    saved = U.gathered(peft)
    dist_checkpointing.save(peft.get_base_model().sharded_state_dict(), full_dir)
    destroy_parallel()

    # Reload the whole adapted model.
    peft = megalora.get_peft_model(_build(full, tied, pp=pp, gated=True), lora)
    model = peft.get_base_model()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), full_dir))
    assert_close_dicts(saved, U.gathered(peft), 0.0, "adapter after a full-model dist checkpoint")

    # A base-model checkpoint loads into the adapted model: every base key is found.
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    base_part = {k: v for k, v in model.sharded_state_dict().items() if ".lora_" not in k}
    result = model.load_state_dict(dist_checkpointing.load(base_part, base_dir), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(".lora_" in k for k in result.missing_keys), result.missing_keys
    mine = {G.global_param_name(model, n.replace("base_layer.", "")): p for n, p in model.named_parameters()
            if ".lora_" not in n}
    for key, param in mine.items():
        source = full.get(key, full["embedding.word_embeddings.weight"] if key == "output_layer.weight" else None)
        assert torch.equal(param, source), f"{key} not loaded from the base checkpoint"
    destroy_parallel()
    return sorted(mine)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("pp", [1, 2], ids=["pp1", "pp2"])
def test_full_model_dist_checkpoint_with_output_layer_lora(dist2, tmp_path, tied, pp):
    names = dist2(_dist_ckpt_body, tied, pp, str(tmp_path), timeout_s=300)
    assert any("output_layer" in n for r in names for n in r) or (tied and pp == 1)


def _bad_config_body(lora: dict, pp: int):
    import megalora
    from megalora.parallel_start import destroy_parallel

    model = _build(_full_weights(tied=True), True, pp=pp)
    try:
        megalora.get_peft_model(model, _lora(**lora))
    except ValueError as exc:
        return str(exc)
    finally:
        destroy_parallel()
    return None


BAD = {
    # Only the last stage has output_layer: the first stage must not fail on it alone.
    "modules-to-save-typo": (dict(modules_to_save=["output_layer", "outptu_layer"]), 2, ["outptu_layer",
                                                                                        "modules_to_save"]),
    # At PP=1 the tied output layer has no weight; refused at PP=2 too, where it has a copy.
    "dora-on-tied-output-pp1": (dict(use_dora=True), 1, ["output_layer", "use_dora"]),
    "dora-on-tied-output-pp2": (dict(use_dora=True), 2, ["output_layer", "use_dora"]),
    # PiSSA and friends rewrite the base weight: the same rule as DoRA's.
    "pissa-on-tied-output-pp1": (dict(init_lora_weights="pissa"), 1, ["output_layer", "init_lora_weights='pissa'"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_output_layer_config_fails_on_every_rank(dist2, name):
    lora, pp, words = BAD[name]
    messages = dist2(_bad_config_body, lora, pp, timeout_s=120)
    assert messages[0] is not None and messages[0] == messages[1], messages
    assert "\n" not in messages[0] and all(w in messages[0] for w in words), messages[0]
