"""The base seed LoRA init draws from: the one place it is kept.

LoRA factors are drawn from generators derived from one base seed that is
the same on every rank, so the init does not depend on the parallel layout.
``megalora.parallel_start.init_parallel`` records its ``seed`` here; the
Megatron-LM plug-in records Megatron's base ``--seed``; ``get_peft_model``
reads it back through ``lora_init_seed``.
"""

from __future__ import annotations

import torch

__all__ = ["lora_init_seed", "set_lora_init_seed", "clear_lora_init_seed"]

_SEED: dict[str, int | None] = {"seed": None}


def lora_init_seed() -> int:
    """The recorded base seed, else ``torch.initial_seed()``."""
    return _SEED["seed"] if _SEED["seed"] is not None else torch.initial_seed()


def set_lora_init_seed(seed: int) -> None:
    """Sets the base seed of LoRA init when Megatron's state was started elsewhere.

    Megatron-LM seeds each pipeline stage with ``seed + 100 * pp_rank``, so
    ``torch.initial_seed()`` differs across stages; its plug-in passes the
    base ``--seed`` here so the init stays layout-independent.
    """
    _SEED["seed"] = int(seed)


def clear_lora_init_seed() -> None:
    """Forgets the recorded seed (``destroy_parallel`` calls this)."""
    _SEED["seed"] = None
