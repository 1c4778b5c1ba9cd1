"""megalora against HF PEFT on plain layers: every LoraConfig option.

For each option, a PEFT model and a megalora model are built from the same
base and config and given the same (perturbed) adapter weights. Then outputs,
ΔW, merged weights, unmerge, ``merge_and_unload`` and ``safe_merge`` must agree
with PEFT to 1e-6 (float32, absolute).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.peft_oracle import (
    GPT2_TARGETS, LINEAR_TARGETS, assert_close, assert_states_close, base_model, base_state,
    build_pair, copy_adapters, lora_layers, make_input, megalora, module_types, peft, perturb, run, synced_pair,
    targeted, trainable,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LIN = dict(target_modules=LINEAR_TARGETS, r=4, lora_alpha=8)
GPT = dict(target_modules=GPT2_TARGETS, r=4, lora_alpha=8, fan_in_fan_out=True)

# name -> (model kind, [(adapter, config kwargs), ...], active adapters, run in train mode)
CASES = {
    "default": ("net", [("default", LIN)], None, False),
    "rslora": ("net", [("default", {**LIN, "use_rslora": True})], None, False),
    "dropout": ("net", [("default", {**LIN, "lora_dropout": 0.3})], None, True),
    "bias_all": ("net", [("default", {**LIN, "bias": "all"})], None, False),
    "bias_lora_only": ("net", [("default", {**LIN, "bias": "lora_only"})], None, False),
    "lora_bias": ("net", [("default", {**LIN, "target_modules": ["q", "v", "fc1"], "lora_bias": True})], None, False),
    "dora": ("net", [("default", {**LIN, "use_dora": True})], None, False),
    "dora_dropout": ("net", [("default", {**LIN, "use_dora": True, "lora_dropout": 0.3})], None, True),
    "init_false": ("net", [("default", {**LIN, "init_lora_weights": False})], None, False),
    "init_gaussian": ("net", [("default", {**LIN, "init_lora_weights": "gaussian"})], None, False),
    "init_orthogonal": ("net", [("default", {**LIN, "init_lora_weights": "orthogonal"})], None, False),
    "patterns": ("net", [("default", {
        **LIN, "rank_pattern": {"fc1": 2, r"layers\.1\.q": 6}, "alpha_pattern": {"v": 3, r"layers\.2\.fc2": 11},
    })], None, False),
    "regex": ("net", [("default", {**LIN, "target_modules": r".*\.(q|fc2)"})], None, False),
    "all_linear": ("net", [("default", {**LIN, "target_modules": "all-linear"})], None, False),
    "exclude_list": ("net", [("default", {**LIN, "exclude_modules": ["fc1", "layers.0.q"]})], None, False),
    "exclude_regex": ("net", [("default", {**LIN, "exclude_modules": r"layers\.1\..*"})], None, False),
    "layers_to_transform": ("net", [("default", {
        **LIN, "layers_to_transform": [0, 2], "layers_pattern": "layers"})], None, False),
    "layers_to_transform_int": ("net", [("default", {
        **LIN, "layers_to_transform": 1, "layers_pattern": "layers"})], None, False),
    "modules_to_save": ("net", [("default", {**LIN, "modules_to_save": ["head"]})], None, False),
    "inference_mode": ("net", [("default", {**LIN, "modules_to_save": ["head"], "inference_mode": True})], None,
                       False),
    "multi": ("net", [
        ("a", LIN),
        ("b", {**LIN, "r": 2, "lora_alpha": 5, "target_modules": ["q", "fc1"]}),
        ("c", {**LIN, "r": 6, "use_rslora": True, "target_modules": ["fc1", "fc2", "v"]}),
    ], ["a", "b", "c"], False),
    "multi_dora_mixed": ("net", [
        ("a", {**LIN, "use_dora": True}),
        ("b", {**LIN, "r": 2, "target_modules": ["q", "fc1", "fc2"]}),
        ("c", {**LIN, "use_dora": True, "target_modules": ["fc1", "k"]}),
    ], ["b", "a", "c"], False),
    "multi_dropout": ("net", [
        ("a", {**LIN, "lora_dropout": 0.2}),
        ("b", {**LIN, "use_dora": True, "lora_dropout": 0.4, "target_modules": ["q", "fc1"]}),
    ], ["a", "b"], True),
    "gpt2": ("gpt2", [("default", GPT)], None, False),
    "gpt2_no_fan_in_fan_out_flag": ("gpt2", [("default", {**GPT, "fan_in_fan_out": False})], None, False),
    "gpt2_dora": ("gpt2", [("default", {**GPT, "use_dora": True})], None, False),
    "gpt2_lora_bias_dropout": ("gpt2", [("default", {**GPT, "lora_bias": True, "lora_dropout": 0.25})], None, True),
    "gpt2_all_linear": ("gpt2", [("default", {**GPT, "target_modules": "all-linear"})], None, False),
    "gpt2_layers": ("gpt2", [("default", {
        **GPT, "layers_to_transform": [1], "layers_pattern": "h", "modules_to_save": ["ln_f"]})], None, False),
}


def _pair(case, seed=0):
    kind, adapters, active, _ = CASES[case]
    return synced_pair(kind, adapters, active, seed=seed)


def _outputs(p, m, inp, train):
    p.train(train)
    m.train(train)
    return run(p, inp), run(m, inp)


def _check_structure(p, m):
    """Same targeted modules, state-dict keys and shapes, trainable parameters, per-layer settings."""
    assert targeted(m) == targeted(p)
    assert targeted(m), "nothing targeted"
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        k: tuple(v.shape) for k, v in p.state_dict().items()}
    assert trainable(m) == trainable(p)
    p_layers = lora_layers(p)
    for name, layer in lora_layers(m).items():
        ref = p_layers[name]
        for adapter in layer.lora_A:
            assert layer.r[adapter] == ref.r[adapter], name
            assert layer.lora_alpha[adapter] == ref.lora_alpha[adapter], name
            assert math.isclose(layer.scaling[adapter], ref.scaling[adapter]), name
            assert layer.use_dora[adapter] == ref.use_dora[adapter], name
            assert type(layer.lora_dropout[adapter]) is type(ref.lora_dropout[adapter]), name
            assert getattr(layer.lora_dropout[adapter], "p", 0) == getattr(ref.lora_dropout[adapter], "p", 0)
        assert layer.active_adapters == ref.active_adapters, name


@pytest.mark.parametrize("case", list(CASES))
def test_option_matches_peft(case):
    """Structure; outputs; ΔW; merge (weights, outputs); unmerge restores; merge_and_unload."""
    kind, _, _, train = CASES[case]
    p, m = _pair(case)
    _check_structure(p, m)
    inp = make_input(kind)
    untouched = base_state(m)
    p_out, m_out = _outputs(p, m, inp, train)
    assert_close(m_out, p_out, "unmerged output")
    assert not torch.allclose(m_out, run(base_model(kind), inp), atol=1e-3), "adapters have no effect"

    p.eval()
    m.eval()
    ref_eval = run(p, inp)
    assert_close(run(m, inp), ref_eval, "eval output")
    p_layers = lora_layers(p)
    for name, layer in lora_layers(m).items():
        ref = p_layers[name]
        for adapter in layer.lora_A:
            assert_close(layer.get_delta_weight(adapter), ref.get_delta_weight(adapter), f"ΔW {name}/{adapter}")

    p.merge_adapter()
    m.merge_adapter()
    assert_states_close(base_state(m), base_state(p), "merged base weights")
    assert_close(run(m, inp), run(p, inp), "merged output")
    assert_close(run(m, inp), ref_eval, "merged output vs unmerged")

    p.unmerge_adapter()
    m.unmerge_adapter()
    assert_states_close(base_state(m), untouched, "base weights after unmerge")
    assert_close(run(m, inp), ref_eval, "output after unmerge")

    p_merged = p.merge_and_unload()
    m_merged = m.merge_and_unload()
    assert module_types(m_merged) == module_types(base_model(kind))
    assert_states_close(m_merged.state_dict(), p_merged.state_dict(), "merge_and_unload state")
    assert_close(run(m_merged, inp), run(p_merged, inp), "merge_and_unload output")
    assert_close(run(m_merged, inp), ref_eval, "merge_and_unload output vs unmerged")


@pytest.mark.parametrize("case,how", [
    ("default", "merge_adapter"), ("dora", "merge_and_unload"), ("lora_bias", "merge_adapter"),
    ("multi_dora_mixed", "merge_adapter"), ("gpt2", "merge_and_unload"), ("gpt2_dora", "merge_adapter"),
])
def test_safe_merge_refuses_nan(case, how):
    p, m = _pair(case)
    victim = sorted(lora_layers(m))[-1]
    for model in (p, m):
        layer = lora_layers(model)[victim]
        adapter = [a for a in layer.active_adapters if a in layer.lora_A][-1]
        with torch.no_grad():
            layer.lora_B[adapter].weight[0, 0] = float("nan")
    before = {k: v for k, v in base_state(m).items() if k.startswith(f"{victim}.")}
    assert before
    for model in (p, m):
        with pytest.raises(ValueError, match="NaN"):
            getattr(model, how)(safe_merge=True)
    after = {k: v for k, v in base_state(m).items() if k in before}
    assert_states_close(after, before, "weights of the layer that refused to merge", atol=0)


@pytest.mark.parametrize("case", ["default", "dora", "gpt2"])
def test_merge_named_adapters_and_no_safe_merge(case):
    """``merge_adapter(adapter_names=...)`` and ``safe_merge=True`` on finite weights."""
    kind, _, _, _ = CASES[case]
    p, m = _pair(case)
    p.add_adapter("other", peft.LoraConfig(**CASES[case][1][0][1]))
    m.add_adapter("other", megalora.LoraConfig(**CASES[case][1][0][1]))
    perturb(m, seed=1)
    copy_adapters(m, p)
    inp = make_input(kind)
    p.base_model.merge_adapter(adapter_names=["other", "default"], safe_merge=True)
    m.base_model.merge_adapter(adapter_names=["other", "default"], safe_merge=True)
    assert_states_close(base_state(m), base_state(p), "merged base weights")
    assert_close(run(m, inp), run(p, inp), "merged output")


# ---------------------------------------------------------------------- init


def _single_layer(**kw):
    """PEFT and megalora models with one LoRA layer of shape 96 -> 80 (big enough for statistics)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(96, 80))
    cfg = dict(target_modules=["0"], r=kw.pop("r", 16), lora_alpha=16, **kw)
    p = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    m = megalora.get_peft_model(base, megalora.LoraConfig(**cfg))
    return p.base_model.model[0], m.base_model.model[0]


@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal"])
def test_init_distribution_matches_peft(init, lora_bias):
    """RNG streams differ by design; the distributions and properties must not."""
    if lora_bias and init not in (True, False):  # both libraries refuse the combination
        for lib in (peft, megalora):
            with pytest.raises(ValueError, match="lora_bias"):
                lib.LoraConfig(target_modules=["0"], init_lora_weights=init, lora_bias=True)
        return
    r, fan_in = 16, 96
    for layer in _single_layer(init_lora_weights=init, lora_bias=lora_bias):
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        assert a.shape == (r, fan_in) and b.shape == (80, r)
        assert a.dtype == b.dtype == torch.float32
        bound_a = 1 / math.sqrt(fan_in)
        if init in (True, False):  # nn.Linear's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            assert a.abs().max() <= bound_a
            assert a.abs().max() > 0.95 * bound_a
            assert abs(a.std().item() - bound_a / math.sqrt(3)) < 0.1 * bound_a / math.sqrt(3)
        if init is True or init == "gaussian":
            assert torch.count_nonzero(b) == 0
        if init is False:
            bound_b = 1 / math.sqrt(r)
            assert b.abs().max() <= bound_b and b.abs().max() > 0.9 * bound_b
            assert abs(b.std().item() - bound_b / math.sqrt(3)) < 0.1 * bound_b / math.sqrt(3)
        if init == "gaussian":
            assert abs(a.std().item() - 1 / r) < 0.05 / r
            assert abs(a.mean().item()) < 0.05 / r
        if init == "orthogonal":
            assert (b @ a).abs().max() < 1e-6  # B @ A starts at zero
            assert torch.count_nonzero(a) == a.numel() and torch.count_nonzero(b) == b.numel()
            # A = (X Q_odd)^T / 10 with X ~ N(0, 1): rows of A are orthogonal in expectation, std 1/10.
            assert 0.06 < a.std().item() < 0.14 and 0.06 < b.std().item() < 0.14
        if lora_bias:
            bias = layer.lora_B["default"].bias.detach()
            assert bias.shape == (80,)
            if init is True:
                assert torch.count_nonzero(bias) == 0
            else:
                assert bias.abs().max() <= 1 / math.sqrt(r) and bias.abs().max() > 0.9 / math.sqrt(r)
        else:
            assert layer.lora_B["default"].bias is None


def test_orthogonal_init_needs_even_rank():
    for lib in (peft, megalora):
        with pytest.raises(ValueError, match="even"):
            lib.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                               lib.LoraConfig(target_modules=["0"], r=3, init_lora_weights="orthogonal"))


@pytest.mark.parametrize("init,use_dora", [(True, True), ("gaussian", False), ("orthogonal", False),
                                           ("orthogonal", True)])
def test_identity_inits_leave_outputs_unchanged(init, use_dora):
    kind = "net"
    cfg = {**LIN, "init_lora_weights": init, "use_dora": use_dora}
    p, m = build_pair(kind, [("default", cfg)])
    inp = make_input(kind)
    expected = run(base_model(kind), inp)
    assert_close(run(p, inp), expected, "peft at init")
    assert_close(run(m, inp), expected, "megalora at init")


# ---------------------------------------------------------------------- targeting


TARGETING = [
    dict(target_modules=["q", "fc2"]),
    dict(target_modules=["layers.0.q", "fc2"]),
    dict(target_modules=["inp", "head"]),
    dict(target_modules=r".*\.(q|fc2)"),
    dict(target_modules=r"layers\.[02]\.(k|v)"),
    dict(target_modules=r".*q"),
    dict(target_modules="all-linear"),
    dict(target_modules="all-linear", exclude_modules=["head", "fc1"]),
    dict(target_modules=LINEAR_TARGETS, exclude_modules=["fc1", "layers.0.q"]),
    dict(target_modules=LINEAR_TARGETS, exclude_modules=r".*\.(k|v)"),
    dict(target_modules=LINEAR_TARGETS, layers_to_transform=[0, 2], layers_pattern="layers"),
    dict(target_modules=LINEAR_TARGETS, layers_to_transform=2, layers_pattern="layers"),
    dict(target_modules=LINEAR_TARGETS, layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules=LINEAR_TARGETS, layers_to_transform=[1], layers_pattern=["blocks", "layers"]),
    dict(target_modules=LINEAR_TARGETS, modules_to_save=["fc1"]),
    dict(target_modules=LINEAR_TARGETS + ["head"], modules_to_save=["head"]),
]


@pytest.mark.parametrize("cfg", TARGETING, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_targeted_modules_match_peft(cfg):
    p, m = build_pair("net", [("default", {"r": 2, **cfg})])
    assert targeted(m) == targeted(p)
    wrappers = {n for n, mod in p.named_modules() if type(mod).__name__ == "ModulesToSaveWrapper"}
    assert {n for n, mod in m.named_modules() if type(mod).__name__ == "ModulesToSaveWrapper"} == wrappers
    assert trainable(m) == trainable(p)


@pytest.mark.parametrize("cfg", [
    dict(target_modules="all-linear"),
    dict(target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h"),
    dict(target_modules=["c_attn", "c_fc"], layers_to_transform=1),  # default pattern: transformer.h.<i>.
    dict(target_modules=r".*h\.1\.attn\.c_.*"),
    dict(target_modules=["c_fc", "c_proj"], exclude_modules=["mlp.c_proj"]),
], ids=str)
def test_targeted_modules_match_peft_gpt2(cfg):
    p, m = build_pair("gpt2", [("default", {"r": 2, **cfg})])
    assert targeted(m) == targeted(p)
    assert "lm_head" not in targeted(m)
    p_layers = lora_layers(p)
    for name, layer in lora_layers(m).items():
        assert layer.fan_in_fan_out is p_layers[name].fan_in_fan_out is True

