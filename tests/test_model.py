"""Tests of megalora.model's ``get_peft_model`` arguments: unknown keywords rejected, the explicit init seed."""

from __future__ import annotations

import pytest
import torch

from tests.peft_oracle import LINEAR_TARGETS, base_model, make_input, megalora, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _lin(**overrides):
    kwargs = dict(target_modules=LINEAR_TARGETS, r=4, lora_alpha=8, init_lora_weights=False)
    kwargs.update(overrides)
    return megalora.LoraConfig(**kwargs)


def _adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_unknown_keywords_raise_and_peft_ones_are_accepted(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'adpater_name'"):
        megalora.get_peft_model(base_model("net"), _lin(), adpater_name="x")
    with pytest.raises(ValueError, match="mixed"):
        megalora.get_peft_model(base_model("net"), _lin(), mixed=True)
    model = megalora.get_peft_model(base_model("net"), _lin(), autocast_adapter_dtype=False, low_cpu_mem_usage=False,
                                    revision=None)
    with pytest.raises(TypeError, match="'safe_serialisation'"):
        model.save_pretrained(tmp_path / "a", safe_serialisation=True)
    model.save_pretrained(tmp_path / "a", is_main_process=True)
    with pytest.raises(TypeError, match="'is_trainabel'"):
        megalora.PeftModel.from_pretrained(base_model("net"), str(tmp_path / "a"), is_trainabel=True)
    loaded = megalora.PeftModel.from_pretrained(base_model("net"), str(tmp_path / "a"), autocast_adapter_dtype=True)
    with pytest.raises(TypeError, match="'adapter'"):
        loaded.load_adapter(str(tmp_path / "a"), adapter="b")
    with pytest.raises(ValueError, match="key_mapping"):
        loaded.load_adapter(str(tmp_path / "a"), "b", key_mapping={"a": "b"})
    assert "b" not in loaded.peft_config
    loaded.load_adapter(str(tmp_path / "a"), "b", torch_device="cpu")


def test_explicit_seed_decides_the_init():
    a = _adapter_params(megalora.get_peft_model(base_model("net"), _lin(), seed=5))
    b = _adapter_params(megalora.get_peft_model(base_model("net"), _lin(), seed=5))
    c = _adapter_params(megalora.get_peft_model(base_model("net"), _lin(), seed=6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


def test_default_seed_is_the_recorded_one():
    from megalora import lora_seed

    default = _adapter_params(megalora.get_peft_model(base_model("net"), _lin()))
    explicit = _adapter_params(megalora.get_peft_model(base_model("net"), _lin(), seed=lora_seed.lora_init_seed()))
    assert all(torch.equal(default[k], explicit[k]) for k in default)
    inp = make_input("net")
    assert run(megalora.get_peft_model(base_model("net"), _lin(), seed=3), inp).shape == (3, 4, 5)
