"""Tests of megalora.layers.tensors: each LoRA layer's table of tensors against its parameters and TP attributes."""

from __future__ import annotations

import pytest

from tests import gpt_utils as G
from tests.peft_oracle import base_model, megalora
from tests.test_model import _lin

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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
