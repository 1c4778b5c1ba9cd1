"""LoRA on grouped expert weights (``target_parameters``) against LoRA on ``SequentialMLP`` experts.

megatron-core's ``GroupedMLP`` cannot be constructed without ``grouped_gemm``
(and TE needs a GPU), so the grouped side is a real ``GroupedMLP`` object whose
``weight1`` / ``weight2`` are filled in megatron's grouped layout (``[E, hidden,
ffn]`` blocks / ``[E·ffn, hidden]``) from a real ``SequentialMLP``'s experts, and
built without its ``__init__`` (which only asserts ``grouped_gemm`` and allocates
those two tensors). megalora's grouped math runs on plain tensors in that layout.
At every layout (world size 1, and expert-TP 2 on 2 ranks) the grouped adapter
must equal the sequential one: same init, outputs, gradients, adapter files
(either loads into the other), merge.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

E, HIDDEN, FFN, R = 4, 32, 24, 4
# Both sides run the same GEMMs on the same rows in fp32; only the summation
# order inside a matmul may differ (x @ W vs F.linear(x, W^T)): a few ulps.
TOL = 1e-5


def _config(etp: int, gated: bool):
    from megatron.core.transformer import TransformerConfig

    from megalora.megatron_config import cpu_friendly_config_kwargs

    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN, num_moe_experts=E,
        moe_ffn_hidden_size=FFN, expert_tensor_parallel_size=etp, gated_linear_unit=gated,
        activation_func=F.silu if gated else F.gelu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, **cpu_friendly_config_kwargs(),
    )


def _holder(experts):
    """The experts under the name ``experts``, in a megatron module, as in a MoE layer (``mlp.experts``)."""
    from megatron.core.transformer.module import MegatronModule

    holder = MegatronModule(config=experts.config)
    holder.experts = experts
    return holder


def _sequential(config):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    pg = ProcessGroupCollection.use_mpu_process_groups()
    return SequentialMLP(E, config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                         pg_collection=pg)


def grouped_from_sequential(seq):
    """A ``GroupedMLP`` holding ``seq``'s local expert weights in megatron's grouped layout."""
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.moe.experts import GroupedMLP

    grouped = GroupedMLP.__new__(GroupedMLP)
    MegatronModule.__init__(grouped, config=seq.config)
    grouped.num_local_experts = seq.num_local_experts
    grouped.ep_group, grouped.tp_group, grouped.dp_group = seq.ep_group, seq.tp_group, seq.dp_group
    grouped.expert_parallel = seq.config.expert_model_parallel_size > 1
    fc1 = torch.stack([e.linear_fc1.weight.detach().t() for e in seq.local_experts])  # [E, hidden, ffn_k]
    fc2 = torch.cat([e.linear_fc2.weight.detach().t() for e in seq.local_experts])  # [E·ffn_k, hidden]
    grouped.weight1 = nn.Parameter(fc1.reshape(seq.config.hidden_size, -1).clone())
    grouped.weight2 = nn.Parameter(fc2.clone())
    for w in (grouped.weight1, grouped.weight2):
        w.allreduce = not grouped.expert_parallel
    return grouped


def _lora_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _lora_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:4]
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _body(etp: int, gated: bool, tmp: str):
    import torch.distributed as dist

    import megalora
    from megalora.layers.grouped import LoraExpertColumn, LoraGroupedMLP

    megalora.init_parallel(tensor_model_parallel_size=etp, seed=1234)
    rank = dist.get_rank()
    config = _config(etp, gated)
    torch.manual_seed(0)
    seq = _holder(_sequential(config))
    grouped = _holder(grouped_from_sequential(seq.experts))
    lora = dict(r=R, lora_alpha=8, init_lora_weights=False)
    seq_peft = megalora.get_peft_model(seq, megalora.LoraConfig(target_modules=["linear_fc1", "linear_fc2"], **lora))
    # Two spellings of the same weights: the canonical expert name and GroupedMLP's own parameter name.
    grp_peft = megalora.get_peft_model(
        grouped, megalora.LoraConfig(
            target_parameters=["experts.linear_fc1.weight", "mlp.experts.weight2|experts.weight2"], **lora))
    wrapper = grp_peft.base_model.model.experts
    assert isinstance(wrapper, LoraGroupedMLP)
    assert isinstance(wrapper.local_experts[2].linear_fc1, LoraExpertColumn)
    out = {"init": _max_diff(_lora_state(seq_peft), _lora_state(grp_peft))}

    gen = torch.Generator().manual_seed(5)
    counts = [3, 0, 5, 2]  # an expert without tokens, too
    x = torch.randn(sum(counts), HIDDEN, generator=gen)
    probs = torch.rand(sum(counts), generator=gen)
    grad = torch.randn(sum(counts), HIDDEN, generator=gen)
    results = []
    for model in (seq_peft, grp_peft):
        xi = x.clone().requires_grad_(True)
        y, _ = model.base_model.model.experts(xi, torch.tensor(counts), probs)
        (y * grad).sum().backward()
        results.append((y.detach(), xi.grad.detach(), _lora_grads(model)))
    out["output"] = (results[0][0] - results[1][0]).abs().max().item()
    out["input_grad"] = (results[0][1] - results[1][1]).abs().max().item()
    out["lora_grads"] = _max_diff(results[0][2], results[1][2])
    out["lora_grad_norm"] = sum(g.norm().item() for g in results[1][2].values())

    # Adapter files: same keys and tensors; the sequential file loads into the grouped model.
    seq_dir, grp_dir = os.path.join(tmp, "seq"), os.path.join(tmp, "grp")
    with torch.no_grad():
        for p in seq_peft.parameters():
            if p.requires_grad:
                p.add_(0.01)
    seq_peft.save_pretrained(seq_dir)
    grp_peft.save_pretrained(grp_dir)
    dist.barrier()
    from safetensors.torch import load_file

    files = [load_file(os.path.join(d, "adapter_model.safetensors")) for d in (seq_dir, grp_dir)]
    out["file_keys"] = sorted(files[0]) == sorted(files[1]) and len(files[0]) == 2 * 2 * E
    # The SequentialMLP file (target_modules=linear_fc1/fc2) also builds an adapter on fresh grouped experts.
    fresh = megalora.PeftModel.from_pretrained(_holder(grouped_from_sequential(seq.experts)), seq_dir).eval()
    grp_peft.load_adapter(seq_dir, adapter_name="from_seq")
    grp_peft.set_adapter("from_seq")
    seq_peft.eval(), grp_peft.eval()
    with torch.no_grad():
        y_seq = seq_peft.base_model.model.experts(x, torch.tensor(counts), probs)[0]
        y_grp = grp_peft.base_model.model.experts(x, torch.tensor(counts), probs)[0]
        out["loaded"] = (y_seq - y_grp).abs().max().item()
        y_fresh = fresh.base_model.model.experts(x, torch.tensor(counts), probs)[0]
        out["fresh"] = (y_seq - y_fresh).abs().max().item()
        w1 = wrapper.base_layer.weight1.detach().clone()
        grp_peft.merge_adapter()
        y_merged = grp_peft.base_model.model.experts(x, torch.tensor(counts), probs)[0]
        out["merged"] = (y_merged - y_grp).abs().max().item()
        out["weight_moved"] = (wrapper.base_layer.weight1 - w1).abs().max().item()
        grp_peft.unmerge_adapter()
        out["unmerged"] = (wrapper.base_layer.weight1 - w1).abs().max().item()
    # Adapter-only distributed checkpoint: saved from SequentialMLP, loaded into the grouped experts.
    from megalora.dist_checkpoint import (adapter_sharded_state_dict, load_adapter_dist_checkpoint,
                                          save_adapter_dist_checkpoint)

    ckpt = os.path.join(tmp, "dist_ckpt")
    seq_keys = {v.key for v in adapter_sharded_state_dict(seq_peft, ["default"]).values()}
    grp_keys = {v.key for v in adapter_sharded_state_dict(grp_peft, ["default"]).values()}
    out["dist_keys"] = seq_keys == grp_keys and len(seq_keys) == 4
    save_adapter_dist_checkpoint(seq_peft, ckpt, ["default"])
    with torch.no_grad():
        for name, p in grp_peft.named_parameters():
            if ".default." in name:
                p.zero_()
    load_adapter_dist_checkpoint(grp_peft, ckpt, ["default"])
    out["dist_loaded"] = _max_diff({k.replace("default", "x"): v for k, v in _lora_state(seq_peft).items()
                                    if ".default." in k},
                                   {k.replace("default", "x"): v for k, v in _lora_state(grp_peft).items()
                                    if ".default." in k})
    # The merged export: the same files (per-expert SequentialMLP names) from both.
    merged = [os.path.join(tmp, f"merged_{n}") for n in ("seq", "grp")]
    megalora.export_merged(seq_peft, merged[0], progressbar=False)
    megalora.export_merged(grp_peft, merged[1], adapter_names=["default"], progressbar=False)
    dist.barrier()
    if rank == 0:
        exports = [load_file(os.path.join(d, "model.safetensors")) for d in merged]
        out["export_keys"] = sorted(exports[0]) == sorted(exports[1]) and len(exports[0]) == 2 * E
        out["export"] = _max_diff(exports[0], exports[1])
    # PEFT's ParamWrapper refuses DoRA: so do grouped experts, on every rank, with the field named.
    try:
        megalora.get_peft_model(_holder(grouped_from_sequential(seq.experts)),
                                megalora.LoraConfig(target_parameters=["experts.weight1"], use_dora=True))
    except ValueError as exc:
        out["dora_error"] = str(exc)
    base = grp_peft.unload()
    out["unloaded"] = type(base.experts).__name__
    return out


@pytest.mark.parametrize("etp,gated", [(1, False), (2, True)])
def test_grouped_equals_sequential(ranks, tmp_path, etp, gated):
    outs = ranks(etp, _body, etp, gated, str(tmp_path))
    out0 = outs[0]
    for out in outs:
        assert out["init"] == 0.0, out
        assert out["output"] < TOL and out["input_grad"] < TOL and out["lora_grads"] < TOL, out
        assert out["lora_grad_norm"] > 0.1, out  # the gradients compared are not all zero
        assert out["file_keys"], out
        assert out["loaded"] < TOL and out["fresh"] < TOL and out["merged"] < TOL and out["unmerged"] < 1e-6, out
        assert out["weight_moved"] > 1e-3, out  # merging changed GroupedMLP's own weight1
        assert out["unloaded"] == "GroupedMLP", out
        assert out["dist_keys"] and out["dist_loaded"] == 0.0, out
        assert "use_dora=True is not supported on grouped expert weights" in out.get("dora_error", ""), out
    assert out0["export_keys"] and out0["export"] < TOL, out0


def _names_body():
    """``target_parameters`` on a tiny megatron-core MoE GPT (SequentialMLP experts, shared expert)."""
    import megalora
    from megalora.layers import LoraLayer
    from tests.moe_utils import build_moe_gpt, moe_config

    megalora.init_parallel(1, seed=1234)
    config = moe_config()
    out = {}
    for key, entries in {"canonical": ["experts.linear_fc1.weight"],
                         "regex": [r"decoder\.layers\.1\.mlp\.experts\.local_experts\.[02]\.linear_fc2\.weight"],
                         "dense": ["self_attention.linear_qkv.weight"]}.items():
        model = megalora.get_peft_model(build_moe_gpt(config), megalora.LoraConfig(r=2, target_parameters=entries))
        out[key] = sorted(layer.global_name for layer in model.modules() if isinstance(layer, LoraLayer))
    try:
        megalora.get_peft_model(build_moe_gpt(config), megalora.LoraConfig(r=2, target_parameters=["experts.w9"]))
    except ValueError as exc:
        out["error"] = str(exc)
    return out


def test_target_parameters_names(ranks):
    out = ranks(1, _names_body)[0]
    experts = [f"decoder.layers.{l}.mlp.experts.local_experts.{e}.linear_fc1" for l in range(2) for e in range(4)]
    assert out["canonical"] == experts, out["canonical"]  # routed experts only, not shared_experts.linear_fc1
    assert out["regex"] == [f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc2" for e in (0, 2)]
    assert out["dense"] == [f"decoder.layers.{l}.self_attention.linear_qkv" for l in range(2)]
    assert "target_parameters=['experts.w9']" in out["error"], out["error"]
