"""megalora against HF PEFT on plain layers: the PeftModel API.

Disabling adapters, save/load in both directions, training, deleting and
unloading adapters, parameter counts, ``add_adapter`` and bad configs, each
compared with what PEFT does on the same model and weights.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from tests.peft_oracle import (
    GPT2_TARGETS, LINEAR_TARGETS, assert_close, assert_states_close, base_model, base_state, build_pair,
    copy_adapters, lora_layers, make_input, megalora, module_types, peft, perturb, run, synced_pair, trainable,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LIN = dict(target_modules=LINEAR_TARGETS, r=4, lora_alpha=8)
GPT = dict(target_modules=GPT2_TARGETS, r=4, lora_alpha=8, fan_in_fan_out=True)

SETUPS = {
    "default": ("net", [("default", LIN)]),
    "dora_modules_to_save": ("net", [("default", {**LIN, "use_dora": True, "modules_to_save": ["head"]})]),
    "lora_bias": ("net", [("default", {**LIN, "target_modules": ["q", "fc1"], "lora_bias": True})]),
    "patterns_regex": ("net", [("default", {
        **LIN, "target_modules": r".*\.(q|v|fc1)", "rank_pattern": {"fc1": 2}, "alpha_pattern": {"v": 3}})]),
    "gpt2_dora": ("gpt2", [("default", {**GPT, "use_dora": True, "modules_to_save": ["ln_f"]})]),
    "gpt2_lora_bias": ("gpt2", [("default", {**GPT, "lora_bias": True, "use_rslora": True})]),
}


def _pair(setup, seed=0):
    kind, adapters = SETUPS[setup]
    p, m = synced_pair(kind, adapters, seed=seed)
    p.eval()
    m.eval()
    return kind, p, m


# ---------------------------------------------------------------------- disabling


@pytest.mark.parametrize("setup", ["default", "dora_modules_to_save", "gpt2_lora_bias"])
def test_disable_adapter_gives_base_output(setup):
    kind, p, m = _pair(setup)
    inp = make_input(kind)
    base_out, adapted = run(base_model(kind), inp), run(m, inp)
    assert not torch.allclose(adapted, base_out, atol=1e-3)
    with m.disable_adapter():
        assert_close(run(m, inp), base_out, "inside disable_adapter()")
    with p.disable_adapter():
        assert_close(run(p, inp), base_out, "peft inside disable_adapter()")
    assert_close(run(m, inp), adapted, "after disable_adapter()")

    m.disable_adapter_layers()
    p.base_model.disable_adapter_layers()
    assert_close(run(m, inp), base_out, "disable_adapter_layers")
    m.enable_adapter_layers()
    p.base_model.enable_adapter_layers()
    assert_close(run(m, inp), adapted, "enable_adapter_layers")
    assert_close(run(p, inp), adapted, "peft enable_adapter_layers")

    # Disabling merged adapters unmerges them first, as PEFT does.
    m.merge_adapter()
    p.merge_adapter()
    with m.disable_adapter():
        assert_close(run(m, inp), base_out, "disable_adapter() while merged")
    with p.disable_adapter():
        assert_close(run(p, inp), base_out, "peft disable_adapter() while merged")
    assert_states_close(base_state(m), base_state(p), "base weights after disabling merged adapters")
    assert_close(run(m, inp), adapted, "re-enabled after merged")


# ---------------------------------------------------------------------- save / load


def _files(directory) -> dict[str, set[str]]:
    """Relative path of each adapter file -> its tensor keys (or config keys)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(root, name), framework="pt") as handle:
                    out[rel] = set(handle.keys())
            elif name == "adapter_config.json":
                out[rel] = set()
    return out


def _config(path) -> dict:
    with open(os.path.join(path, "adapter_config.json")) as handle:
        cfg = json.load(handle)
    if isinstance(cfg["target_modules"], list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return cfg


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_save_load_both_directions(setup, tmp_path):
    kind, p, m = _pair(setup)
    inp = make_input(kind)
    expected = run(p, inp)
    assert_close(run(m, inp), expected, "before saving")
    m.save_pretrained(tmp_path / "mega")
    p.save_pretrained(tmp_path / "peft")
    assert _files(tmp_path / "mega") == _files(tmp_path / "peft")
    assert_states_close(_tensors(tmp_path / "mega"), _tensors(tmp_path / "peft"), "saved tensors", atol=0)
    ours_cfg, their_cfg = (_config(tmp_path / d) for d in ("mega", "peft"))
    # PEFT also records its own version and, for non-transformers models, the model class (auto_mapping).
    for key in ("peft_version", "auto_mapping"):
        ours_cfg.pop(key), their_cfg.pop(key)
    assert ours_cfg == their_cfg

    ours = megalora.PeftModel.from_pretrained(base_model(kind), str(tmp_path / "mega")).eval()
    assert_close(run(ours, inp), expected, "megalora loads megalora")
    assert not any(p.requires_grad for p in ours.parameters()), "inference mode by default"
    theirs = peft.PeftModel.from_pretrained(base_model(kind), str(tmp_path / "mega")).eval()
    assert_close(run(theirs, inp), expected, "peft loads megalora")
    ours_from_peft = megalora.PeftModel.from_pretrained(base_model(kind), str(tmp_path / "peft")).eval()
    assert_close(run(ours_from_peft, inp), expected, "megalora loads peft")

    trainable_load = megalora.PeftModel.from_pretrained(base_model(kind), str(tmp_path / "peft"), is_trainable=True)
    peft_trainable = peft.PeftModel.from_pretrained(base_model(kind), str(tmp_path / "peft"), is_trainable=True)
    assert trainable(trainable_load) == trainable(peft_trainable)


BIAS_SETUPS = {
    f"{mode}_{extra}": [("default", {**LIN, "bias": mode, **kw})] + more
    for mode in ("none", "all", "lora_only")
    for extra, kw, more in (
        ("plain", {}, []),
        ("mts_lora_bias", {"modules_to_save": ["head"], "lora_bias": True, "target_modules": ["q", "fc1"]}, []),
        ("two_adapters", {}, [("x", {**LIN, "r": 3, "target_modules": ["fc2"], "lora_bias": True})]),
    )
}


@torch.no_grad()
def _train_like(m, p, seed=5):
    """Move every trainable tensor of ``m`` (biases too) and copy it into ``p``: a stand-in for training."""
    gen = torch.Generator().manual_seed(seed)
    theirs = dict(p.named_parameters())
    for name, param in m.named_parameters():
        if param.requires_grad:
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
            theirs[name].copy_(param)


@pytest.mark.parametrize("setup", list(BIAS_SETUPS))
def test_bias_setting_saves_and_loads_like_peft(setup, tmp_path):
    """``bias`` in {none, all, lora_only}: the key set PEFT writes, trained biases loaded both ways."""
    p, m = synced_pair("net", BIAS_SETUPS[setup])
    # Not compared with PEFT's set: under bias="all" PEFT also unfreezes an inactive adapter's lora_B bias.
    assert {n for n in trainable(m) if ".x." not in n} == {n for n in trainable(p) if ".x." not in n}
    _train_like(m, p)
    inp = make_input("net")
    expected = run(p.eval(), inp)
    assert_close(run(m.eval(), inp), expected, "after training")
    m.save_pretrained(tmp_path / "mega")
    p.save_pretrained(tmp_path / "peft")
    assert _files(tmp_path / "mega") == _files(tmp_path / "peft")
    assert_states_close(_tensors(tmp_path / "mega"), _tensors(tmp_path / "peft"), "saved tensors", atol=0)
    for source, lib in (("peft", megalora), ("mega", peft), ("mega", megalora)):
        loaded = lib.PeftModel.from_pretrained(base_model("net"), str(tmp_path / source)).eval()
        assert_close(run(loaded, inp), expected, f"{lib.__name__} loads the {source} file")


def test_non_default_adapters_go_to_subfolders(tmp_path):
    kind = "net"
    adapters = [("default", LIN), ("other", {**LIN, "r": 2, "target_modules": ["q", "fc2"]}),
                ("third", {**LIN, "use_dora": True, "target_modules": ["v"]})]
    p, m = synced_pair(kind, adapters)
    inp = make_input(kind)
    m.save_pretrained(tmp_path / "mega")
    p.save_pretrained(tmp_path / "peft")
    layout = _files(tmp_path / "mega")
    assert layout == _files(tmp_path / "peft")
    assert {"adapter_model.safetensors", "other/adapter_model.safetensors", "third/adapter_config.json"} <= set(layout)

    m.save_pretrained(tmp_path / "sel", selected_adapters=["other"])
    p.save_pretrained(tmp_path / "psel", selected_adapters=["other"])
    assert set(_files(tmp_path / "sel")) == set(_files(tmp_path / "psel")) == {
        "other/adapter_model.safetensors", "other/adapter_config.json"}
    with pytest.raises(ValueError):
        m.save_pretrained(tmp_path / "bad", selected_adapters=["missing"])

    for adapter in ("other", "third"):
        p.set_adapter(adapter)
        expected = run(p.eval(), inp)
        for src in ("mega", "peft"):
            path = str(tmp_path / src / adapter)
            ours = megalora.PeftModel.from_pretrained(base_model(kind), path, adapter_name=adapter).eval()
            assert ours.active_adapter == adapter
            assert_close(run(ours, inp), expected, f"megalora loads {src}/{adapter}")
            theirs = peft.PeftModel.from_pretrained(base_model(kind), path, adapter_name=adapter).eval()
            assert_close(run(theirs, inp), expected, f"peft loads {src}/{adapter}")

    # load_adapter adds a saved adapter next to an existing one, keeping the active one.
    ours = megalora.PeftModel.from_pretrained(base_model(kind), str(tmp_path / "mega")).eval()
    ours.load_adapter(str(tmp_path / "peft" / "other"), adapter_name="other")
    assert ours.active_adapter == "default"
    ours.set_adapter("other")
    p.set_adapter("other")
    assert_close(run(ours, inp), run(p, inp), "after load_adapter + set_adapter")


# ---------------------------------------------------------------------- training


BIAS_ALL_DROPOUT = {"bias": "all", "lora_dropout": 0.2}


@pytest.mark.parametrize("setup,optim,extra", [
    ("default", "sgd", {}), ("dora_modules_to_save", "adam", {}), ("dora_modules_to_save", "adam", BIAS_ALL_DROPOUT),
    ("lora_bias", "adam", BIAS_ALL_DROPOUT), ("gpt2_dora", "sgd", BIAS_ALL_DROPOUT),
], ids=["default", "dora_mts", "dora_mts_bias_all_dropout", "lora_bias_bias_all_dropout", "gpt2_dora_bias_all_dropout"])
def test_training_changes_only_adapter_params_like_peft(setup, optim, extra):
    kind, adapters = SETUPS[setup]
    adapters = [(adapters[0][0], {**adapters[0][1], **extra})]
    p, m = synced_pair(kind, adapters)
    assert trainable(m) == trainable(p)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    inp = make_input(kind)
    opts = []
    for model in (p, m):
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        opts.append(torch.optim.SGD(params, lr=0.1) if optim == "sgd" else torch.optim.Adam(params, lr=1e-2))
    for step in range(3):
        for model, opt in zip((p, m), opts):
            opt.zero_grad()
            run(model, inp, seed=step).pow(2).mean().backward()
            opt.step()
    changed = {k for k, v in m.named_parameters() if not torch.equal(v, before[k])}
    assert changed == trainable(m)
    assert all(".lora_" in k or ".modules_to_save." in k or k.endswith("bias") for k in changed)
    if not extra:
        assert all(".lora_" in k or ".modules_to_save." in k for k in changed)
    assert_states_close(dict(m.named_parameters()), dict(p.named_parameters()), "after training", atol=1e-5)


# ---------------------------------------------------------------------- delete / unload / add


def test_delete_adapter_like_peft():
    kind = "net"
    adapters = [("a", LIN), ("b", {**LIN, "use_dora": True, "target_modules": ["q", "fc1"]}),
                ("c", {**LIN, "r": 2, "modules_to_save": ["head"]})]
    p, m = synced_pair(kind, adapters, active="b")
    inp = make_input(kind)
    for victim in ("b", "a"):
        p.delete_adapter(victim)
        m.delete_adapter(victim)
        assert m.active_adapters == p.active_adapters
        assert list(m.peft_config) == list(p.peft_config)
        assert set(m.state_dict()) == set(p.state_dict())
        # PEFT quirk: a modules_to_save wrapper that lacks the deleted adapter keeps it as its active adapter (so
        # it runs the original module), even when the new active adapter has a copy there; megalora activates the
        # new adapter everywhere. They agree once the new adapter is set explicitly.
        for model in (p, m):
            model.base_model.set_adapter(model.active_adapters)
        assert trainable(m) == trainable(p)
        assert_close(run(m.eval(), inp), run(p.eval(), inp), f"after deleting {victim}")
    for layer in lora_layers(m).values():
        assert set(layer.lora_A) <= {"c"} and not layer.lora_magnitude_vector
    with pytest.raises(ValueError):
        m.delete_adapter("a")


def test_delete_merged_adapter_raises():
    p, m = synced_pair("net", [("default", LIN), ("other", LIN)])
    m.merge_adapter()
    p.merge_adapter()
    with pytest.raises(ValueError):
        p.delete_adapter("default")
    with pytest.raises(ValueError):
        m.delete_adapter("default")


@pytest.mark.parametrize("setup", ["default", "dora_modules_to_save", "gpt2_dora"])
def test_unload_gives_base_model(setup):
    kind, p, m = _pair(setup)
    inp = make_input(kind)
    base = base_model(kind)
    unloaded = m.unload()
    assert module_types(unloaded) == module_types(base)
    assert_close(run(unloaded, inp), run(base, inp), "unload")
    assert_states_close(unloaded.state_dict(), base.state_dict(), "unloaded weights", atol=0)
    # PEFT's unload() keeps the active trained modules_to_save copy in place of the original module; megalora
    # gives back the original (its documented "base model as it was"). LoRA layers agree either way.
    saved = tuple(SETUPS[setup][1][0][1].get("modules_to_save") or ())
    theirs = {k: v for k, v in p.unload().state_dict().items() if not any(f".{n}." in f".{k}" for n in saved)}
    ours = {k: v for k, v in unloaded.state_dict().items() if k in theirs}
    assert_states_close(ours, theirs, "vs peft unload", atol=0)


def test_unload_after_merge_keeps_original_weights():
    """PEFT's ``unload`` keeps merged weights merged; megalora unmerges first (documented: "the base model as
    it was"). This pins megalora's choice."""
    kind, p, m = _pair("default")
    inp = make_input(kind)
    m.merge_adapter()
    assert_close(run(m.unload(), inp), run(base_model(kind), inp), "unload after merge")


@pytest.mark.parametrize("adapters", [
    [("default", LIN)],
    [("default", {**LIN, "use_dora": True, "modules_to_save": ["head"]})],
    [("default", {**LIN, "bias": "all", "lora_bias": True, "target_modules": ["q", "fc1"]})],
    [("default", {**LIN, "bias": "lora_only"}), ("x", {**LIN, "r": 3, "target_modules": ["fc2"]})],
    [("default", {**GPT, "rank_pattern": {"c_fc": 8}, "modules_to_save": ["ln_f"]})],
], ids=["default", "dora_mts", "bias_all_lora_bias", "lora_only_two", "gpt2"])
def test_parameter_counts_like_peft(adapters, capsys):
    kind = "gpt2" if "c_attn" in adapters[0][1]["target_modules"] else "net"
    p, m = build_pair(kind, adapters)
    assert m.get_nb_trainable_parameters() == p.get_nb_trainable_parameters()
    capsys.readouterr()
    p.print_trainable_parameters()
    expected = capsys.readouterr().out
    m.print_trainable_parameters()
    assert capsys.readouterr().out == expected


def test_add_adapter_keeps_active_adapter():
    kind = "net"
    p, m = synced_pair(kind, [("default", {**LIN, "modules_to_save": ["head"]})])
    inp = make_input(kind)
    before = run(m.eval(), inp)
    for model, lib in ((p, peft), (m, megalora)):
        model.add_adapter("new", lib.LoraConfig(**{**LIN, "r": 2, "init_lora_weights": False}))
    assert m.active_adapter == p.active_adapter == "default"
    assert trainable(m) == trainable(p)
    assert_close(run(m.eval(), inp), before, "output after add_adapter")
    perturb(m, seed=3)
    copy_adapters(m, p)
    for model in (p, m):
        model.set_adapter("new")
    assert m.active_adapter == "new"
    assert trainable(m) == trainable(p)
    assert_close(run(m.eval(), inp), run(p.eval(), inp), "new adapter active")
    with pytest.raises(ValueError):
        m.add_adapter("new", megalora.LoraConfig(**LIN))


@pytest.mark.parametrize("cfg", [
    dict(target_modules=["nope"]),
    dict(target_modules=r"nope\..*"),
    # PEFT's default layer regex needs a dot before the stack name: top-level ``layers.<i>`` never matches.
    dict(target_modules=["q"], layers_to_transform=[0]),
    dict(target_modules=["q"], layers_to_transform=[7], layers_pattern="layers"),
], ids=str)
def test_nothing_matched_raises_like_peft(cfg):
    with pytest.raises(ValueError, match="[Tt]arget modules"):
        peft.get_peft_model(base_model("net"), peft.LoraConfig(**cfg))
    with pytest.raises(ValueError, match="[Tt]arget modules"):
        megalora.get_peft_model(base_model("net"), megalora.LoraConfig(**cfg))
