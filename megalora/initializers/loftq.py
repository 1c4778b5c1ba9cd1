"""LoftQ in plain torch: NormalFloat block quantization and alternating low-rank fits.

PEFT 0.21.2 runs LoftQ only through bitsandbytes on CUDA/XPU. This module
writes the same algorithm without it, so it runs on CPU and on any rank:

* **Quantizer** (PEFT's former ``NFQuantizer`` is the guide): the weight is
  flattened (row-major) and cut into blocks of 64; each block is divided by
  its absolute maximum and every value is rounded to the nearest entry of a
  NormalFloat codebook of ``2**bits`` values in ``[-1, 1]``. At 4 bits the
  codebook is bitsandbytes' NF4 (quantiles of N(0, 1) with ``offset
  0.9677083``: 8 positive, 7 negative values and an exact zero); 2 and 8 bits
  use the same construction with 4 and 256 values. A last partial block is
  quantized on its own values.
* **LoftQ** (``loftq_init`` of PEFT): ``res = W``; each of ``loftq_iter``
  rounds quantizes ``res`` into ``Q``, takes the SVD of ``W - Q`` and keeps
  the rank-``r`` fit ``L R`` (``L = U·√S``, ``R = √S·Vᴴ``); the next round
  quantizes ``W - L R``. The base becomes the dequantized ``Q``,
  ``A = R`` and ``B = L`` (unscaled, as in PEFT).

Blocks run over the flattened *full* weight, which row-parallel shards would
not line up with, so it runs on the owner of the full weight.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["BLOCK", "dequantize", "loftq", "nf_codebook", "quantize", "quantize_dequantize"]

BLOCK = 64
_OFFSET = 0.9677083
# bitsandbytes' NF4 table as it ships it (the construction below agrees to one ulp), so that
# 4-bit codes round exactly as bitsandbytes' do.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)


@functools.lru_cache(maxsize=None)
def nf_codebook(bits: int) -> torch.Tensor:
    """The sorted NormalFloat codebook of ``2**bits`` values, max 1, with an exact 0 (asymmetric)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"loftq_bits={bits} is not supported; use 2, 4 or 8")
    if bits == 4:
        return torch.tensor(_NF4)
    half = 2 ** bits // 2
    ppf = torch.special.ndtri
    positive = ppf(torch.linspace(_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -ppf(torch.linspace(_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.max()).float()


def _blocks(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = weight.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    if pad:
        # A partial last block: zeros change neither its absmax nor its own values' codes.
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK), pad


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [blocks, 64] int64, absmax [blocks])`` of ``weight`` (fp32, any shape)."""
    blocks, _ = _blocks(weight.float())
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    table = nf_codebook(bits)
    # Nearest code by the midpoints of the sorted table (a tie goes to the lower code).
    mids = (table[1:] + table[:-1]) / 2
    codes = torch.bucketize(blocks / scale[:, None], mids)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, bits: int, shape: torch.Size) -> torch.Tensor:
    """The fp32 weight of ``shape`` that :func:`quantize`'s codes stand for."""
    values = nf_codebook(bits)[codes] * absmax[:, None]
    n = torch.Size(shape).numel()
    return values.reshape(-1)[:n].reshape(shape)


def quantize_dequantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The weight after a round trip through the quantizer."""
    codes, absmax = quantize(weight, bits)
    return dequantize(codes, absmax, bits, weight.shape)


def _low_rank(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_low_rank_decomposition``: ``L = U·√diag(S)[:, :r]``, ``R = √diag(S)[:r]·Vᴴ``."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    return u @ torch.sqrt(torch.diag(s)[:, :r]), torch.sqrt(torch.diag(s)[:r, :]) @ vh


@torch.no_grad()
def loftq(weight: torch.Tensor, r: int, bits: int, iters: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ on one full fp32 ``[out, in]`` weight.

    Returns:
        ``(A [r, in], B [out, r], dequantized base [out, in])``.
    """
    if iters <= 0:
        raise ValueError(f"loftq_iter must be at least 1, got {iters}")
    weight = weight.float()
    res = weight
    for i in range(iters):
        dequantized = quantize_dequantize(res, bits)
        left, right = _low_rank(weight - dequantized, r)
        if i + 1 < iters:
            res = weight - left @ right
    return right, left, dequantized
