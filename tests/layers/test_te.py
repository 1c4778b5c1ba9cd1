"""The variants for layers that keep their own forward (Transformer Engine's).

TE cannot be installed here, so the variants run on megatron-core's own
column/row-parallel layers: TP=2 (and TP=2 with SP) against TP=1, and the
extra communication is checked to be on ``[tokens, r]`` tensors only. Every
variant, calling-base and fused, returns the ``(output, bias)`` pair a plain
layer would, for both ``skip_bias_add`` values.
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

    from megalora.sharding import ShardSpec
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
    fc1, fc2 = column(fc1, global_name="fc1"), row(fc2, global_name="fc2")
    lora = megalora.LoraConfig(r=R, lora_alpha=8, init_lora_weights=False, lora_bias=True,
                               target_modules=["fc1", "fc2"])
    for layer in (fc1, fc2):
        layer.update_layer("default", lora, seed=3)
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
    from megalora.sharding import gather_full

    group = ps.get_tensor_model_parallel_group()
    weights = {}
    for name, m in (("fc1", fc1), ("fc2", fc2)):
        weights[name + ".A"] = gather_full(m.lora_A["default"].weight.detach(), m.a_spec, group)
        weights[name + ".B"] = gather_full(m.lora_B["default"].weight.detach(), m.b_spec, group)
    return losses, weights


def _oracle_body(sp):
    from megalora.parallel_start import destroy_parallel

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
    from megalora.testing.collective_counter import count_collectives

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


# ------------------------------------------------- returned (output, bias) pairs

COLUMN_VARIANTS = ("column-calling", "column-fused", "layernorm-column-calling")
ROW_VARIANTS = ("row-calling", "row-fused")


def _norm_column_class():
    """megatron-core's column-parallel layer with a fused input LayerNorm, as TE's layernorm-column layer.

    It stands in for ``TELayerNormColumnParallelLinear`` (TE cannot be installed
    here): the base layer normalises its own input, so LoRA must read the norm
    of ``x`` through :func:`~megalora.layers.te.layernorm_of`.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class NormColumn(ColumnParallelLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            gen = torch.Generator().manual_seed(11)
            self.eps = 1e-5
            self.layer_norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(self.input_size, generator=gen))
            self.layer_norm_bias = torch.nn.Parameter(0.1 * torch.randn(self.input_size, generator=gen))

        def forward(self, x, *args, **kwargs):
            h = F.layer_norm(x, (x.shape[-1],), self.layer_norm_weight, self.layer_norm_bias, self.eps)
            return super().forward(h, *args, **kwargs)

    return NormColumn


def _single_layer(variant, sp, skip_bias_add, lora_bias):
    """One LoRA layer at this TP size, and the full tensors a plain reference needs."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megalora import LoraConfig
    from megalora.sharding import gather_full
    from megalora.layers.parallel import LoraColumnParallelLinear, LoraRowParallelLinear
    from megalora.layers.te import LoraColumnCallingBase, LoraRowCallingBase, layernorm_of

    tp = ps.get_tensor_model_parallel_world_size()
    rank, group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, tensor_model_parallel_size=tp,
        sequence_parallel=sp, use_cpu_initialization=True, gradient_accumulation_fusion=False,
        add_bias_linear=True,
    )
    column = not variant.startswith("row")
    common = dict(config=config, init_method=torch.nn.init.normal_, bias=config.add_bias_linear,
                  skip_bias_add=skip_bias_add)
    if column:
        cls = _norm_column_class() if variant.startswith("layernorm") else ColumnParallelLinear
        base = cls(HIDDEN, FFN, gather_output=False, **common)
    else:
        base = RowParallelLinear(FFN, HIDDEN, input_is_parallel=True, **common)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(base.output_size, base.input_size, generator=gen) * 0.1
    bias = torch.randn(base.output_size, generator=gen) * 0.1
    with torch.no_grad():
        base.weight.copy_(_local(0 if column else 1, weight, rank, tp))
        base.bias.copy_(_local(0 if column else None, bias, rank, tp))
    if variant == "layernorm-column-calling":
        layer = LoraColumnCallingBase(base, global_name=variant, input_norm=layernorm_of(base))
    else:
        layer = {
            "column-calling": LoraColumnCallingBase, "column-fused": LoraColumnParallelLinear,
            "row-calling": LoraRowCallingBase, "row-fused": LoraRowParallelLinear,
        }[variant](base, global_name=variant)
    lora = LoraConfig(r=R, lora_alpha=8, init_lora_weights=False, lora_bias=lora_bias, target_modules=[variant])
    layer.update_layer("default", lora, seed=3)
    b_mod = layer.lora_B["default"]
    if lora_bias:
        # B's bias starts at zero; give it values that a double count or a drop would show.
        full_lb = torch.randn(base.output_size, generator=gen)
        with torch.no_grad():
            b_mod.bias.copy_(_local(0 if column else None, full_lb, rank, tp))
    ref = {
        "weight": weight, "bias": bias,
        "A": gather_full(layer.lora_A["default"].weight.detach(), layer.a_spec, group),
        "B": gather_full(b_mod.weight.detach(), layer.b_spec, group),
        "lora_bias": full_lb if lora_bias else None,
        "scaling": layer.scaling["default"],
        "norm": (base.layer_norm_weight.detach(), base.layer_norm_bias.detach(), base.eps)
        if variant.startswith("layernorm") else None,
    }
    return layer, ref


def _local(dim, full, rank, world):
    """This rank's slice of ``full`` split on ``dim`` (whole for ``None``), by the library's own rule."""
    from megalora.sharding import ShardSpec

    return ShardSpec(dim).local(full, rank, world)


def _plain_reference(ref, x, skip_bias_add):
    """``(output, bias)`` that a TP=1 layer returns, computed with plain torch."""
    h = x if ref["norm"] is None else F.layer_norm(x, (x.shape[-1],), *ref["norm"][:2], ref["norm"][2])
    lora = F.linear(F.linear(h, ref["A"]), ref["B"], ref["lora_bias"]) * ref["scaling"]
    out = F.linear(h, ref["weight"]) + lora
    if skip_bias_add:
        return out, ref["bias"]
    return out + ref["bias"], None


def _gather_last(t, group):
    from megalora.sharding import ShardSpec, gather_full

    return gather_full(t.contiguous(), ShardSpec(t.dim() - 1), group)


def _bias_pair_body(sp):
    import megalora
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    megalora.init_parallel(tensor_model_parallel_size=2, seed=7)
    rank, group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    checked, failures = [], []
    for variant in COLUMN_VARIANTS + ROW_VARIANTS:
        column = not variant.startswith("row")
        for skip_bias_add in (False, True):
            for lora_bias in (False, True):
                layer, ref = _single_layer(variant, sp, skip_bias_add, lora_bias)
                gen = torch.Generator().manual_seed(9)
                x = torch.randn(SEQ, BATCH, HIDDEN if column else FFN, generator=gen)
                x_local = x if column else x.chunk(2, dim=-1)[rank]
                if sp and column:
                    x_local = x_local.chunk(2, dim=0)[rank]
                with torch.no_grad():
                    out, bias = layer(x_local)
                    if column:
                        out = _gather_last(out, group)
                        bias = None if bias is None else _gather_last(bias, group)
                    elif sp:
                        out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
                want_out, want_bias = _plain_reference(ref, x, skip_bias_add)
                what = f"{variant} skip_bias_add={skip_bias_add} lora_bias={lora_bias}"
                checked.append(what)
                # fp32, the same sums split over 2 ranks: rounding only (~1e-7 relative on values ~1).
                if not torch.allclose(out, want_out, rtol=1e-5, atol=1e-5):
                    failures.append(f"{what}: output off by {(out - want_out).abs().max().item():.3g}")
                if want_bias is None and bias is not None:
                    failures.append(f"{what}: returned a bias where the layer adds its own")
                elif want_bias is not None and (bias is None or not torch.equal(bias, want_bias)):
                    failures.append(f"{what}: returned bias {'None' if bias is None else 'wrong'}, not the base bias")
    return checked, failures


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_every_variant_returns_the_right_output_and_bias(dist2, sp):
    """Column, row and layernorm-column variants (calling-base and fused), both ``skip_bias_add``
    values, LoRA bias on and off, ``add_bias_linear=True``: the returned ``(output, bias)`` pair
    must be what a plain TP=1 layer returns."""
    for checked, failures in dist2(_bias_pair_body, sp):
        assert not failures, "\n".join(failures)
        assert len(checked) == len(COLUMN_VARIANTS + ROW_VARIANTS) * 4
