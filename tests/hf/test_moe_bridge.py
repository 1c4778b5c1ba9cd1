"""The HF bridge on tiny random MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE): logits and PEFT interop.

Each rank builds the same tiny HF model from a seed; transformers (and HF
PEFT, ``target_parameters`` on the experts' 3-D ``gate_up_proj`` /
``down_proj``) computes the reference on every rank, and the megatron-core MoE
GPT at the layout under test (EP=1, EP=2, TP2 with SP) must match it:

* base logits; HF → megatron → HF weights bit-identical (experts restacked into 3-D);
* a megalora adapter on attention, routed experts (and Qwen2-MoE's shared
  expert) with random factors, exported to HF PEFT: PEFT's logits equal megalora's;
  saved merged as an HF model, transformers gives megalora's logits;
* a PEFT adapter made on HF (``target_parameters`` on the experts, plus
  q/v projections) imported: megalora gives PEFT's logits; exported back,
  PEFT's logits again.
"""

from __future__ import annotations

import os

import torch

from tests import hf_utils as U

# The issue asks for 1e-4 in fp32; these models stay ~1e-6 from transformers
# (routing is identical: random router weights leave no near-ties in top-2).
TOL = 2e-5
HIDDEN = 48


def _peft_logits(kind, directory, toks):
    import peft

    return U.hf_logits(peft.PeftModel.from_pretrained(U.tiny_hf(kind, tied=False), directory).eval(), toks)


def _hf_peft(kind):
    """A PEFT adapter made on the HF model: experts' 3-D parameters and q/v, random B."""
    import peft

    config = peft.LoraConfig(r=2, lora_alpha=6, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                             rank_pattern={"v_proj": 3})
    model = peft.get_peft_model(U.tiny_hf(kind, tied=False), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def _checks(kind, tmp, sp):
    import torch.distributed as dist

    from transformers import AutoModelForCausalLM

    import megalora
    import megalora.hf as H

    rank = dist.get_rank()
    toks = U.tokens()
    hf = U.tiny_hf(kind, tied=False)
    model = H.build_gpt_from_hf(hf, sequence_parallel=sp).eval()
    out, diffs = {"base": U.mcore_logits(model, toks, HIDDEN)}, {}
    # Every last-stage rank holds the same gathered logits: the last rank compares them with transformers'
    # and PEFT's, the others skip those references (4 ranks share 2 cores).
    compares = out["base"] is not None and rank == dist.get_world_size() - 1
    ref = U.hf_logits(hf, toks) if compares else None
    exported = H.export_hf_state_dict(model)
    if exported is not None:
        want = hf.state_dict()
        assert exported.keys() == want.keys(), sorted(exported.keys() ^ want.keys())[:4]
        diffs["export_identity"] = max(U.max_diff(exported[k], want[k]) for k in want)

    # megalora → HF PEFT: routed experts export as target_parameters.
    config = megalora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                 target_modules=["linear_qkv", "linear_fc1", "linear_fc2"],
                                 rank_pattern={"linear_qkv": 2})
    peft_model = megalora.get_peft_model(model, config)
    U.perturb_lora(peft_model)
    peft_model.eval()
    out["megalora"] = U.mcore_logits(peft_model, toks, HIDDEN)
    to_peft = os.path.join(tmp, kind, "to_peft")
    H.export_peft_adapter(peft_model, to_peft)
    peft_ref = _peft_logits(kind, to_peft, toks) if compares else None
    merged_dir = os.path.join(tmp, kind, "merged")
    H.save_hf_pretrained(peft_model, merged_dir)
    if compares:
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager", dtype=torch.float32)
        merged_ref = U.hf_logits(merged.eval(), toks)

    # HF PEFT → megalora → HF PEFT.
    base = peft_model.unload()
    hf_peft = _hf_peft(kind)
    import_ref = U.hf_logits(hf_peft, toks) if compares else None
    own = os.path.join(tmp, kind, f"from_peft_rank{rank}")
    hf_peft.save_pretrained(own)
    imported = H.import_peft_adapter(base, own).eval()
    out["imported"] = U.mcore_logits(imported, toks, HIDDEN)
    back = os.path.join(tmp, kind, "back")
    H.export_peft_adapter(imported, back)
    back_ref = _peft_logits(kind, back, toks) if compares else None

    if compares:
        diffs["base_vs_transformers"] = U.max_diff(out["base"], ref)
        diffs["megalora_vs_peft"] = U.max_diff(out["megalora"], peft_ref)
        diffs["merged_export_vs_megalora"] = U.max_diff(merged_ref, out["megalora"])
        diffs["lora_changes_logits"] = -U.max_diff(out["megalora"], ref)
        diffs["import_vs_peft"] = U.max_diff(out["imported"], import_ref)
        diffs["import_changes_logits"] = -U.max_diff(import_ref, ref)
        diffs["import_export_vs_peft"] = U.max_diff(back_ref, import_ref)
    return diffs


def _layout_body(tmp, kinds, tp=1, pp=1, ep=1):
    import megalora

    megalora.init_parallel(tp, pp, expert_model_parallel_size=ep)
    return {kind: _checks(kind, tmp, sp=tp > 1) for kind in kinds}


def _check(per_rank):
    U.check_diffs(per_rank, TOL, {"base_vs_transformers", "megalora_vs_peft", "import_vs_peft",
                                  "import_export_vs_peft", "export_identity", "merged_export_vs_megalora"})


KINDS = list(U.MOE_KINDS)


def test_moe_ep2(dist2, tmp_path):
    _check(dist2(_layout_body, str(tmp_path), KINDS, ep=2, timeout_s=600))


def test_moe_tp2_ep2(dist4, tmp_path):
    """TP2 (with sequence parallelism, which megatron's MoE needs under TP) x EP2, expert-TP 2.

    Qwen2-MoE's shared expert is TP-split; Qwen3-MoE's q/k norms run under SP.
    """
    _check(dist4(_layout_body, str(tmp_path), ["qwen2_moe", "qwen3_moe"], tp=2, ep=2, timeout_s=600))


def test_moe_pp2_ep2(dist4, tmp_path):
    _check(dist4(_layout_body, str(tmp_path), ["mixtral"], pp=2, ep=2, timeout_s=600))
