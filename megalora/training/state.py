"""The training checkpoint: adapter, optimizer, RNG states, step and data position.

Layout of ``<dir>/step_000042/``:

* ``adapter/``: the adapter in PEFT's format (``save_pretrained``: full tensors,
  global names), loadable at any layout and by HF PEFT after export.
* ``rank_00003.pt``: this rank's optimizer state (its TP/PP shards' moments
  and fp32 master weights; under ``train.distributed_optimizer`` only this
  DP rank's shard of them, see :func:`megalora.training.optim.optimizer_state`),
  and its RNG states: Python, NumPy, torch CPU (and CUDA), and Megatron's
  model-parallel RNG tracker. Read back with ``weights_only=True``.
* ``trainer.json``: the step, the samples consumed, the layout, and the
  loss history (for the final plot).

``<dir>/latest`` names the newest complete checkpoint; it is written last, so a
job killed mid-save resumes from the previous one. The data order is a pure
function of the seed and the sample index, so the step fixes the data
position. Resuming needs the same layout and world size (the optimizer state
is per shard); the adapter alone loads at any layout.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..atomic_write import write_json, write_text
from ..collectives import agree_or_raise
from .optim import load_optimizer_state, optimizer_state

LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """Every RNG state a step may draw from, in types ``torch.load(weights_only=True)`` accepts."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    py = random.getstate()
    state: dict[str, Any] = {"python": [py[0], list(py[1]), py[2]], "torch": torch.get_rng_state(),
                             "tracker": get_cuda_rng_tracker().get_states()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what :func:`rng_state` captured."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:06d}")


def save(root: str, peft_model, optimizer, step: int, meta: dict) -> str:
    """Collective: write the checkpoint after ``step`` completed steps; returns its directory."""
    path = step_dir(root, step)
    peft_model.save_pretrained(os.path.join(path, "adapter"))
    torch.save({"optimizer": optimizer_state(optimizer), "rng": rng_state(), "step": step},
               os.path.join(path, f"rank_{_rank():05d}.pt"))
    _barrier()
    if _rank() == 0:
        write_json(os.path.join(path, "trainer.json"), dict(meta, step=step), indent=1)
        write_text(os.path.join(root, LATEST), os.path.basename(path))
    _barrier()
    return path


def resolve(resume: Optional[str], root: str) -> Optional[str]:
    """The checkpoint directory ``train.resume`` names: ``auto`` (latest under ``root``, if any) or a path.

    Raises:
        FileNotFoundError: When an explicit path holds no checkpoint.
    """
    if not resume:
        return None
    base = root if resume == "auto" else resume
    latest = os.path.join(base, LATEST)
    if os.path.isfile(latest):
        with open(latest) as handle:
            return os.path.join(base, handle.read().strip())
    if os.path.isfile(os.path.join(base, "trainer.json")):
        return base
    if resume == "auto":
        return None
    raise FileNotFoundError(f"train.resume={resume!r}: no checkpoint there (no {LATEST} file, no trainer.json); "
                            "give a checkpoint directory, 'auto', or null")


def load(path: str, peft_model, optimizer, layout: dict) -> dict:
    """Collective: restore adapter, optimizer and RNG states from ``path``; returns ``trainer.json``.

    Raises:
        ValueError: On every rank, when the checkpoint was written at another layout.
    """
    from ..checkpoint import load_adapter_weights

    with open(os.path.join(path, "trainer.json")) as handle:
        meta = json.load(handle)
    saved = meta.get("layout", {})
    agree_or_raise(None if saved == layout else (
        f"train.resume: {path} was written at layout {saved}, this job runs at {layout}; the optimizer state is "
        "per shard, so resume with the same parallel.*, world size, train.distributed_optimizer and train.bf16 (the adapter in its adapter/ folder loads "
        "at any layout)"))
    load_adapter_weights(peft_model, os.path.join(path, "adapter"), "default")
    blob = torch.load(os.path.join(path, f"rank_{_rank():05d}.pt"), weights_only=True)
    load_optimizer_state(optimizer, blob["optimizer"])
    set_rng_state(blob["rng"])
    return meta
