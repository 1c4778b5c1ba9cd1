"""Pipeline-parallel oracle: global names across stages and virtual chunks.

Each body first trains a world-size-1 layout (TP=1, PP=1; the ranks are plain
replicas) through megatron-core's schedule, then rebuilds the same model from
the same full weights at the layout under test, with the same LoRA config, and
compares the losses and the gathered LoRA weights after 5 Adam steps. The config
selects layers by global number (``layers_to_transform``, ``rank_pattern``,
``alpha_pattern``), so stage-local matching would pick other layers and fail.
"""

from __future__ import annotations

import pytest

from tests import gpt_utils as G

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
# Global layer numbers: stage 1 of PP=2 starts at layer 2 (or 3), so a config
# read stage-locally would adapt its local layers 0 and 1 instead.
BY_LAYER = dict(
    layers_to_transform=[0, 2, 3],
    rank_pattern={"layers.3.mlp.linear_fc1": 8},
    alpha_pattern={"layers.2.self_attention.linear_qkv": 2},
)
STEPS = 5


def train_data() -> list:
    """The same two micro-batches at every step, so that the loss must go down."""
    return G.pipeline_steps(1) * STEPS


def _lora_config(**overrides):
    import megalora

    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0)
    kwargs.update(overrides)
    return megalora.LoraConfig(**kwargs)


def _everywhere(local: dict) -> dict:
    """Collective: the union of every rank's dict (each stage contributes its layers)."""
    from megalora.collectives import all_gather_objects

    merged = {}
    for part in all_gather_objects(local):
        merged.update(part)
    return merged


def gathered_adapter(peft_model) -> dict:
    """Collective: full LoRA tensors of every stage, keyed by global PEFT names."""
    from megalora.checkpoint import adapter_state_dict

    return _everywhere(adapter_state_dict(peft_model, "default"))


def adapted_layers(peft_model) -> dict:
    """Collective: ``{global module name: (r, alpha, scaling)}`` over every stage and chunk."""
    from megalora.targeting import global_module_names

    names = global_module_names(peft_model.base_model.model)
    local = {
        names[n]: (m.r["default"], m.lora_alpha["default"], m.scaling["default"])
        for n, m in peft_model.base_model.lora_layers()
    }
    return _everywhere(local)


def last_stage_losses(losses: list) -> list:
    """Collective: the loss list of the last pipeline stage, on every rank."""
    from megalora.collectives import all_gather_objects

    return next(part for part in all_gather_objects(losses) if part[0] is not None)


def assert_close_dicts(a, b, tol, what):
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())[:6]}"
    for key in a:
        diff = (a[key] - b[key]).abs().max().item()
        assert diff <= tol, f"{what}: {key} differs by {diff}"


def assert_losses_close(ref, got, what):
    assert len(ref) == len(got)
    for step, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= 1e-5 * abs(a), f"{what}, step {step}: reference loss {a} vs {b}"


def reference(num_layers, gated=False, rope=False, **lora):
    """Train the world-size-1 layout; returns its full base weights, losses, LoRA weights and layer set."""
    import megalora
    from megalora.parallel_start import destroy_parallel

    megalora.init_parallel(seed=1234)
    model = G.build_gpt(G.gpt_config(num_layers=num_layers, gated=gated), rope=rope)
    full = {k: v.detach().clone() for k, v in model.named_parameters()}
    peft = megalora.get_peft_model(model, _lora_config(**lora))
    out = dict(full=full, init=gathered_adapter(peft), layers=adapted_layers(peft))
    out["losses"] = G.pipeline_train(list(peft), train_data())
    out["final"] = gathered_adapter(peft)
    destroy_parallel()
    return out


def build_layout(full, tp=1, pp=1, vpp=None, num_layers=4, first_stage_layers=None, gated=False, rope=False,
                 **lora):
    """This rank's adapted chunks at a layout, loaded from the reference's full weights."""
    import megalora

    megalora.init_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                           virtual_pipeline_model_parallel_size=vpp, seed=1234)
    config = G.gpt_config(tp=tp, pp=pp, vpp=vpp, num_layers=num_layers, gated=gated,
                          first_stage_layers=first_stage_layers)
    chunks = G.build_stage(config, rope=rope)
    for chunk in chunks:
        G.load_full_state(chunk, full, gated=gated)
    model = chunks if vpp else chunks[0]
    return megalora.get_peft_model(model, _lora_config(**lora))


def _oracle_body(layout: dict, lora: dict):
    num_layers = layout.get("num_layers", 4)
    gated = layout.get("gated", False)
    ref = reference(num_layers, gated=gated, **lora)
    peft = build_layout(ref["full"], **layout, **lora)
    chunks = list(peft)

    layers = adapted_layers(peft)
    assert layers == ref["layers"], f"adapted layers differ: {sorted(layers.items() ^ ref['layers'].items())}"
    # A and B are drawn from the global name's generator: identical at any layout.
    assert_close_dicts(ref["init"], gathered_adapter(peft), 0.0, "init")
    losses = last_stage_losses(G.pipeline_train(chunks, train_data()))
    assert_losses_close(ref["losses"], losses, f"layout {layout}")
    assert_close_dicts(ref["final"], gathered_adapter(peft), 1e-5, "LoRA weights after 5 Adam steps")
    assert ref["losses"][-1] < ref["losses"][0], "training did not lower the loss"
    from megalora.layers import LoraLayer

    per_chunk = [sum(isinstance(m, LoraLayer) for m in c.modules()) for c in chunks]
    return sorted(layers), per_chunk


# (layout, LoRA config, the global layers it must adapt)
CASES = {
    "pp2": (dict(pp=2), BY_LAYER, {0, 2, 3}),
    "pp2-uneven": (dict(pp=2, num_layers=5, first_stage_layers=2), BY_LAYER, {0, 2, 3}),
    # A full-match regex and exclude_modules, both on global names: stage 1 holds global
    # layers 2-4 as local 0-2, so local matching would adapt other layers, or none.
    "pp2-uneven-regex-exclude": (
        dict(pp=2, num_layers=5, first_stage_layers=2),
        dict(target_modules=r"decoder\.layers\.[134]\..*linear_fc\d",
             exclude_modules=["decoder.layers.4.mlp.linear_fc1"]),
        {1, 3, 4},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pp2_matches_pp1(dist2, name):
    layout, lora, expected = CASES[name]
    (names0, chunks0), (names1, chunks1) = dist2(_oracle_body, layout, lora, timeout_s=600)
    assert names0 == names1
    assert {int(n.split(".")[2]) for n in names0} == expected
    if "exclude_modules" in lora:
        assert "decoder.layers.4.mlp.linear_fc1" not in names0 and "decoder.layers.4.mlp.linear_fc2" in names0
    # Both stages adapt some of their layers.
    assert chunks0[0] > 0 and chunks1[0] > 0


def test_vpp2_injects_every_chunk_and_matches_pp1(dist2):
    # Interleaved: chunk v of stage p holds global layer 2v + p.
    lora = dict(rank_pattern={"layers.3.mlp.linear_fc1": 8}, alpha_pattern={"layers.2.self_attention.linear_qkv": 2})
    results = dist2(_oracle_body, dict(pp=2, vpp=2), lora, timeout_s=600)
    for names, per_chunk in results:
        assert len(per_chunk) == 2 and all(n == len(TARGETS) for n in per_chunk), per_chunk
        assert {n.split(".")[2] for n in names} == {"0", "1", "2", "3"}


def test_tp2_pp2_matches_world_size_1(dist4):
    results = dist4(_oracle_body, dict(tp=2, pp=2, gated=True), BY_LAYER, timeout_s=600)
    assert all(r[0] == results[0][0] for r in results)


def _uneven_offsets_body():
    """Megatron's own uneven split places global layer numbers as targeting expects."""
    import megalora

    megalora.init_parallel(pipeline_model_parallel_size=2, seed=1)
    chunks = G.build_stage(G.gpt_config(pp=2, num_layers=5, first_stage_layers=3))
    peft = megalora.get_peft_model(chunks[0], _lora_config(target_modules=["linear_fc2"], layers_to_transform=[3]))
    return [l.layer_number for l in chunks[0].decoder.layers], sorted(adapted_layers(peft))


def test_uneven_first_stage_uses_global_numbers(dist2):
    (numbers0, names), (numbers1, _) = dist2(_uneven_offsets_body)
    assert numbers0 == [1, 2, 3] and numbers1 == [4, 5]
    assert names == ["decoder.layers.3.mlp.linear_fc2"]
