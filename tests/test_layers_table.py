"""The tensor table of LoRA layers, layer registration, keyword checks and the explicit init seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests import gpt_utils as G
from tests.peft_oracle import LINEAR_TARGETS, base_model, make_input, megalora, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _lin(**overrides):
    kwargs = dict(target_modules=LINEAR_TARGETS, r=4, lora_alpha=8, init_lora_weights=False)
    kwargs.update(overrides)
    return megalora.LoraConfig(**kwargs)


def _adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------------- the table


def _table_problems(model) -> list[str]:
    """Where a layer's table and its parameters disagree (empty when they agree).

    Each parameter outside the base layer must appear exactly once over the
    adapters' tables, with the spec megatron-core's TP attributes on it give
    (the gated fc1 split included), the layer's TP group and its global name.
    """
    from megalora.collectives import group_size
    from megalora.sharding import param_shard_spec
    from megalora.layers import LoraLayer
    from megalora.layers.modules_to_save import ModulesToSaveWrapper
    from megalora.targeting import global_module_names

    problems = []
    names = global_module_names(model)
    for local, module in model.named_modules():
        if isinstance(module, LoraLayer):
            adapters, own = list(module.lora_A), [p for n, p in module.named_parameters()
                                                  if not n.startswith("base_layer.")]
            gated = "linear_fc1" in local and module.config.gated_linear_unit if hasattr(module, "config") else False
            if module.out_chunks != (2 if gated else 1):
                problems.append(f"{local}: out_chunks={module.out_chunks}")
        elif isinstance(module, ModulesToSaveWrapper):
            adapters, own = list(module.modules_to_save), list(module.modules_to_save.parameters())
        else:
            continue
        entries = [e for a in adapters for e in module.tensors(a)]
        ids = [id(e.param) for e in entries]
        if sorted(ids) != sorted(id(p) for p in own) or len(set(ids)) != len(ids):
            problems.append(f"{local}: table lists {len(ids)} tensors for {len(own)} parameters")
        for e in entries:
            chunks = getattr(module, "out_chunks", 1) if e.role != "saved" else e.spec.chunks
            if param_shard_spec(e.param, chunks) != e.spec and group_size(e.group) > 1:
                problems.append(f"{local}.{e.local_key}: spec {e.spec} but TP attributes say "
                                f"{param_shard_spec(e.param, chunks)}")
            if e.global_name != names[local]:
                problems.append(f"{local}: global name {e.global_name!r} != {names[local]!r}")
            if not e.local_key.startswith(("lora_", "modules_to_save.")):
                problems.append(f"{local}: local key {e.local_key}")
    return problems


def test_table_lists_every_plain_parameter_once():
    model = megalora.get_peft_model(base_model("net"), _lin(use_dora=True, modules_to_save=["head"]))
    model.add_adapter("b", _lin(lora_bias=True, target_modules=["q", "fc1"]))
    assert _table_problems(model.base_model.model) == []
    roles = {e.role for e in model.base_model.model.layers[0].q.tensors("b")}
    assert roles == {"A", "B", "B_bias"}
    assert {e.role for e in model.base_model.model.layers[0].q.tensors("default")} == {"A", "B", "magnitude"}


def _gpt_table_body():
    megalora.init_parallel(tensor_model_parallel_size=2, seed=1234)
    model = G.build_gpt(G.gpt_config(tp=2, gated=True))
    targets = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    peft = megalora.get_peft_model(model, megalora.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                              use_dora=True, modules_to_save=["output_layer"]))
    peft.add_adapter("b", megalora.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_bias=True))
    fc1 = next(m for n, m in peft.named_modules() if n.endswith("linear_fc1"))
    specs = {e.role: (e.spec.dim, e.spec.chunks) for a in ("default", "b") for e in fc1.tensors(a)}
    return _table_problems(peft.base_model.model), specs


def test_table_matches_megatron_tp_attributes(dist2):
    for problems, specs in dist2(_gpt_table_body):
        assert problems == []
        # Gated fc1 at TP=2: B, its bias and DoRA's magnitude are split in [gate; up] blocks.
        assert specs == {"A": (None, 1), "B": (0, 2), "B_bias": (0, 2), "magnitude": (0, 2)}


# ---------------------------------------------------------------------- register_lora_layer


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


# ---------------------------------------------------------------------- keywords


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


# ---------------------------------------------------------------------- seed


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
