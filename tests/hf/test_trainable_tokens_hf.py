"""Trainable tokens through the HF bridge on a tied Llama (SmolLM2's architecture), against HF PEFT.

One launch, two layouts (TP=2, PP=2). At each: an HF PEFT adapter with
trainable tokens (and LoRA) made on the HF model imports and gives PEFT's
logits, and exports back to files PEFT reads with the same logits; a megalora
adapter with trainable tokens exports to PEFT (same logits), and its merged
HF model (token rows written into ``embed_tokens``) gives them too.
"""

from __future__ import annotations

import os

import torch

from tests import hf_utils as U

TOL = 2e-5  # as the bridge's own tests: tiny fp32 models stay ~1e-6 from transformers
IDS = [0, 5, 47, 48, 90, 95]  # both halves of the 96-token vocabulary (TP=2 splits at 48)
KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def _hf():
    """Tied, with 2 query groups so that TP=2 fits."""
    return U.tiny_hf("llama", True, num_key_value_heads=2)


def _perturb_tokens(peft_model, seed: int = 5) -> None:
    """The same random offset on the full token rows at every layout, sliced by each layer's own spec."""
    from megalora.layers.trainable_tokens import TrainableTokensLayer

    for chunk in peft_model:
        for layer in chunk.modules():
            if isinstance(layer, TrainableTokensLayer):
                for entry in layer.tensors("default"):
                    full = torch.randn(entry.spec.full_shape(entry.param.shape, layer.tp_size),
                                       generator=torch.Generator().manual_seed(seed)) * 0.5
                    with torch.no_grad():
                        entry.param.add_(entry.spec.local(full, layer.tp_rank, layer.tp_size))


def _perturb_copies(peft_model, seed: int = 6) -> None:
    """The same random offset on every full ``modules_to_save`` weight at every layout."""
    from megalora.layers.modules_to_save import ModulesToSaveWrapper

    for chunk in peft_model:
        for wrapper in chunk.modules():
            if isinstance(wrapper, ModulesToSaveWrapper):
                for entry in wrapper.tensors("default"):
                    world, rank = entry.group.size(), entry.group.rank()
                    size = entry.spec.full_shape(entry.param.shape, world)
                    full = torch.randn(size, generator=torch.Generator().manual_seed(seed)) * 0.2
                    with torch.no_grad():
                        entry.param.add_(entry.spec.local(full, rank, world))


def _body(root: str):
    import peft
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import megalora
    import megalora.hf as H
    from megalora.parallel_start import destroy_parallel

    toks = U.tokens()
    toks[:, :len(IDS)] = torch.tensor(IDS)
    rank = dist.get_rank()
    hf_peft = peft.get_peft_model(_hf(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False,
        trainable_token_indices=IDS))
    with torch.no_grad():
        for name, param in hf_peft.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(7)) * 0.5)
    peft_dir = os.path.join(root, f"peft{rank}")
    hf_peft.eval().save_pretrained(peft_dir)
    import_ref = U.hf_logits(hf_peft, toks)
    assert list(load_file(os.path.join(peft_dir, "adapter_model.safetensors"))).count(KEY) == 1
    diffs = {}
    for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
        megalora.init_parallel(tp, pp)
        hf = _hf()
        ref = U.hf_logits(hf, toks)
        imported = H.import_peft_adapter(H.build_gpt_from_hf(hf).eval(), peft_dir).eval()
        got = U.mcore_logits(imported, toks, 48)
        back_dir = os.path.join(root, name, "back")
        H.export_peft_adapter(imported, back_dir)
        # megalora's own adapter, tokens tied through the dict form.
        config = megalora.LoraConfig(r=4, lora_alpha=8, target_modules=["linear_fc2"], init_lora_weights=False,
                                     trainable_token_indices={"embedding": IDS, "output_layer": IDS})
        own = megalora.get_peft_model(imported.unload(), config).eval()
        _perturb_tokens(own)
        U.perturb_lora(own)
        mine = U.mcore_logits(own, toks, 48)
        own_dir, merged_dir = os.path.join(root, name, "own"), os.path.join(root, name, "merged")
        H.export_peft_adapter(own, own_dir)
        H.save_hf_pretrained(own, merged_dir)
        dist.barrier()
        back_ref = U.hf_logits(peft.PeftModel.from_pretrained(_hf(), back_dir).eval(), toks)
        own_ref = U.hf_logits(peft.PeftModel.from_pretrained(_hf(), own_dir).eval(), toks)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager").eval()
        merged_ref = U.hf_logits(merged, toks)
        if got is not None:
            diffs[name] = dict(import_vs_peft=U.max_diff(got, import_ref), export_vs_peft=U.max_diff(back_ref, got),
                               own_vs_peft=U.max_diff(own_ref, mine), merged_vs_own=U.max_diff(merged_ref, mine),
                               tokens_change_logits=U.max_diff(mine, ref))
        # An untied modules_to_save copy of the tied output layer: kept by merge_and_unload and the HF export.
        mts = megalora.get_peft_model(own.unload(), megalora.LoraConfig(
            r=2, target_modules=["linear_fc2"], modules_to_save=["output_layer"])).eval()
        _perturb_copies(mts)
        mts_logits = U.mcore_logits(mts, toks, 48)
        mts_dir = os.path.join(root, name, "mts_merged")
        H.save_hf_pretrained(mts, mts_dir)
        unloaded = U.mcore_logits(mts.merge_and_unload(), toks, 48)
        dist.barrier()
        mts_hf = AutoModelForCausalLM.from_pretrained(mts_dir, attn_implementation="eager").eval()
        assert not mts_hf.config.tie_word_embeddings
        if got is not None:
            diffs[name].update(mts_merge_and_unload=U.max_diff(unloaded, mts_logits),
                               mts_hf_export=U.max_diff(U.hf_logits(mts_hf, toks), mts_logits),
                               mts_changes_logits=U.max_diff(mts_logits, ref))
        files = [load_file(os.path.join(d, "adapter_model.safetensors")) for d in (peft_dir, back_dir)]
        assert torch.equal(files[0][KEY], files[1][KEY]), "the token rows changed on the way through megalora"
        assert sorted(load_file(os.path.join(own_dir, "adapter_model.safetensors"))).count(KEY) == 1
        destroy_parallel()
    return diffs


def test_trainable_tokens_hf_peft_interop(dist2, tmp_path):
    per_rank = dist2(_body, str(tmp_path), timeout_s=600)
    for diffs in per_rank:
        for layout, checks in diffs.items():
            assert checks.pop("tokens_change_logits") > 1e-2, f"{layout}: the token rows have no effect"
            assert checks.pop("mts_changes_logits") > 1e-2, f"{layout}: the output-layer copy has no effect"
            for check, value in checks.items():
                assert value <= TOL, f"{layout}: {check} = {value}"
    assert any(per_rank), "no rank held the last stage"
