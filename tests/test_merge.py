"""``add_weighted_adapter`` against HF PEFT, for every combination_type.

Both libraries get the same source adapters; the new adapter's ΔW per layer
(and, where the method defines them uniquely, its factors A and B) and the
model output with it active must agree to 1e-6. SVD-based methods are compared
on ΔW = B @ A only: each singular pair's sign is arbitrary. DARE draws its masks
from the global RNG, so each library's call is preceded by the same
``torch.manual_seed``.
"""

from __future__ import annotations

import pytest
import torch

from tests.peft_oracle import (
    GPT2_TARGETS, LINEAR_TARGETS, assert_close, base_model, lora_layers, make_input, megalora, peft, run, synced_pair,
    trainable,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SVD_TYPES = ["svd", "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd"]
FACTOR_TYPES = ["linear", "cat", "ties", "dare_ties", "dare_linear", "magnitude_prune"]
DENSITY_TYPES = {"ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                 "magnitude_prune", "magnitude_prune_svd"}
SIGN_TYPES = ["ties", "ties_svd", "dare_ties", "dare_ties_svd"]

LIN = dict(target_modules=LINEAR_TARGETS, r=4, lora_alpha=8)
# Same r (the factor methods need it), other alphas/scalings, and "b" only on some layers.
NET_ADAPTERS = [
    ("a", LIN),
    ("b", {**LIN, "lora_alpha": 5, "target_modules": ["q", "v", "fc1"]}),
    ("c", {**LIN, "use_rslora": True, "lora_alpha": 3}),
]
GPT2_ADAPTERS = [
    ("a", dict(target_modules=GPT2_TARGETS, r=4, lora_alpha=8, fan_in_fan_out=True)),
    ("b", dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=2, fan_in_fan_out=True)),
]


def _weighted_pair(kind, adapters, names, weights, seed=11, **kwargs):
    """Build the pair, add ``new`` in both (same RNG seed before each call), activate it."""
    p, m = synced_pair(kind, adapters)
    for model in (p, m):
        torch.manual_seed(seed)
        model.add_weighted_adapter(names, weights, "new", **kwargs)
        model.set_adapter("new")
        model.eval()
    return p, m


def _compare(p, m, kind, combination_type):
    new_layers = {n: layer for n, layer in lora_layers(m).items() if "new" in layer.lora_A}
    assert set(new_layers) == {n for n, layer in lora_layers(p).items() if "new" in layer.lora_A}
    assert new_layers
    assert m.peft_config["new"].r == p.peft_config["new"].r
    assert m.peft_config["new"].lora_alpha == p.peft_config["new"].lora_alpha
    assert set(m.peft_config["new"].target_modules) == set(p.peft_config["new"].target_modules)
    assert trainable(m) == trainable(p)
    p_layers = lora_layers(p)
    for name, layer in new_layers.items():
        ref = p_layers[name]
        assert layer.r["new"] == ref.r["new"] and layer.scaling["new"] == ref.scaling["new"]
        delta = layer.get_delta_weight("new")
        assert_close(delta, ref.get_delta_weight("new"), f"ΔW {name}")
        assert delta.abs().max() > 1e-3, f"{name}: empty ΔW"
        if combination_type not in SVD_TYPES:
            assert_close(layer.lora_A["new"].weight, ref.lora_A["new"].weight, f"A {name}")
            assert_close(layer.lora_B["new"].weight, ref.lora_B["new"].weight, f"B {name}")
    inp = make_input(kind)
    assert_close(run(m, inp), run(p, inp), "output with the new adapter")


@pytest.mark.parametrize("weights", [[0.7, 1.3, 0.5], [0.8, -0.6, 1.1]], ids=["positive", "negative"])
@pytest.mark.parametrize("combination_type", FACTOR_TYPES + SVD_TYPES)
def test_combination_matches_peft(combination_type, weights):
    kwargs = {"density": 0.5} if combination_type in DENSITY_TYPES else {}
    p, m = _weighted_pair("net", NET_ADAPTERS, ["a", "b", "c"], weights, combination_type=combination_type, **kwargs)
    _compare(p, m, "net", combination_type)


@pytest.mark.parametrize("combination_type", SIGN_TYPES)
@pytest.mark.parametrize("majority_sign_method,density", [("total", 0.3), ("frequency", 0.5), ("frequency", 0.9)])
def test_majority_sign_and_density_match_peft(combination_type, majority_sign_method, density):
    p, m = _weighted_pair("net", NET_ADAPTERS, ["a", "b", "c"], [1.0, -0.7, 0.4], seed=5,
                          combination_type=combination_type, density=density,
                          majority_sign_method=majority_sign_method)
    _compare(p, m, "net", combination_type)


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd", "ties_svd", "dare_linear", "dare_ties_svd"])
def test_conv1d_fan_in_fan_out_matches_peft(combination_type):
    kwargs = {"density": 0.6} if combination_type in DENSITY_TYPES else {}
    p, m = _weighted_pair("gpt2", GPT2_ADAPTERS, ["a", "b"], [0.9, -1.4], combination_type=combination_type, **kwargs)
    _compare(p, m, "gpt2", combination_type)


@pytest.mark.parametrize("init", [False, "gaussian", "orthogonal"])
def test_dare_masks_follow_peft_rng_for_every_init(init):
    """PEFT draws the new adapter's init from the global RNG before the DARE masks; megalora must match."""
    adapters = [(n, {**kw, "init_lora_weights": init}) for n, kw in NET_ADAPTERS]
    p, m = _weighted_pair("net", adapters, ["a", "b", "c"], [0.5, 1.0, -0.5], combination_type="dare_ties",
                          density=0.4)
    _compare(p, m, "net", "dare_ties")


def test_dare_masks_follow_peft_rng_with_lora_bias():
    adapters = [(n, {**kw, "lora_bias": True, "target_modules": ["q", "fc1"]}) for n, kw in NET_ADAPTERS]
    p, m = _weighted_pair("net", adapters, ["a", "b"], [0.5, 1.0], combination_type="dare_linear", density=0.5)
    _compare(p, m, "net", "dare_linear")


@pytest.mark.parametrize("combination_type", ["cat", "svd", "ties_svd", "magnitude_prune_svd"])
def test_different_ranks_via_rank_pattern(combination_type):
    adapters = [
        ("a", {**LIN, "rank_pattern": {"fc1": 2, r"layers\.0\.q": 6}}),
        ("b", {**LIN, "r": 3, "lora_alpha": 5, "target_modules": ["q", "v", "fc1"], "alpha_pattern": {"v": 7}}),
    ]
    kwargs = {"density": 0.5} if combination_type in DENSITY_TYPES else {}
    p, m = _weighted_pair("net", adapters, ["a", "b"], [1.2, -0.8], combination_type=combination_type, **kwargs)
    _compare(p, m, "net", combination_type)
    if combination_type == "cat":
        assert m.peft_config["new"].r == 6 + 3


@pytest.mark.parametrize("combination_type,svd_rank", [("svd", 2), ("svd", 6), ("ties_svd", 3),
                                                      ("dare_linear_svd", 6)])
def test_svd_rank(combination_type, svd_rank):
    kwargs = {"density": 0.7} if combination_type in DENSITY_TYPES else {}
    p, m = _weighted_pair("net", NET_ADAPTERS, ["a", "b", "c"], [0.6, 0.9, -0.3], combination_type=combination_type,
                          svd_rank=svd_rank, **kwargs)
    assert m.peft_config["new"].r == svd_rank
    _compare(p, m, "net", combination_type)


@pytest.mark.parametrize("combination_type", ["svd", "ties_svd"])
def test_svd_clamp(combination_type):
    kwargs = {"density": 0.7} if combination_type in DENSITY_TYPES else {}
    p, m = _weighted_pair("net", NET_ADAPTERS, ["a", "b", "c"], [0.6, 0.9, -0.3], combination_type=combination_type,
                          svd_clamp=0.95, **kwargs)
    _compare(p, m, "net", combination_type)


def test_single_adapter_is_linear_and_existing_name_is_noop():
    p, m = _weighted_pair("net", NET_ADAPTERS, ["b"], [-1.5], combination_type="svd")
    _compare(p, m, "net", "linear")  # one adapter: both switch to "linear", so the factors are defined
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.add_weighted_adapter(["a"], [2.0], "new", combination_type="linear")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("case", ["unknown_adapter", "rank_mismatch", "bad_type", "modules_to_save_clash"])
def test_invalid_requests_raise_like_peft(case):
    adapters = [("a", {**LIN, "modules_to_save": ["head"]}), ("b", {**LIN, "r": 2})]
    if case == "modules_to_save_clash":
        adapters[1] = ("b", {**LIN, "modules_to_save": ["head"]})
    names, kwargs = ["a", "b"], {"combination_type": "linear"}
    if case == "unknown_adapter":
        names = ["a", "zzz"]
    elif case == "bad_type":
        kwargs = {"combination_type": "average"}
    p, m = synced_pair("net", adapters)
    for model in (p, m):
        with pytest.raises(ValueError):
            model.add_weighted_adapter(names, [1.0, 1.0], "new", **kwargs)


@pytest.mark.parametrize("combination_type", ["cat", "dare_linear"])
def test_weighted_adapter_saves_and_loads_in_peft(combination_type, tmp_path):
    kwargs = {"density": 0.5} if combination_type in DENSITY_TYPES else {}
    p, m = _weighted_pair("net", NET_ADAPTERS, ["a", "b", "c"], [0.5, -1.0, 2.0], combination_type=combination_type,
                          **kwargs)
    m.save_pretrained(tmp_path / "mega", selected_adapters=["new"])
    theirs = peft.PeftModel.from_pretrained(base_model("net"), str(tmp_path / "mega" / "new"), adapter_name="new")
    ours = megalora.PeftModel.from_pretrained(base_model("net"), str(tmp_path / "mega" / "new"), adapter_name="new")
    inp = make_input("net")
    expected = run(p, inp)
    assert_close(run(theirs.eval(), inp), expected, "peft loads the weighted adapter")
    assert_close(run(ours.eval(), inp), expected, "megalora loads the weighted adapter")
