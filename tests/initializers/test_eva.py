"""EVA: PEFT 0.21.2's oracle on plain layers, and the rewritten config reloads.

The same weights and data go through PEFT's and megalora's
``initialize_lora_eva_weights``: the per-layer ranks (rank redistribution,
rank 0 included), the alphas, and the components (A) must match, then the
outputs and a few Adam steps. The TP/PP layouts are compared with world size 1
in ``test_calibration_tp.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

# Both libraries run the same float64/float32 ops on the same rows in the same order.
REL = 1e-5


class Branches(nn.Module):
    """``down(tanh(up(x))) + side(noise)``: low-rank inputs for up/down, isotropic for side."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)
        self.side = nn.Linear(48, 16)

    def forward(self, x, noise):
        return self.down(torch.tanh(self.up(x))) + self.side(noise)


def batches(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(8, 16, generator=gen)
    return [dict(x=torch.randn(2, 32, 8, generator=gen) @ mix + 0.01 * torch.randn(2, 32, 16, generator=gen),
                 noise=torch.randn(2, 32, 48, generator=gen)) for _ in range(n)]


def _pair(**extra):
    import peft

    import megalora

    torch.manual_seed(0)
    base = Branches()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["up", "down", "side"], init_lora_weights="eva", **extra)
    data = batches()
    fns = dict(prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False)
    p = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(eva_config=peft.EvaConfig(rho=2.0), **kwargs))
    peft.initialize_lora_eva_weights(p, data, **fns)
    m = megalora.get_peft_model(copy.deepcopy(base), megalora.LoraConfig(eva_config={"rho": 2.0}, **kwargs))
    megalora.initialize_lora_eva_weights(m, data, **fns)
    return p, m, base


def _close(a, b, what):
    diff = (a - b).abs().max().item()
    assert diff <= REL * max(a.abs().max().item(), 1e-12), f"{what}: differs by {diff}"


@pytest.mark.parametrize("extra", [{}, dict(rank_pattern={"side": 2}, alpha_pattern={"down": 5})])
def test_eva_matches_peft(extra):
    p, m, base = _pair(**extra)
    cp, cm = p.peft_config["default"], m.peft_config["default"]
    assert cm.rank_pattern == cp.rank_pattern and cm.alpha_pattern == cp.alpha_pattern
    assert set(cm.target_modules) == set(cp.target_modules)
    ranks = {}
    for name in ("up", "down", "side"):
        lp = p.get_submodule(f"base_model.model.{name}")
        lm = m.get_submodule(f"base_model.model.{name}")
        assert hasattr(lp, "lora_A") == hasattr(lm, "lora_A"), name
        if not hasattr(lp, "lora_A"):
            ranks[name] = 0
            continue
        ranks[name] = lm.r["default"]
        assert lm.r["default"] == lp.r["default"] and lm.scaling["default"] == pytest.approx(lp.scaling["default"])
        _close(lp.lora_A["default"].weight, lm.lora_A["default"].weight, f"{name} A (components)")
        assert not lm.lora_B["default"].weight.any()
    # The data makes the redistribution do something: ranks move, and side (isotropic) drops out.
    assert ranks["side"] == 0 and ranks["up"] != 4, ranks
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        _close(p(**x), m(**x), "output at init")
        _close(base(**x), m(**x), "output at init is the base's")
    losses = {}
    for lib, model in (("peft", p), ("megalora", m)):
        opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-2)
        losses[lib] = []
        for step, batch in enumerate(batches(3, seed=30)):
            opt.zero_grad()
            loss = model(**batch).square().mean()
            loss.backward()
            opt.step()
            losses[lib].append(loss.item())
    assert losses["peft"] == pytest.approx(losses["megalora"], rel=1e-5)


def test_eva_adapter_reloads_with_rewritten_ranks(tmp_path):
    """The saved config carries the new ranks; a fresh model loads the file at those ranks."""
    import megalora

    _, m, base = _pair()
    m.save_pretrained(str(tmp_path))
    loaded = megalora.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    x = batches(1, seed=6)[0]
    for name in ("up", "down"):
        with torch.no_grad():
            m.get_submodule(f"base_model.model.{name}").lora_B["default"].weight.normal_()
    m.save_pretrained(str(tmp_path / "trained"))
    loaded = megalora.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "trained"))
    with torch.no_grad():
        _close(m(**x), loaded(**x), "reloaded output")
    assert not hasattr(loaded.get_submodule("base_model.model.side"), "lora_A")
    assert loaded.get_submodule("base_model.model.up").r["default"] == m.get_submodule("base_model.model.up").r["default"]


def test_eva_needs_eva_init():
    import megalora

    m = megalora.get_peft_model(Branches(), megalora.LoraConfig(r=4, target_modules=["up"]))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        megalora.initialize_lora_eva_weights(m, batches(2))


def test_megatron_input_functions_read_s_b_h_through_the_token_mask():
    import megalora
    from megalora.initializers.eva_hooks import prepare_layer_inputs_fn_megatron, prepare_model_inputs_fn_megatron

    config = megalora.LoraConfig(r=2, target_modules=["x"], init_lora_weights="eva")
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    batch = dict(input_ids=torch.zeros(2, 3, dtype=torch.long), labels=labels,
                 attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]))
    idx = prepare_model_inputs_fn_megatron(batch, config)
    assert idx.tolist() == [[0, 0], [0, 2], [1, 1]]  # (b, s) of the kept tokens, PEFT's order
    x = torch.arange(3 * 2 * 4.0).view(3, 2, 4)  # megatron's [s, b, h]
    rows = prepare_layer_inputs_fn_megatron((x,), idx, "x")
    assert torch.equal(rows, torch.stack([x[0, 0], x[2, 0], x[1, 1]]))
    assert prepare_model_inputs_fn_megatron((batch["input_ids"], labels), config) is None  # not a dict: all tokens
    assert prepare_layer_inputs_fn_megatron((x,), None, "x").shape == (6, 4)


@pytest.mark.parametrize("sub,field", [({"rho": 0.5}, "rho"), ({"tau": 1.5}, "tau"), ({"rhoo": 2}, "rhoo")])
def test_bad_eva_config_raises_naming_the_field(sub, field):
    import megalora

    m = megalora.get_peft_model(Branches(), megalora.LoraConfig(r=4, target_modules=["up"], init_lora_weights="eva",
                                                                eva_config=sub))
    with pytest.raises(ValueError, match=field):
        megalora.initialize_lora_eva_weights(m, batches(2))
