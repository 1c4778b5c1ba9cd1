"""CorDA: PEFT 0.21.2's oracle on plain layers.

The same weights and calibration data go through PEFT's and megalora's
``preprocess_corda`` + ``get_peft_model``. SVD signs are free, so the compared
quantities are sign-invariant: the rewritten base ``W_res`` and
``scaling·B@A`` (a sign flip of a singular pair flips a column of B and the
matching row of A together). Then outputs at init and a few Adam steps.
The TP/PP layouts are compared with world size 1 in ``test_calibration_tp.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

# fp32 SVD/inverse on 16-24 wide matrices: the two libraries run the same ops in the
# same order, so they agree to a few ulps; 1e-5 relative is far below any real change.
REL = 1e-5


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _data(n=6, seq=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, seq, 16, generator=gen) for _ in range(n)]


def peft_corda():
    """PEFT's corda module. It imports ``attr.dataclass`` (the attrs package, not a PEFT dependency
    and not installed here); the stdlib dataclass is what it needs for its one record type."""
    if "attr" not in sys.modules and importlib.util.find_spec("attr") is None:
        shim = types.ModuleType("attr")
        shim.dataclass = dataclasses.dataclass
        sys.modules["attr"] = shim
    import peft.tuners.lora.corda

    return peft.tuners.lora.corda


def _pair(method, **extra):
    import peft

    import megalora

    torch.manual_seed(0)
    base = Tiny()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights="corda", **extra)
    data = _data()
    models = {}
    for lib, cfg in (("peft", peft.LoraConfig(corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method),
                                             **kwargs)),
                     ("megalora", megalora.LoraConfig(corda_config={"corda_method": method}, **kwargs))):
        model = copy.deepcopy(base)
        pre = peft_corda().preprocess_corda if lib == "peft" else megalora.preprocess_corda

        def run_model(model=model):
            for x in data:
                model(x)

        pre(model, cfg, run_model=run_model)
        models[lib] = (peft.get_peft_model if lib == "peft" else megalora.get_peft_model)(model, cfg)
    return models["peft"], models["megalora"], base


def _close(a, b, what):
    diff = (a - b).abs().max().item()
    assert diff <= REL * max(a.abs().max().item(), 1e-12), f"{what}: differs by {diff}"


def _layer(model, name):
    return model.get_submodule(f"base_model.model.{name}")


@pytest.mark.parametrize("method,extra", [("ipm", {}), ("kpm", {}),
                                          ("ipm", dict(rank_pattern={"down": 2}, alpha_pattern={"up": 3}))])
def test_corda_matches_peft(method, extra):
    p, m, base = _pair(method, **extra)
    x = _data(1, seed=9)[0]
    for name in ("up", "down"):
        lp, lm = _layer(p, name), _layer(m, name)
        _close(lp.get_base_layer().weight, lm.get_base_layer().weight, f"{name} W_res")
        dp = lp.scaling["default"] * lp.lora_B["default"].weight @ lp.lora_A["default"].weight
        dm = lm.scaling["default"] * lm.lora_B["default"].weight @ lm.lora_A["default"].weight
        _close(dp, dm, f"{name} scaling*B@A")
        assert lm.r["default"] == lp.r["default"]
        # The init keeps the function: W_res + scaling·B@A is the original weight.
        _close(getattr(base, name).weight, lm.get_base_layer().weight + dm, f"{name} W_res + BA = W")
    with torch.no_grad():
        _close(p(x), m(x), "output at init")
        _close(base(x), m(x), "output at init vs base")
    losses = {}
    for lib, model in (("peft", p), ("megalora", m)):
        opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-2)
        losses[lib] = []
        for step in range(3):
            opt.zero_grad()
            loss = model(_data(1, seed=20 + step)[0]).square().mean()
            loss.backward()
            opt.step()
            losses[lib].append(loss.item())
    # Adam divides by sqrt(v): ulp-level factor differences grow a little per step.
    assert losses["peft"] == pytest.approx(losses["megalora"], rel=1e-4)


def test_corda_without_preprocess_raises():
    import megalora

    cfg = megalora.LoraConfig(r=4, target_modules=["up"], init_lora_weights="corda")
    with pytest.raises(ValueError, match="preprocess_corda"):
        megalora.get_peft_model(Tiny(), cfg)


def test_corda_bad_method_raises():
    import megalora

    cfg = megalora.LoraConfig(r=4, target_modules=["up"], init_lora_weights="corda",
                              corda_config={"corda_method": "xyz"})
    with pytest.raises(ValueError, match="corda_method"):
        megalora.preprocess_corda(Tiny(), cfg, run_model=lambda: None)


def test_corda_rank_mismatch_between_preprocess_and_injection_raises():
    import megalora

    model = Tiny()
    kwargs = dict(target_modules=["up"], init_lora_weights="corda")
    megalora.preprocess_corda(model, megalora.LoraConfig(r=4, **kwargs), run_model=lambda: [model(x) for x in _data()])
    with pytest.raises(ValueError, match="same config"):
        megalora.get_peft_model(model, megalora.LoraConfig(r=2, **kwargs))
