"""A CorDA adapter trained on megatron-core (PP=2) exports to HF PEFT for the *original* HF model.

CorDA rewrites the base to ``W_res``, so, as for PiSSA (tests/initializers/test_hf_export.py),
the HF export writes PEFT's converted adapter ``[A; A0]``, ``[B, -B0]`` at rank 2r from the
initial factors kept in memory: HF PEFT on the unmodified HF model must give the trained
megalora model's logits.
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

    megalora.init_parallel(pipeline_model_parallel_size=2, seed=0)
    toks = U.tokens()
    model = H.build_gpt_from_hf(U.tiny_hf("llama")).eval()
    out = {"base": U.mcore_logits(model, toks, 48)}
    config = megalora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda")
    megalora.preprocess_corda(model, config, run_model=lambda: [U.mcore_logits(model, U.tokens(s), 48)
                                                                for s in (5, 6)])
    peft_model = megalora.get_peft_model(model, config)
    out["init"] = U.mcore_logits(peft_model, toks, 48)
    U.perturb_lora(peft_model)  # stands for training
    out["trained"] = U.mcore_logits(peft_model, toks, 48)
    H.export_peft_adapter(peft_model, os.path.join(tmp, "adapter"))
    return out


def test_corda_adapter_exports_for_the_original_hf_model(dist2, tmp_path):
    import peft

    got = dist2(_body, str(tmp_path))[1]  # the last stage holds the logits
    assert U.max_diff(got["init"], got["base"]) < 1e-4
    assert U.max_diff(got["trained"], got["base"]) > 1e-2, "the perturbation changes the model"
    hf = peft.PeftModel.from_pretrained(U.tiny_hf("llama"), str(tmp_path / "adapter")).eval()
    assert hf.peft_config["default"].r == 8 and hf.peft_config["default"].init_lora_weights is True
    # fp32 logits of ~1 through 4 layers: differences are rounding (~1e-6); a residual base would be ~1e-1 off.
    assert U.max_diff(U.hf_logits(hf, U.tokens()), got["trained"]) < 1e-4
