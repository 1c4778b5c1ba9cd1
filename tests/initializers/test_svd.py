"""PiSSA / pissa_niter_N / OLoRA on plain layers against HF PEFT 0.21.2, and PEFT's conversion.

Every comparison is sign-invariant: the residual base weights, ``scaling·B@A``
per layer and model outputs (an SVD or QR may flip a factor's column and row
together; Adam's update is odd in the gradient, so the trajectory of ``B@A``
is sign-invariant too). Both libraries call the same torch decomposition on
the same fp32 weight, so the tolerances (1e-5) only allow for rounding.
"""

from __future__ import annotations

import pytest
import torch

from tests import peft_oracle as O

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-5
CASES = {
    "pissa-net": ("net", dict(r=4, lora_alpha=8, target_modules=O.LINEAR_TARGETS, init_lora_weights="pissa",
                              rank_pattern={"layers.1.fc1": 2}, alpha_pattern={"layers.2.q": 3.0})),
    "pissa-gpt2-rslora": ("gpt2", dict(r=2, lora_alpha=3, target_modules=O.GPT2_TARGETS, init_lora_weights="pissa",
                                       use_rslora=True)),
    # PEFT's olora_init reads Conv1D's [in, out] weight untransposed, so OLoRA is compared on nn.Linear only.
    "olora-net": ("net", dict(r=3, lora_alpha=5, target_modules=O.LINEAR_TARGETS, init_lora_weights="olora",
                              rank_pattern={"layers.0.v": 5})),
}


def _deltas(model) -> dict:
    return {n: layer.get_delta_weight("default").detach().clone() for n, layer in O.lora_layers(model).items()}


def _train(model, kind: str, steps: int = 3) -> list[torch.Tensor]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    outs = []
    for step in range(steps):
        opt.zero_grad()
        out = O.run(model, O.make_input(kind, seed=step))
        out.float().pow(2).mean().backward()
        opt.step()
        outs.append(out.detach())
    return outs


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft(case):
    kind, kw = CASES[case]
    base_out = O.run(O.base_model(kind).eval(), O.make_input(kind))
    p, m = O.build_pair(kind, [("default", kw)])
    O.assert_states_close(O.base_state(m), O.base_state(p), "residual base weights", atol=ATOL)
    O.assert_states_close(_deltas(m), _deltas(p), "scaling * B @ A", atol=ATOL)
    x = O.make_input(kind)
    O.assert_close(O.run(m, x), O.run(p, x), "outputs at init", atol=ATOL)
    O.assert_close(O.run(m, x), base_out, "outputs at init vs the original base", atol=ATOL)
    for i, (a, b) in enumerate(zip(_train(m, kind), _train(p, kind))):
        O.assert_close(a, b, f"outputs at Adam step {i}", atol=ATOL)
    O.assert_states_close(_deltas(m), _deltas(p), "scaling * B @ A after training", atol=ATOL)


def test_pissa_niter_keeps_the_model_and_is_reproducible():
    """Randomized: not PEFT's draw (it uses the global RNG), but W_res + s·B@A = W, seeded by (seed, name)."""
    kw = dict(r=2, lora_alpha=4, target_modules=O.LINEAR_TARGETS, init_lora_weights="pissa_niter_3")
    x = O.make_input("net")
    base_out = O.run(O.base_model("net"), x)
    import megalora

    torch.manual_seed(0)
    one = megalora.get_peft_model(O.base_model("net"), megalora.LoraConfig(**kw), seed=7)
    torch.manual_seed(1)  # the global RNG state must not matter
    two = megalora.get_peft_model(O.base_model("net"), megalora.LoraConfig(**kw), seed=7)
    O.assert_close(O.run(one, x), base_out, "outputs at init", atol=ATOL)
    O.assert_states_close(_deltas(one), _deltas(two), "the same seed gives the same factors", atol=0)
    assert all(d.abs().max() > 1e-3 for d in _deltas(one).values()), "B @ A is not zero"


def test_conversion_loads_into_peft_on_the_original_base(tmp_path):
    """PEFT's workflow: save right after init, train, save with the conversion; PEFT on W gives the same model."""
    import megalora
    import peft

    kind, kw = CASES["pissa-net"]
    p, m = O.build_pair(kind, [("default", kw)])
    init_dir, out_dir = str(tmp_path / "init"), str(tmp_path / "out")
    m.save_pretrained(init_dir)
    p.save_pretrained(str(tmp_path / "peft_init"))
    _train(m, kind)
    _train(p, kind)
    m.save_pretrained(out_dir, path_initial_model_for_weight_conversion=init_dir)
    p.save_pretrained(str(tmp_path / "peft_out"),
                      path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    loaded = peft.PeftModel.from_pretrained(O.base_model(kind), out_dir).eval()
    x = O.make_input(kind, seed=5)
    O.assert_close(O.run(loaded, x), O.run(m.eval(), x), "converted adapter on the original base", atol=ATOL)
    # The same file as PEFT's own conversion, up to signs: the same deltas and config.
    theirs = peft.PeftModel.from_pretrained(O.base_model(kind), str(tmp_path / "peft_out")).eval()
    O.assert_states_close(_deltas(loaded), _deltas(theirs), "converted deltas vs PEFT's", atol=ATOL)
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights"):
        assert getattr(loaded.peft_config["default"], field) == getattr(theirs.peft_config["default"], field), field
    # The initial adapter's config now says init_lora_weights=True: loading it re-runs nothing.
    assert megalora.LoraConfig.from_pretrained(init_dir).init_lora_weights is True
    # megalora reads the converted file too, at r' = 2r.
    again = megalora.PeftModel.from_pretrained(O.base_model(kind), out_dir)
    O.assert_close(O.run(again, x), O.run(m, x), "converted adapter in megalora", atol=ATOL)


def test_conversion_refusals(tmp_path):
    import megalora

    base = dict(r=2, target_modules=O.LINEAR_TARGETS, init_lora_weights="pissa")
    m = megalora.get_peft_model(O.base_model("net"), megalora.LoraConfig(**base, use_rslora=True,
                                                                         rank_pattern={"layers.0.q": 4}))
    m.save_pretrained(str(tmp_path / "init"))
    with pytest.raises(ValueError, match="use_rslora=True together with rank_pattern"):
        m.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    m = megalora.get_peft_model(O.base_model("net"), megalora.LoraConfig(**base))
    with pytest.raises(ValueError, match="holds no adapter_model.safetensors"):
        m.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "none"))


def test_merge_unmerge_unload_keep_the_residual():
    """merge = W_res + s·B@A = W at init; unmerge and unload give W_res back (PEFT's unload keeps W_res)."""
    kind, kw = CASES["olora-net"]
    import megalora

    model = megalora.get_peft_model(O.base_model(kind), megalora.LoraConfig(**kw))
    residual = O.base_state(model)
    x = O.make_input(kind)
    out = O.run(model, x)
    model.merge_adapter()
    O.assert_close(O.run(model, x), out, "merged", atol=ATOL)
    model.unmerge_adapter()
    O.assert_states_close(O.base_state(model), residual, "unmerged", atol=ATOL)
    merged = model.merge_and_unload()
    original = O.base_model(kind).state_dict()
    for key, value in merged.state_dict().items():
        O.assert_close(value, original[key], f"merge_and_unload at init gives the original {key}", atol=ATOL)


def test_add_weighted_adapter_does_not_rewrite_the_base_again():
    """A combination of a PiSSA adapter is built on the current W_res (PEFT would re-run PiSSA on it)."""
    import megalora

    kind, kw = "net", dict(r=2, lora_alpha=4, target_modules=O.LINEAR_TARGETS, init_lora_weights="pissa")
    model = megalora.get_peft_model(O.base_model(kind), megalora.LoraConfig(**kw))
    residual = O.base_state(model)
    x = O.make_input(kind)
    model.add_weighted_adapter(["default"], [1.0], "same", combination_type="cat")
    O.assert_states_close(O.base_state(model), residual, "base after add_weighted_adapter", atol=0)
    model.base_model.set_adapter("same")
    O.assert_close(O.run(model, x), O.run(O.base_model(kind), x), "the combined adapter on W_res", atol=ATOL)
