"""The parallel layers' one-node LoRA path against the composed autograd ops it replaces.

``_FrozenLinearLora`` computes a frozen base linear plus one LoRA adapter with a
hand-written backward. The TP oracle compares TP=2 with TP=1, which both take
this path, so a mistake made alike at every TP size would pass it; these tests
compare the path with plain autograd instead.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import gpt_utils as G


def _composed(x, weight, bias, a, b, scale, a_grad_scale, b_grad_scale):
    from megalora.grad_sync import scale_grad

    h = F.linear(x, scale_grad(a, a_grad_scale))
    return F.linear(x, weight, bias) + F.linear(h, scale_grad(b, b_grad_scale)) * scale


@pytest.mark.parametrize("x_grad,with_bias", list(itertools.product([True, False], [True, False])))
def test_function_matches_autograd(x_grad, with_bias):
    from megalora.layers.parallel import _FrozenLinearLora

    gen = torch.Generator().manual_seed(0)
    kw = dict(dtype=torch.float64, generator=gen)
    x = torch.randn(37, 12, **kw).requires_grad_(x_grad)
    weight = torch.randn(9, 12, **kw)
    bias = torch.randn(9, **kw) if with_bias else None
    a = torch.randn(4, 12, **kw).requires_grad_()
    b = torch.randn(9, 4, **kw).requires_grad_()
    grad = torch.randn(37, 9, **kw)
    scales = (0.7, 2.0, 3.0)  # LoRA scaling, then the TP grad scales of A and B

    results = []
    for fn in (_FrozenLinearLora.apply, _composed):
        x.grad = a.grad = b.grad = None
        out = fn(x, weight, bias, a, b, *scales)
        out.backward(grad)
        results.append([out.detach(), a.grad, b.grad] + ([x.grad] if x_grad else []))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert results[0][2].is_contiguous(), "B's gradient must keep the parameter's layout"
    if x_grad:
        assert torch.autograd.gradcheck(
            lambda x, a, b: _FrozenLinearLora.apply(x, weight, bias, a, b, 0.7, 1.0, 1.0), (x, a, b)
        )


def _paths_body(sp):
    """Loss and raw (pre-sync) LoRA grads through the one-node path, then the composed one."""
    import megalora
    from megalora.layers import parallel

    megalora.init_parallel(tensor_model_parallel_size=2, seed=1234)
    model = G.build_gpt(G.gpt_config(tp=2, sp=sp, gated=True))
    config = megalora.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
    )
    model = megalora.get_peft_model(model, config)
    batch = G.batches(1)[0]
    calls = []
    real_apply = parallel._FrozenLinearLora.apply

    def counted(*args):
        calls.append(1)
        return real_apply(*args)

    def run():
        model.zero_grad(set_to_none=True)
        loss = G.lm_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads

    parallel._FrozenLinearLora.apply = counted
    try:
        fused_loss, fused_grads = run()
        fused_calls = len(calls)
        # A training-mode dropout (of p=0: still the identity) sends every layer down the composed path.
        for _, layer in model.base_model.lora_layers():
            layer.lora_dropout["default"] = nn.Dropout(p=0.0)
        composed_loss, composed_grads = run()
        composed_calls = len(calls) - fused_calls
    finally:
        parallel._FrozenLinearLora.apply = real_apply
    worst = max(
        ((fused_grads[n] - composed_grads[n]).abs().max() / composed_grads[n].abs().max().clamp_min(1e-12)).item()
        for n in fused_grads
    )
    return fused_calls, composed_calls, fused_loss, composed_loss, worst, len(fused_grads)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_layers_fused_path_matches_composed_path(dist2, sp):
    for fused_calls, composed_calls, fused_loss, composed_loss, worst, n_grads in dist2(_paths_body, sp):
        assert fused_calls == 8 and composed_calls == 0, (fused_calls, composed_calls)
        assert n_grads == 16
        assert abs(fused_loss - composed_loss) <= 1e-6 * abs(composed_loss)
        assert worst <= 1e-5, f"LoRA grads differ between the two paths by {worst} (relative to the largest)"
