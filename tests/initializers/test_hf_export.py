"""A PiSSA adapter trained on megatron-core exports to HF PEFT for the *original* HF model (TP=3).

megalora's SVD runs on the fused ``linear_qkv`` / ``linear_fc1`` weights, PEFT's
would run per projection, so the exported adapter cannot say
``init_lora_weights="pissa"``: it is PEFT's converted adapter ``[A; A0]``,
``[B, -B0]`` at rank 2r, built from the initial factors kept in memory. HF PEFT
on the unmodified HF model must then give the trained megalora model's logits,
and so must the merged HF export. LoftQ's adapter belongs to its quantized base
and is refused.
"""

from __future__ import annotations

import os

import pytest

from tests import hf_utils as U

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _body(tmp):
    import megalora
    import megalora.hf as H

    megalora.init_parallel(tensor_model_parallel_size=3, seed=0)
    toks = U.tokens()
    model = H.build_gpt_from_hf(U.tiny_hf("llama")).eval()
    out = {"base": U.mcore_logits(model, toks, 48)}
    peft_model = megalora.get_peft_model(
        model, megalora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"))
    out["init"] = U.mcore_logits(peft_model, toks, 48)
    U.perturb_lora(peft_model)  # stands for training
    out["trained"] = U.mcore_logits(peft_model, toks, 48)
    H.export_peft_adapter(peft_model, os.path.join(tmp, "adapter"))
    H.save_hf_pretrained(peft_model, os.path.join(tmp, "merged"))
    peft_model.add_adapter("q", megalora.LoraConfig(r=2, target_modules=["linear_proj"], init_lora_weights="loftq",
                                                    loftq_config={"loftq_bits": 4}))
    try:
        H.export_peft_adapter(peft_model, os.path.join(tmp, "loftq"), adapter_name="q")
    except ValueError as exc:
        out["loftq_error"] = str(exc)
    return out


def test_pissa_adapter_exports_for_the_original_hf_model(ranks, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    got = ranks(3, _body, str(tmp_path))[0]
    assert U.max_diff(got["init"], got["base"]) < 1e-4
    assert U.max_diff(got["trained"], got["base"]) > 1e-2, "the perturbation changes the model"
    hf = peft.PeftModel.from_pretrained(U.tiny_hf("llama"), str(tmp_path / "adapter")).eval()
    assert hf.peft_config["default"].r == 8 and hf.peft_config["default"].init_lora_weights is True
    # fp32 logits of ~1 through 4 layers: differences are rounding (~1e-6); 1e-4 leaves room, a wrong base is ~1e-1.
    assert U.max_diff(U.hf_logits(hf, U.tokens()), got["trained"]) < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager").eval()
    assert U.max_diff(U.hf_logits(merged, U.tokens()), got["trained"]) < 1e-4
    assert "LoftQ" in got["loftq_error"] and "export the merged model" in got["loftq_error"]
