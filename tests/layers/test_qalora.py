"""QALoRA (``use_qalora``) on plain layers against PEFT's ``QALoraLinearVariant`` math.

PEFT applies QALoRA only to GPTQ layers and silently ignores ``use_qalora`` on
``nn.Linear``; the oracle here puts PEFT's own variant object on PEFT's
``nn.Linear`` LoRA layers, so outputs and gradients are PEFT's code. Merging
goes beyond PEFT (which cannot merge QALoRA): it must reproduce the unmerged
forward. The TP oracle is in ``test_qalora_tp.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.peft_oracle import (
    LINEAR_TARGETS, assert_close, base_model, copy_adapters, lora_layers, make_input, megalora, peft, perturb, run,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

QA = dict(target_modules=LINEAR_TARGETS, r=4, lora_alpha=8, use_qalora=True, qalora_group_size=4)


def _peft_qalora(kw):
    """PEFT's model with PEFT's QALoRA variant forced onto its ``nn.Linear`` LoRA layers."""
    from peft.tuners.lora.variants import QALoraLinearVariant

    config = peft.LoraConfig(**kw)
    model = peft.get_peft_model(base_model("net"), config)
    for layer in lora_layers(model).values():
        QALoraLinearVariant.init(layer, "default", config)
        layer.lora_variant["default"] = QALoraLinearVariant()
    return model


def _pair(seed=0, **extra):
    kw = {**QA, **extra}
    p = _peft_qalora(kw)
    m = megalora.get_peft_model(base_model("net"), megalora.LoraConfig(**kw))
    perturb(m, seed)
    copy_adapters(m, p)
    return p, m


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout"])
def test_outputs_and_gradients_match_peft(train):
    p, m = _pair(lora_dropout=0.3 if train else 0.0)
    shapes = {n: tuple(l.lora_A["default"].weight.shape) for n, l in m.base_model.lora_layers()}
    # A is [r, in / group_size]: fc2 has 16 inputs, the others 8.
    assert shapes["layers.0.fc2"] == (4, 4) and shapes["layers.0.q"] == (4, 2)
    x = make_input("net")
    for model in (p, m):
        model.train(train)
    out_p, out_m = run(p, x), run(m, x)
    assert_close(out_m, out_p, "QALoRA output")
    out_p.square().mean().backward()
    out_m.square().mean().backward()
    gp, gm = _lora_grads(p), _lora_grads(m)
    assert gp.keys() == gm.keys()
    for key in gp:
        assert_close(gm[key], gp[key], f"gradient of {key}")


def test_lora_changes_the_output():
    """Guards the oracle itself: with the adapters disabled the outputs differ."""
    _, m = _pair()
    x = make_input("net")
    with m.disable_adapter():
        base = run(m, x)
    assert (run(m, x) - base).abs().max() > 1e-3


def test_merge_is_exact_and_unmerge_restores():
    _, m = _pair()
    m.eval()
    x = make_input("net")
    with torch.no_grad():
        unmerged = run(m, x)
        bases = {n: l.get_base_layer().weight.clone() for n, l in m.base_model.lora_layers()}
        m.merge_adapter()
        # float32 rounding of a sum over 8-16 inputs: a few ulps of outputs of size ~1.
        assert_close(run(m, x), unmerged, "merged vs unmerged", atol=1e-5)
        for name, layer in m.base_model.lora_layers():
            delta = layer.get_delta_weight("default")
            # ΔW is constant within each group of 4 inputs: a quantized base stays group-structured.
            grouped = delta.view(delta.shape[0], -1, 4)
            assert torch.equal(grouped, grouped[..., :1].expand_as(grouped)), name
            assert_close(layer.get_base_layer().weight, bases[name] + delta, f"merged {name}")
        m.unmerge_adapter()
        for name, layer in m.base_model.lora_layers():
            assert_close(layer.get_base_layer().weight, bases[name], f"unmerged {name}")
        merged_model = m.merge_and_unload()
        assert_close(run(merged_model, x), unmerged, "merge_and_unload", atol=1e-5)


def test_files_store_pooled_a_and_config(tmp_path):
    p, m = _pair()
    m.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.layers.0.fc2.lora_A.weight"].shape == (4, 4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_qalora"] is True and config["qalora_group_size"] == 4
    # PEFT's own save of its QALoRA layers writes the same keys and shapes.
    p.save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert theirs.keys() == tensors.keys()
    for key in theirs:
        assert torch.equal(theirs[key], tensors[key]), key
    loaded = megalora.PeftModel.from_pretrained(base_model("net"), str(tmp_path))
    x = make_input("net")
    assert_close(run(loaded, x), run(m, x), "reloaded adapter")


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match=r"qalora_group_size=3 does not divide in_features=8"):
        megalora.get_peft_model(base_model("net"), megalora.LoraConfig(**{**QA, "qalora_group_size": 3}))


def test_cli_config_checks_groups_in_the_parent():
    """``megalora train`` refuses groups that straddle TP shards before any rank starts."""
    from megalora.training.config import from_dict

    lora = {"r": 4, "target_modules": "all-linear", "use_qalora": True, "qalora_group_size": 32}
    model = {"hidden_size": 64, "ffn_hidden_size": 96}
    from_dict({"model": model, "parallel": {"tp": 1}, "lora": lora})  # 96 / 1 is a multiple of 32
    with pytest.raises(ValueError, match=r"lora.qalora_group_size: 32 does not divide linear_fc2's input shard "
                                         r"96/parallel.tp=2; use parallel.tp in \[1, 3\]"):
        from_dict({"model": model, "parallel": {"tp": 2}, "lora": lora})
    # Not targeted: not checked.
    from_dict({"model": model, "parallel": {"tp": 2}, "lora": {**lora, "target_modules": ["linear_qkv"]}})


def _te_refusal_body():
    import megalora
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megalora.layers.te import LoraColumnCallingBase

    megalora.init_parallel(seed=7)
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True,
                               gradient_accumulation_fusion=False)
    base = ColumnParallelLinear(16, 32, config=config, init_method=torch.nn.init.normal_, bias=False)
    layer = LoraColumnCallingBase(base, global_name="fc1")
    try:
        layer.update_layer("default", megalora.LoraConfig(r=2, use_qalora=True, qalora_group_size=4))
    except NotImplementedError as exc:
        return str(exc)
    return None


def test_layers_with_their_own_lora_path_refuse_qalora(ranks):
    """Transformer Engine's layers run LoRA outside the variant forward: refused, never ignored (PEFT ignores it)."""
    error = ranks(1, _te_refusal_body)[0]
    assert error is not None and error.startswith("use_qalora=True is not supported on fc1"), error


def test_add_weighted_adapter_refuses_qalora():
    _, m = _pair()
    with pytest.raises(ValueError, match="add_weighted_adapter does not support use_qalora=True"):
        m.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")


@pytest.mark.parametrize("other", ["use_dora", "lora_bias"])
def test_combinations_peft_would_ignore_are_refused(other):
    """PEFT's config accepts them (so the config still round-trips), but its QALoRA forward drops them."""
    config = megalora.LoraConfig(**{**QA, other: True})
    with pytest.raises(ValueError, match=rf"use_qalora=True cannot be combined with {other}=True"):
        megalora.get_peft_model(base_model("net"), config)
