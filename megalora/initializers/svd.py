"""PiSSA and OLoRA: PEFT 0.21.2's math on one full ``[out, in]`` fp32 weight, as pure functions.

Both return full factors and the residual base weight ``W_res = W - scaling·B@A``,
so that ``W_res + scaling·B@A`` is the original weight at init. PEFT's
``LoraLayer.pissa_init`` / ``olora_init`` do the same on the layer; here the
math is separate from the layer so the distributed driver
(:mod:`megalora.initializers.distributed`) can run it on one owner rank.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

__all__ = ["olora", "pissa", "pissa_niter"]

_NITER = re.compile(r"pissa_niter_(\d+)")


def pissa_niter(init) -> Optional[int]:
    """``N`` of ``"pissa_niter_N"``, else ``None``."""
    match = _NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def _residual(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    # PEFT's expression (``weight - scaling * B @ A``), in place on the owner's own copy.
    return weight.sub_(scaling * b @ a)


def pissa(weight: torch.Tensor, r: int, scaling: float, niter: Optional[int] = None,
          seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: ``A = √(S/s)·Uᴴ[:r]``, ``B = V[:, :r]·√(S/s)`` from the SVD ``W = V S Uᴴ``.

    Args:
        weight: The full fp32 ``[out, in]`` weight; overwritten with the residual.
        r: The rank.
        scaling: The adapter's scaling (``alpha / r``, or ``alpha / √r`` with rsLoRA).
        niter: ``N`` of ``pissa_niter_N``: ``torch.svd_lowrank`` with ``N``
            subspace iterations instead of the exact SVD.
        seed: Seeds the global RNG that ``svd_lowrank`` draws from (in a forked
            RNG state), so that the randomized factors depend only on the seed.

    Returns:
        ``(A [r, in], B [out, r], W_res [out, in])``.
    """
    if niter is None:
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        vr, sr, uhr = v[:, :r], s[:r], uh[:r]
    else:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            vr, sr, ur = torch.svd_lowrank(weight, r, niter=niter)
        uhr = ur.t()
    sr = sr / scaling
    a = torch.diag(torch.sqrt(sr)) @ uhr
    b = vr @ torch.diag(torch.sqrt(sr))
    return a, b, _residual(weight, a, b, scaling)


def olora(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: ``W = QR``, ``B = Q[:, :r]``, ``A = R[:r]`` (nothing divided by the scaling).

    Args:
        weight: The full fp32 ``[out, in]`` weight; overwritten with the residual.
        r: The rank.
        scaling: The adapter's scaling, only for the residual.

    Returns:
        ``(A [r, in], B [out, r], W_res [out, in])``.
    """
    q, rr = torch.linalg.qr(weight)
    a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    return a, b, _residual(weight, a, b, scaling)
