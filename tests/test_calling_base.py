"""The variants for layers that keep their own forward (Transformer Engine's).

TE cannot be installed here, so the variants run on megatron-core's own
column/row-parallel layers: TP=2 (and TP=2 with SP) against TP=1, and the
extra communication is checked to be on ``[tokens, r]`` tensors only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

SEQ, BATCH, HIDDEN, FFN, R = 8, 2, 32, 48, 4


def _mlp(tp, sp, variant):
    import megalora
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megalora.distributed import ShardSpec
    from megalora.layers.parallel import LoraColumnParallelLinear, LoraRowParallelLinear
    from megalora.layers.te import LoraColumnCallingBase, LoraRowCallingBase

    megalora.init_parallel(tensor_model_parallel_size=tp, seed=7)
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, tensor_model_parallel_size=tp,
        sequence_parallel=sp, use_cpu_initialization=True, gradient_accumulation_fusion=False,
    )
    init = torch.nn.init.normal_
    fc1 = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init, bias=True, gather_output=False)
    fc2 = RowParallelLinear(FFN, HIDDEN, config=config, init_method=init, bias=True, input_is_parallel=True,
                            skip_bias_add=False)
    gen = torch.Generator().manual_seed(0)
    rank, world = ps.get_tensor_model_parallel_rank(), tp
    with torch.no_grad():
        for layer, dim in ((fc1, 0), (fc2, 1)):
            full = torch.randn(layer.output_size, layer.input_size, generator=gen) * 0.1
            layer.weight.copy_(ShardSpec(dim).local(full, rank, world))
    column, row = {
        "calling": (LoraColumnCallingBase, LoraRowCallingBase),
        "fused": (LoraColumnParallelLinear, LoraRowParallelLinear),
    }[variant]
    fc1, fc2 = column(fc1), row(fc2)
    for layer, name in ((fc1, "fc1"), (fc2, "fc2")):
        layer.update_layer("default", R, 8, init_lora_weights=False, lora_bias=True, seed=3, global_name=name)
    return fc1, fc2


def _forward(fc1, fc2, x, sp):
    from megatron.core import parallel_state as ps

    if sp:
        x = x.chunk(ps.get_tensor_model_parallel_world_size(), dim=0)[ps.get_tensor_model_parallel_rank()]
    h, _ = fc1(x)
    y, _ = fc2(F.gelu(h))
    return y


def _train(fc1, fc2, sp, steps=4):
    import megalora
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    params = [p for m in (fc1, fc2) for n, p in m.named_parameters() if "lora_" in n]
    for m in (fc1, fc2):
        m.get_base_layer().requires_grad_(False)
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    target = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        y = _forward(fc1, fc2, x, sp)
        if sp:
            y = gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=False)
        loss = (y - target).pow(2).mean()
        loss.backward()
        megalora.sync_lora_grads([fc1, fc2])
        opt.step()
        losses.append(loss.item())
    from megalora.distributed import gather_full

    group = ps.get_tensor_model_parallel_group()
    weights = {}
    for name, m in (("fc1", fc1), ("fc2", fc2)):
        weights[name + ".A"] = gather_full(m.lora_A["default"].weight.detach(), m.a_spec, group)
        weights[name + ".B"] = gather_full(m.lora_B["default"].weight.detach(), m.b_spec, group)
    return losses, weights


def _oracle_body(sp):
    from megalora.runtime import destroy_parallel

    ref_losses, ref_weights = _train(*_mlp(1, False, "calling"), sp=False)
    fused_losses, _ = _train(*_mlp(1, False, "fused"), sp=False)
    destroy_parallel()
    losses, weights = _train(*_mlp(2, sp, "calling"), sp=sp)
    for a, b, c in zip(ref_losses, fused_losses, losses):
        assert abs(a - b) <= 1e-6 * abs(a), "calling-base and fused variants disagree at TP=1"
        assert abs(a - c) <= 1e-5 * abs(a), f"TP=1 loss {a} vs TP=2 loss {c}"
    for key in ref_weights:
        assert (ref_weights[key] - weights[key]).abs().max() < 1e-5, key
    return losses


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_calling_base_variants_match_tp1(dist2, sp):
    dist2(_oracle_body, sp)


def _collective_body(sp):
    from megalora.distributed import count_collectives

    fc1, fc2 = _mlp(2, sp, "calling")
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    with count_collectives() as log:
        _forward(fc1, fc2, x, sp).sum().backward()
    for m in (fc1, fc2):
        m.enable_adapters(False)
    with count_collectives() as base:
        _forward(fc1, fc2, x, sp).sum().backward()
    extra = list(log.shapes)
    for item in base.shapes:
        extra.remove(item)
    return extra


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_calling_base_communicates_only_rank_sized_tensors(dist2, sp):
    for extra in dist2(_collective_body, sp):
        # Per layer: one collective (an all-reduce, in backward for the column
        # layer and in forward for the row layer), or under SP a gather/scatter
        # pair (forward and backward).
        assert len(extra) == (4 if sp else 2), extra
        assert all(shape[-1] == R for _, shape in extra), extra
