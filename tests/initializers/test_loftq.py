"""LoftQ against an independent reference of the algorithm (PEFT runs it only with bitsandbytes on GPUs).

The reference below is written separately from megalora's: its codebook comes
from Python's ``statistics.NormalDist`` (bitsandbytes' NF4 table at 4 bits),
each block of 64 flattened values is quantized in a Python loop by the first
nearest code (``argmin``), and LoftQ's rounds follow PEFT's ``loftq_init``.
The quantized weights must agree exactly; the SVD factors up to rounding.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def ref_codebook(bits: int) -> torch.Tensor:
    if bits == 4:
        return torch.tensor(NF4)
    offset, half, inv = 0.9677083, 2 ** bits // 2, statistics.NormalDist().inv_cdf

    def lin(a, b, n):
        return [a + (b - a) * i / (n - 1) for i in range(n)]

    pos = [inv(p) for p in lin(offset, 0.5, half + 1)[:-1]]
    neg = [-inv(p) for p in lin(offset, 0.5, half)[:-1]]
    values = sorted(pos + [0.0] + neg)
    return torch.tensor([v / max(values) for v in values], dtype=torch.float32)


def ref_quant(weight: torch.Tensor, bits: int) -> torch.Tensor:
    table, flat = ref_codebook(bits), weight.reshape(-1).clone()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), 64):
        block = flat[start:start + 64]
        absmax = block.abs().max()
        codes = torch.argmin((block[:, None] / absmax - table[None, :]).abs(), dim=1)
        out[start:start + 64] = table[codes] * absmax
    return out.view_as(weight)


def ref_loftq(weight: torch.Tensor, r: int, bits: int, iters: int):
    res = weight
    for i in range(iters):
        q = ref_quant(res, bits)
        u, s, vh = torch.linalg.svd(weight - q, full_matrices=False)
        left, right = u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r]
        res = weight - left @ right
    return right, left, q


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codebook_and_quantizer(bits):
    from megalora.initializers.loftq import nf_codebook, quantize_dequantize

    torch.testing.assert_close(nf_codebook(bits), ref_codebook(bits), atol=1e-6, rtol=0)
    weight = torch.randn(12, 10, generator=torch.Generator().manual_seed(bits))  # 120 = 64 + a partial block
    assert torch.equal(quantize_dequantize(weight, bits), ref_quant(weight, bits))


@pytest.mark.parametrize("bits,iters", [(4, 1), (2, 3), (8, 2)])
def test_loftq_matches_reference(bits, iters):
    from megalora.initializers.loftq import loftq

    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(iters))
    a, b, base = loftq(weight.clone(), 3, bits, iters)
    ra, rb, rbase = ref_loftq(weight, 3, bits, iters)
    assert torch.equal(base, rbase)
    torch.testing.assert_close(b @ a, rb @ ra, atol=1e-5, rtol=0)
    # LoftQ's point: the low-rank term takes out part of the quantization error.
    assert (weight - base - b @ a).norm() < (weight - base).norm()


def test_loftq_on_a_model():
    """alpha = r (scaling 1): base = the dequantized W, B@A = the reference fit, outputs closer to W's."""
    import megalora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = megalora.LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"], init_lora_weights="loftq",
                                 loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    peft = megalora.get_peft_model(model, config)
    for name in ("0", "2"):
        layer = peft.base_model.model.get_submodule(name)
        ra, rb, rbase = ref_loftq(weights[f"{name}.weight"], 4, 4, 2)
        assert torch.equal(layer.get_base_layer().weight.detach(), rbase)
        torch.testing.assert_close(layer.get_delta_weight("default"), rb @ ra, atol=1e-5, rtol=0)


def test_loftq_config_errors():
    import megalora

    with pytest.raises(ValueError, match="loftq_config: loftq_bits=3"):
        megalora.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3})
    with pytest.raises(ValueError, match="loftq_config: loftq_iter=0"):
        megalora.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 0})
