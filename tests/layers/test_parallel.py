"""The parallel oracle for tensor-parallel LoRA: TP=2 (and TP=2 with SP) against TP=1.

Each body runs on 2 gloo ranks. It first trains a TP=1 reference (the two
ranks are then plain data-parallel replicas), then rebuilds the same model at
TP=2 from the reference's full weights, with the same LoRA config, and
compares losses and gathered LoRA weights after several Adam steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests import gpt_utils as G

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _lora_config(**overrides):
    import megalora

    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0)
    kwargs.update(overrides)
    return megalora.LoraConfig(**kwargs)


def _build(tp, sp, gated, full=None, **lora):
    import megalora

    megalora.init_parallel(tensor_model_parallel_size=tp, seed=1234)
    model = G.build_gpt(G.gpt_config(tp=tp, sp=sp, gated=gated))
    if full is not None:
        G.load_full_state(model, full, gated=gated)
    full_base = {k: v.detach().clone() for k, v in model.named_parameters()}
    return megalora.get_peft_model(model, _lora_config(**lora)), full_base


def _adapter(peft_model):
    from megalora.checkpoint import adapter_state_dict

    return adapter_state_dict(peft_model, "default")


def _assert_close_dicts(a, b, tol, what):
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())[:4]}"
    for key in a:
        diff = (a[key] - b[key]).abs().max().item()
        assert diff <= tol, f"{what}: {key} differs by {diff}"


def _oracle_body(sp, gated, lora, steps=5):
    from megalora.parallel_start import destroy_parallel

    ref, full = _build(1, False, gated, **lora)
    ref_init = _adapter(ref)
    ref_losses = G.train(ref, G.batches(1) * steps)
    ref_final = _adapter(ref)
    destroy_parallel()

    par, _ = _build(2, sp, gated, full=full, **lora)
    par_init = _adapter(par)
    par_losses = G.train(par, G.batches(1) * steps)
    par_final = _adapter(par)

    # A and B are drawn in full and sliced: bit-identical. DoRA's magnitude is a
    # norm of the base weight, summed in another order when its input is sharded.
    factors = lambda d: {k: v for k, v in d.items() if "magnitude" not in k}  # noqa: E731
    _assert_close_dicts(factors(ref_init), factors(par_init), 0.0, "init (TP-invariant)")
    _assert_close_dicts(ref_init, par_init, 1e-6, "init (TP-invariant)")
    for step, (a, b) in enumerate(zip(ref_losses, par_losses)):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: TP=1 loss {a} vs TP=2 loss {b}"
    _assert_close_dicts(ref_final, par_final, 1e-5, "LoRA weights after training")
    assert ref_losses[-1] < ref_losses[0], "training did not lower the loss"
    return par_losses


@pytest.mark.parametrize(
    "sp,gated,lora",
    [
        (False, False, {}),
        (True, False, {}),
        # Not on linear_qkv: a key bias has an exactly zero gradient (softmax is
        # shift-invariant), and Adam would amplify the rounding noise in it.
        (False, True, {"lora_bias": True, "bias": "lora_only", "target_modules": TARGETS[1:]}),
        (True, True, {"use_rslora": True, "rank_pattern": {"linear_fc2": 2}}),
        (False, False, {"use_dora": True}),
        (True, True, {"use_dora": True}),
    ],
    ids=["tp2", "tp2-sp", "tp2-gated-lorabias", "tp2-sp-gated-rslora", "tp2-dora", "tp2-sp-gated-dora"],
)
def test_tp2_matches_tp1(dist2, sp, gated, lora):
    losses = dist2(_oracle_body, sp, gated, lora)
    assert losses[0] == losses[1]


def _dropout_body(sp):
    from megalora.layers.parallel import LoraColumnParallelLinear, LoraRowParallelLinear

    model, _ = _build(2, sp, False, lora_dropout=0.3)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)
    G.train(model, G.batches(3))
    checked = 0
    for _, layer in model.base_model.lora_layers():
        if isinstance(layer, LoraColumnParallelLinear):
            replicated = layer.lora_A["default"].weight.detach()
        elif isinstance(layer, LoraRowParallelLinear):
            replicated = layer.lora_B["default"].weight.detach()
        else:
            continue
        copies = [torch.empty_like(replicated) for _ in range(2)]
        dist.all_gather(copies, replicated.contiguous())
        assert torch.equal(copies[0], copies[1]), "a replicated LoRA factor drifted apart across TP ranks"
        checked += 1
    return checked


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_dropout_keeps_replicas_identical(dist2, sp):
    assert dist2(_dropout_body, sp) == [8, 8]


def _merge_body(use_dora):
    model, _ = _build(2, False, True, use_dora=use_dora)
    G.train(model, G.batches(2))
    tokens = G.batches(1, seed=9)[0][0]
    model.eval()
    with torch.no_grad():
        unmerged = G.logits(model, tokens)
        bases = {n: l.get_base_layer().weight.detach().clone() for n, l in model.base_model.lora_layers()}
        model.merge_adapter()
        merged = G.logits(model, tokens)
        model.unmerge_adapter()
        restored = max(
            (l.get_base_layer().weight - bases[n]).abs().max().item() for n, l in model.base_model.lora_layers()
        )
        again = G.logits(model, tokens)
        plain = model.merge_and_unload()
        after_unload = G.logits(plain, tokens)
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    kinds = {type(m) for m in plain.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
    assert kinds == {ColumnParallelLinear, RowParallelLinear}
    return (
        (merged - unmerged).abs().max().item(),
        restored,
        (again - unmerged).abs().max().item(),
        (after_unload - unmerged).abs().max().item(),
    )


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_under_tp(dist2, use_dora):
    for merged, restored, again, unloaded in dist2(_merge_body, use_dora):
        assert merged < 1e-5 and unloaded < 1e-5, (merged, unloaded)
        assert restored < 1e-6
        assert again < 1e-6


def _collectives_body(sp):
    model, _ = _build(2, sp, True)
    base, lora, sync = G.step_collectives(model, G.batches(1)[0])
    return dict(base.calls), dict(base.bytes), dict(lora.calls), dict(lora.bytes), sync.total_calls


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_lora_adds_no_collective(dist2, sp):
    for base_calls, base_bytes, lora_calls, lora_bytes, sync_calls in dist2(_collectives_body, sp):
        assert lora_calls == base_calls, f"LoRA changed the collectives: {base_calls} -> {lora_calls}"
        assert lora_bytes == base_bytes, f"LoRA changed the bytes moved: {base_bytes} -> {lora_bytes}"
        assert sync_calls == 1, "the replicated grads should be reduced in one coalesced all-reduce"


def _tp_attrs_body():
    model, _ = _build(2, False, True)
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            out[name] = (
                getattr(param, "tensor_model_parallel", None),
                getattr(param, "partition_dim", None),
                getattr(param, "average_gradients_across_tp_domain", False),
            )
    frozen = all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    return out, frozen


def test_megatron_attributes(dist2):
    attrs, frozen = dist2(_tp_attrs_body)[0]
    assert frozen
    for name, (tmp, dim, avg) in attrs.items():
        column = any(k in name for k in ("linear_qkv", "linear_fc1"))
        if (".lora_B." in name) == column:  # sharded: column B, row A
            assert tmp is True and dim == (0 if column else 1) and not avg, name
        else:
            assert tmp is False and avg, name


def _ddp_body(sp, lora):
    """Training through megatron-core's DDP and finalize_model_grads, no megalora call in the loop."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megalora.parallel_start import destroy_parallel

    data = G.batches(1) * 5
    ref, full = _build(1, False, True, **lora)
    ref_losses = G.train(ref, data)
    ref_final = _adapter(ref)
    destroy_parallel()

    par, _ = _build(2, sp, True, full=full, **lora)
    ddp = DistributedDataParallel(par.base_model.model.config, DistributedDataParallelConfig(), par)
    params = [p for p in ddp.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for batch in data:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = G.lm_loss(ddp, batch)
        loss.backward()
        finalize_model_grads([ddp])
        for p in params:
            p.grad = p.main_grad
        opt.step()
        losses.append(loss.item())
    for step, (a, b) in enumerate(zip(ref_losses, losses)):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: TP=1 loss {a} vs DDP TP=2 loss {b}"
    _assert_close_dicts(ref_final, _adapter(par), 1e-5, "LoRA weights after DDP training")
    return losses


@pytest.mark.parametrize(
    "sp,lora", [(False, {}), (True, {"use_dora": True})], ids=["tp2", "tp2-sp-dora"]
)
def test_megatron_ddp_and_finalize_model_grads(dist2, sp, lora):
    dist2(_ddp_body, sp, lora)
