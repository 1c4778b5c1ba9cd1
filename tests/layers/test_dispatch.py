"""Tests of megalora.layers.dispatch: ``register_lora_layer`` adds module types, wins over built-ins, is removable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.peft_oracle import megalora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class MyProj(nn.Module):
    """A projection that is not an ``nn.Linear``: megalora does not know it."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * 0.1)

    def forward(self, x):
        return x @ self.weight.T


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = MyProj(6, 5)

    def forward(self, x):
        return self.proj(x)


def test_register_lora_layer_adds_a_module_type():
    from megalora.layers import LoraLinear

    config = megalora.LoraConfig(target_modules=["proj"], r=2, lora_alpha=4, init_lora_weights=False)
    with pytest.raises(TypeError, match="register_lora_layer"):
        megalora.get_peft_model(MyNet(), config)
    made = []

    def factory(module, ctx):
        made.append(ctx.global_name)
        return LoraLinear(module, global_name=ctx.global_name)

    remove = megalora.register_lora_layer(lambda m: isinstance(m, MyProj), factory)
    try:
        model = megalora.get_peft_model(MyNet(), config)
        reference = MyNet()
        linear = nn.Linear(6, 5, bias=False)
        linear.weight.data.copy_(reference.proj.weight)
        reference.proj = linear
        reference = megalora.get_peft_model(reference, megalora.LoraConfig(
            target_modules=["proj"], r=2, lora_alpha=4, init_lora_weights=False))
    finally:
        remove()
    assert made == ["proj"]
    x = torch.randn(3, 6)
    # Same weights and global name, so the same init: the custom layer computes what nn.Linear's does.
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert not torch.equal(model(x), model.base_model.model.proj.base_layer(x))


def test_registered_entry_wins_over_builtin_and_is_removable():
    from megalora.layers import LoraLinear, create_lora_layer

    class Marked(LoraLinear):
        pass

    remove = megalora.register_lora_layer(lambda m: isinstance(m, nn.Linear) and m.out_features == 5,
                                          lambda m, ctx: Marked(m, global_name=ctx.global_name))
    try:
        assert type(create_lora_layer(nn.Linear(3, 5), "x")) is Marked
        assert type(create_lora_layer(nn.Linear(3, 4), "y")) is LoraLinear
    finally:
        remove()
    assert type(create_lora_layer(nn.Linear(3, 5), "x")) is LoraLinear
    bad = megalora.register_lora_layer(lambda m: True, lambda m, ctx: nn.Identity())
    try:
        with pytest.raises(TypeError, match="not a megalora LoraLayer"):
            create_lora_layer(nn.Linear(3, 5), "x")
    finally:
        bad()
