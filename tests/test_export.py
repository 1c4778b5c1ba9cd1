"""Merged export and merge_and_unload under TP/PP/VPP, against TP=1.

One body on 2 ranks builds the same model (reference weights, the same two
adapters moved off their init) at TP=1, TP=2 and PP=2 x VPP=2, and at each:

* ``export_merged`` writes files that are byte-identical to TP=1's;
* at TP=1 the export equals what ``merge_and_unload`` puts in the model;
* ``merge_and_unload`` gathers no base weight (no all-gather, no p2p), its
  logits equal the unmerged adapters', and its gathered weights equal the
  exported ones.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from tests import io_utils as U

SAVED = dict(modules_to_save=["output_layer"])
# DoRA after a plain adapter: its norm must use the weight before both. lora_bias stays
# off DoRA's layers: there, PEFT's forward scales a previous adapter's bias by m/‖W‖ too.
EXTRA = {
    "dora": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["linear_fc1", "linear_proj"]),
    "bias": dict(r=2, lora_alpha=2, lora_bias=True, target_modules=["linear_qkv", "linear_fc2"]),
    # QALoRA's ΔW expanded over its input groups (fc2 is row-parallel: pooled shards);
    # embedding LoRA merged into the vocab-split table (small alpha: init False is N(0, 1)).
    "qalora": dict(r=2, lora_alpha=4, use_qalora=True, qalora_group_size=16, target_modules=["linear_qkv", "linear_fc2"]),
    "emb": dict(r=2, lora_alpha=0.1, target_modules=["word_embeddings"]),
}
ADAPTERS = ["default", "dora", "bias", "qalora", "emb"]
# The tiny GPT has 4 heads, so TP=2 stands for TP=3 here (the HF test below runs TP=3).
LAYOUTS = {"tp1": {}, "tp2": dict(tp=2), "pp2": dict(pp=2), "pp2-vpp2": dict(pp=2, vpp=2)}
SHARD = 60_000  # bytes: several shards for a 4-layer hidden-64 model


def _files(directory: str) -> dict:
    return {n: hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(directory))}


def _read_export(directory: str) -> dict:
    from safetensors.torch import load_file

    if not os.path.exists(os.path.join(directory, "model.safetensors.index.json")):
        return load_file(os.path.join(directory, "model.safetensors"))
    index = json.load(open(os.path.join(directory, "model.safetensors.index.json")))
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(load_file(os.path.join(directory, name)))
    assert set(out) == set(index["weight_map"]), "index and shards disagree"
    return out


def _full_weights(chunks) -> dict:
    """Collective: the plain (merged) model's full weights by global name, on every rank."""
    from megalora.parallel_groups import is_stage_writer, model_tp_group
    from megalora.sharding import gather_full, param_shard_spec
    from megalora.targeting import global_module_names

    local = {}
    for chunk in chunks:
        names = global_module_names(chunk)
        for mname, module in chunk.named_modules():
            gated = mname.endswith("linear_fc1")
            for pname, param in module.named_parameters(recurse=False):
                full = gather_full(param.detach(), param_shard_spec(param, 2 if gated else 1), model_tp_group())
                if is_stage_writer():
                    local[f"{names[mname]}.{pname}" if names[mname] else pname] = full.clone()
    return U.everywhere(local)


def _adapted(model):
    import megalora

    peft = megalora.get_peft_model(model, U.lora_config(**SAVED))
    for name, config in EXTRA.items():
        peft.add_adapter(name, U.lora_config(**config))
    for adapter in ADAPTERS:
        U.perturb(peft, adapter)
    return peft


def _export_body(root: str):
    import megalora
    from megalora.testing.collective_counter import count_collectives
    from megalora.parallel_start import destroy_parallel

    full = U.reference_weights()
    out = {}
    for name, layout in LAYOUTS.items():
        peft = _adapted(U.build(full, **layout))
        target = os.path.join(root, name)
        summary = megalora.export_merged(peft, target, adapter_names=ADAPTERS, max_shard_size=SHARD,
                                         progressbar=False)
        exported = _read_export(target)
        # Without DoRA too: the plain adapter alone.
        megalora.export_merged(peft, f"{target}-plain", adapter_names=["default"], progressbar=False)
        peft.set_adapter(ADAPTERS)
        unmerged = U.pipeline_logits(peft.get_base_model())
        with count_collectives() as log:
            plain = peft.merge_and_unload(adapter_names=ADAPTERS)
        chunks = plain if isinstance(plain, list) else [plain]
        merged = _full_weights(chunks)
        assert merged.keys() == exported.keys(), sorted(merged.keys() ^ exported.keys())[:4]
        exact = all(torch.equal(merged[k], exported[k]) for k in merged)
        for key in merged:
            U.assert_close(exported[key], merged[key], 1e-6, f"{name}: exported vs merge_and_unload {key}")
        U.assert_close(unmerged, U.pipeline_logits(chunks), 1e-5, f"{name}: merged vs unmerged logits")
        out[name] = dict(files=_files(target), plain=_files(f"{target}-plain"), exact=exact, calls=dict(log.calls), summary=summary)
        destroy_parallel()
    # A second export with one shard replaces the earlier shards.
    peft = _adapted(U.build(full))
    megalora.export_merged(peft, os.path.join(root, "tp1"), adapter_names=ADAPTERS, progressbar=False)
    out["reexport"] = sorted(os.listdir(os.path.join(root, "tp1")))
    destroy_parallel()
    return out


def test_export_is_layout_independent_and_merge_is_local(dist2, tmp_path):
    results = dist2(_export_body, str(tmp_path), timeout_s=600)
    out = results[0]
    ref = out["tp1"]["files"]
    assert len(ref) > 3 and "model.safetensors.index.json" in ref
    for name in LAYOUTS:
        assert out[name]["files"] == ref, f"export at {name} differs from TP=1's byte for byte"
        assert out[name]["plain"] == out["tp1"]["plain"], f"plain export at {name} differs from TP=1's"
        calls = out[name]["calls"]
        moved = {k: v for k, v in calls.items() if "gather" in k or k in ("send", "recv", "isend", "irecv",
                                                                            "broadcast", "batch_isend_irecv")}
        assert not moved, f"{name}: merge_and_unload moved weights: {calls}"
    assert out["tp1"]["summary"]["num_tensors"] > 0 and results[1] is not None
    assert out["reexport"] == ["model.safetensors"], "one file, as transformers writes it; no stale shards"


def _content_body(root: str):
    """The export at TP=2 of one plain LoRA adapter, the reference weights, and the adapter itself."""
    import megalora
    from megalora.parallel_start import destroy_parallel

    full = U.reference_weights()
    peft = megalora.get_peft_model(U.build(full, tp=2), U.lora_config())
    U.perturb(peft, "default")
    megalora.export_merged(peft, os.path.join(root, "export"), max_shard_size=SHARD, progressbar=False)
    adapter = U.gathered(peft)
    destroy_parallel()
    return _read_export(os.path.join(root, "export")), full, adapter


def test_export_holds_the_canonical_merged_weights(dist2, tmp_path):
    exported, full, adapter = dist2(_content_body, str(tmp_path), timeout_s=600)[0]
    assert set(exported) == set(full), "keys must be megatron global names, one per parameter"
    index = json.load(open(tmp_path / "export" / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in full.values())
    scaling = 8 / 4
    for key in full:
        module = key.rsplit(".", 1)[0]
        a = adapter.get(f"base_model.model.{module}.lora_A.weight")
        if a is None or not key.endswith(".weight"):
            assert torch.equal(exported[key], full[key]), f"{key} has no adapter but changed"
            continue
        b = adapter[f"base_model.model.{module}.lora_B.weight"]
        # Gated fc1 included: the export is the canonical [gate; up] layout the adapter file uses.
        U.assert_close(exported[key], full[key] + scaling * b @ a, 1e-6, key)


def _tied_body(root: str):
    """Tied embeddings: PP=2's last stage holds a copy of the word embeddings, exported once."""
    import megalora
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from megalora.parallel_start import destroy_parallel
    from tests import gpt_utils as G

    full, out = None, {}
    for name, pp in (("pp1", 1), ("pp2", 2)):
        megalora.init_parallel(pipeline_model_parallel_size=pp, seed=1234)
        config = G.gpt_config(pp=pp, num_layers=2)
        model = GPTModel(config, G.layer_spec(config), vocab_size=G.VOCAB, max_sequence_length=G.SEQ,
                         pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                         share_embeddings_and_output_weights=True)
        if full is None:
            full = {k: v.detach().clone() for k, v in model.named_parameters()}
        with torch.no_grad():
            for pname, param in model.named_parameters():
                key = "embedding.word_embeddings.weight" if pname == "output_layer.weight" else pname
                param.copy_(full[G.global_param_name(model, key)])
        peft = megalora.get_peft_model(model, U.lora_config(target_modules=["linear_fc1"]))
        U.perturb(peft, "default")
        megalora.export_merged(peft, os.path.join(root, name), progressbar=False)
        out[name] = _files(os.path.join(root, name))
        destroy_parallel()
    return out, sorted(_read_export(os.path.join(root, "pp2")))


def test_tied_embeddings_are_exported_once(dist2, tmp_path):
    files, keys = dist2(_tied_body, str(tmp_path), timeout_s=600)[0]
    assert files["pp2"] == files["pp1"]
    assert "embedding.word_embeddings.weight" in keys and "output_layer.weight" not in keys


# ---------------------------------------------------------------------- HF format

# (tied, megalora LoRA fields): DoRA on every linear layer (row-parallel ones
# included) of a tied GQA Llama, and a plain adapter on an untied one.
HF_VARIANTS = {
    "tied-dora": (True, dict(r=4, lora_alpha=8, use_dora=True)),
    "untied-plain": (False, dict(r=4, lora_alpha=8)),
}
HF_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _hf_body(root: str, layouts: dict):
    """``save_hf_pretrained`` of each variant at each layout; file hashes, and logits at TP=1."""
    import megalora
    import megalora.hf as H
    from megalora.parallel_start import destroy_parallel
    from tests import hf_utils as HU

    out = {}
    for layout, (tp, pp, vpp) in layouts.items():
        for name, (tied, fields) in HF_VARIANTS.items():
            megalora.init_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp)
            hf = HU.tiny_hf("llama", tied)
            model = H.build_gpt_from_hf(hf) if vpp is None else [H.build_gpt_from_hf(hf, vp_stage=i)
                                                                  for i in range(vpp)]
            peft = megalora.get_peft_model(
                model, megalora.LoraConfig(target_modules=HF_TARGETS, init_lora_weights=False, **fields))
            U.perturb(peft, "default")  # layout-invariant bits, DoRA magnitudes included
            target = os.path.join(root, f"{layout}-{name}")
            H.save_hf_pretrained(peft, target, max_shard_size=SHARD)
            out[f"{layout}-{name}"] = _files(target)
            if (tp, pp) == (1, 1):
                from transformers import AutoModelForCausalLM

                toks = HU.tokens()
                ours = HU.mcore_logits(peft.get_base_model().eval(), toks, hf.config.hidden_size)
                loaded = AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager").eval()
                out[f"logits-{name}"] = HU.max_diff(HU.hf_logits(loaded, toks), ours)
            destroy_parallel()
    return out


def test_hf_export_is_byte_identical_across_layouts(ranks, tmp_path):
    """HF names through the bridge's converter: TP=1 (DP=3), TP=3, PP=2, PP=2 x VPP=2 write the same bytes."""
    out = ranks(3, _hf_body, str(tmp_path), {"tp1": (1, 1, None), "tp3": (3, 1, None)}, timeout_s=600)[0]
    out.update(ranks(2, _hf_body, str(tmp_path), {"pp2": (1, 2, None), "pp2-vpp2": (1, 2, 2)}, timeout_s=600)[0])
    for name, (tied, _) in HF_VARIANTS.items():
        ref = out[f"tp1-{name}"]
        assert "model.safetensors.index.json" in ref and "config.json" in ref, ref
        for layout in ("tp3", "pp2", "pp2-vpp2"):
            assert out[f"{layout}-{name}"] == ref, f"{name}: the HF export at {layout} differs from TP=1's"
        # fp32 models: transformers' eager forward vs megatron's, on the same merged weights (~1e-6).
        assert out[f"logits-{name}"] <= 2e-5, (name, out[f"logits-{name}"])
