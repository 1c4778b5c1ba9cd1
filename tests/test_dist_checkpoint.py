"""Adapter-only checkpoints through megatron-core's dist_checkpointing, resharded on load.

Saved at TP=2 (with DP=2, so replica ids must keep the second replica from
writing), loaded at TP=1 and at TP=2 x PP=2 x VPP=2; the loaded adapters must
equal the saved ones bit for bit. A checkpoint that kept only one TP shard of a
factor (Megatron-Bridge #2240), or the wrong half of a gated fc1, fails this.
"""

from __future__ import annotations

import os

import torch

from tests import io_utils as U

# Sparse layers and a per-layer r: a factor stacked on a layer axis could hold neither.
DEFAULT = dict(layers_to_transform=[0, 2, 3], rank_pattern={"layers.3.mlp.linear_fc1": 8},
               modules_to_save=["output_layer"])
# Trainable token rows on both halves of the vocab: each row is written by the TP rank that owns it.
DORA = dict(r=2, lora_alpha=4, use_dora=True, target_modules=["linear_fc1", "linear_proj"],
            trainable_token_indices=[3, 70, 127])
# QALoRA's A split along the pooled input of a row-parallel layer.
EXTRA = {"dora": DORA,
         "qalora": dict(r=2, lora_alpha=4, use_qalora=True, qalora_group_size=16, target_modules=["linear_fc2"])}
# A vocab-split embedding LoRA: a model of its own, since trainable tokens and LoRA cannot share the
# embedding (PEFT's rule too).
EXTRA_EMBEDDING = {"emb": dict(r=2, lora_alpha=4, target_modules=["word_embeddings"])}


def _adapted(model, extra=None):
    import megalora

    peft = megalora.get_peft_model(model, U.lora_config(**DEFAULT))
    for name, config in (EXTRA if extra is None else extra).items():
        peft.add_adapter(name, U.lora_config(**config))
    return peft


def _sharded_keys_body():
    """The LoRA layer's entries in a whole-model sharded state dict: base keys unchanged."""
    from megalora.parallel_start import destroy_parallel

    full = U.reference_weights()
    peft = _adapted(U.build(full, tp=2))
    sharded = peft.get_base_model().sharded_state_dict()
    prefix = "decoder.layers.0.mlp.linear_fc1."
    out = {k[len(prefix):]: getattr(v, "key", None) for k, v in sharded.items() if k.startswith(prefix)}
    destroy_parallel()
    return out


def _round_trip_body(root: str, embedding: bool = False):
    from megalora.dist_checkpoint import load_adapter_dist_checkpoint, save_adapter_dist_checkpoint
    from megalora.parallel_start import destroy_parallel

    extra = EXTRA_EMBEDDING if embedding else EXTRA
    adapters = ("default", *extra)
    full = U.reference_weights()
    peft = _adapted(U.build(full, tp=2), extra)
    for adapter in adapters:
        U.perturb(peft, adapter)
    saved = {a: U.gathered(peft, a) for a in adapters}
    path = os.path.join(root, "ckpt")
    save_adapter_dist_checkpoint(peft, path)
    errors = {}
    try:
        save_adapter_dist_checkpoint(peft, path)
    except ValueError as exc:
        errors["not-empty"] = str(exc)
    destroy_parallel()

    checked = []
    for name, layout in (("tp1", {}), ("tp2-pp2-vpp2", dict(tp=2, pp=2, vpp=2))):
        peft = _adapted(U.build(full, **layout), extra)
        before = U.gathered(peft, "default")
        load_adapter_dist_checkpoint(peft, path)
        for adapter in adapters:
            got = U.gathered(peft, adapter)
            assert got.keys() == saved[adapter].keys(), (name, sorted(got.keys() ^ saved[adapter].keys())[:4])
            for key in got:
                assert torch.equal(got[key], saved[adapter][key]), f"{name}: {adapter} {key} differs after reload"
        assert any(not torch.equal(before[k], saved["default"][k]) for k in before), "the load changed nothing"
        checked.append(name)
        destroy_parallel()
    if embedding:
        return checked, {}

    import megalora

    peft = megalora.get_peft_model(U.build(full, tp=2, pp=2), U.lora_config(r=8))
    try:
        load_adapter_dist_checkpoint(peft, path)
    except ValueError as exc:
        errors["r"] = str(exc)
    try:
        load_adapter_dist_checkpoint(peft, os.path.join(root, "nowhere"))
    except ValueError as exc:
        errors["no-checkpoint"] = str(exc)
    return checked, errors


def test_lora_sharded_state_dict_keys(dist2):
    entries = dist2(_sharded_keys_body)[0]
    # The base layer's entries keep its own names, as dict keys and checkpoint keys
    # (Megatron-LM's LanguageModule looks them up by name).
    assert entries["weight"] == "decoder.layers.mlp.linear_fc1.weight"
    assert not any(k.startswith("base_layer.") for k in entries), sorted(entries)
    assert entries["lora_B.default.weight"] == "decoder.layers.mlp.linear_fc1.lora_B.default.weight"
    assert "lora_magnitude_vector.dora.weight" in entries and "lora_A.dora.weight" in entries


def test_adapter_dist_checkpoint_reshards(dist4, tmp_path):
    results = dist4(_round_trip_body, str(tmp_path), timeout_s=600)
    checked, errors = results[0]
    assert checked == ["tp1", "tp2-pp2-vpp2"]
    assert all(r[1] == errors for r in results), "the ranks raised different errors"
    assert "is not empty" in errors["not-empty"]
    assert "shape mismatch" in errors["r"] and "another r" in errors["r"]
    assert "cannot read the distributed checkpoint" in errors["no-checkpoint"]


def test_embedding_lora_dist_checkpoint_reshards(dist4, tmp_path):
    assert dist4(_round_trip_body, str(tmp_path), True, timeout_s=600)[0][0] == ["tp1", "tp2-pp2-vpp2"]
