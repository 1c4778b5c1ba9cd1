"""The parameters a LoRA adapter is made of, and their layout-independent init.

Each factor is drawn in full from a generator that depends only on the seed,
the layer's global name and the adapter's name, then sliced by its shard spec:
the init is the same at every TP/PP layout and on every rank of a TP group.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Optional

import torch
from torch import nn

from ..initializers.base_weight import reads_base_weight


class LoraFactor(nn.Linear):
    """An ``nn.Linear`` built from given tensors, drawing nothing from the global RNG.

    ``nn.Linear.__init__`` would initialise with the global generator, whose state
    would then depend on the (local, layout-dependent) factor shapes.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(weight)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias)

    # From the weight, which update_layer slices to this rank's shard after creation.
    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


class LoraMagnitude(nn.Module):
    """DoRA's per-output-row magnitude, stored as ``weight`` like PEFT's."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def init_generator(seed: int, global_name: str, adapter_name: str) -> torch.Generator:
    """A CPU generator that depends only on the seed and the names.

    Drawing each factor in full from it, then slicing, makes the init identical
    at every TP/PP layout and on every rank of a TP group.
    """
    salt = zlib.crc32(f"{global_name}|{adapter_name}".encode())
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) * 1_000_003 + salt) % (2**63 - 1))
    return gen


def draw_full_factors(
    init: Any, r: int, in_features: int, out_features: int, lora_bias: bool, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Full fp32 ``A [r, in]``, ``B [out, r]`` and B's bias for an init scheme.

    ``True`` is PEFT's default: A as ``nn.Linear``'s Kaiming-uniform (a=√5, so
    the bound is ``1/sqrt(in)`` on the *full* fan-in) and B zero. ``False``
    leaves both as ``nn.Linear`` would, ``"gaussian"`` draws A from
    ``N(0, 1/r)``, and ``"orthogonal"`` builds A and B from the odd and even rows
    of a random orthogonal matrix so that ``B @ A`` starts at zero. A base-weight
    init (PiSSA, OLoRA, LoftQ) draws ``True``'s factors as a placeholder.
    """
    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)

    bias = torch.zeros(out_features) if lora_bias else None
    if init is True or reads_base_weight(init) or init in ("eva", "corda"):
        # Base-weight inits (PiSSA, OLoRA, LoftQ) and CorDA start from PEFT's default draw as a
        # placeholder (B = 0): megalora.initializers replaces it.
        # EVA starts from it as PEFT does (A = nn.Linear's default, B = 0).
        a, b = uniform((r, in_features), in_features), torch.zeros(out_features, r)
    elif init is False:
        a, b = uniform((r, in_features), in_features), uniform((out_features, r), r)
        if lora_bias:
            bias = uniform((out_features,), r)
    elif isinstance(init, str) and init.lower() == "gaussian":
        a = torch.empty(r, in_features).normal_(0.0, 1.0 / r, generator=gen)
        b = torch.zeros(out_features, r)
    elif init == "orthogonal":
        if r % 2:
            raise ValueError(f"init_lora_weights='orthogonal' needs an even r, got r={r}; use an even rank.")
        q, _ = torch.linalg.qr(torch.randn(r, r, generator=gen))
        a = (torch.randn(in_features, r // 2, generator=gen) @ q[0::2, :]).T / 10.0
        b = torch.randn(r // 2, out_features, generator=gen).T @ q[1::2, :] / 10.0
    else:
        raise NotImplementedError(
            f"init_lora_weights={init!r} is not implemented by megalora yet; "
            "use True, False, 'gaussian', 'orthogonal', 'pissa', 'pissa_niter_<n>', 'olora' or 'loftq'."
        )
    return a.contiguous(), b.contiguous(), bias
