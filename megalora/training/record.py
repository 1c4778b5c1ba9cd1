"""What a run records for ``megalora verify``: its initial adapter and each step's gathered gradients.

With ``job.record_grads: true`` a run writes, under ``job.output_dir``:

* ``initial_adapter/``: the adapter before the first step (``save_pretrained``).
* ``grads/step_0001.safetensors``, ...: each step's gradients of the adapter's
  tensors as full tensors under their PEFT keys, after the TP sync of the
  replicated factors and the data-parallel average, before clipping; so they
  mean the same at every layout.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from ..collectives import agree_or_raise
from ..sharding import gather_full

INITIAL_ADAPTER = "initial_adapter"
GRADS_DIR = "grads"


def grads_file(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, GRADS_DIR, f"step_{step:04d}.safetensors")


def gathered_grads(peft_model, adapter: str = "default") -> Optional[dict[str, torch.Tensor]]:
    """Collective: every stage's full gradients of ``adapter`` on global rank 0 (``None`` elsewhere).

    A tensor without a gradient counts as zeros. Gathered the way
    ``save_pretrained`` gathers the weights (same entries, specs and groups).
    """
    from ..adapter_entries import _adapter_entries
    from ..checkpoint import expert_keys, gather_stages

    state = {}
    for key, tensor, spec, group in _adapter_entries(peft_model, adapter):
        # Under megatron-core's DDP the finalized gradient is the param's main_grad (fp32).
        grad = getattr(tensor, "main_grad", None)
        grad = grad if grad is not None else tensor.grad
        grad = grad if grad is not None else torch.zeros_like(tensor)
        state[key] = gather_full(grad.detach().float(), spec, group).to("cpu", copy=True).contiguous()
    merged, problem = gather_stages(state, expert_keys(peft_model, adapter))
    agree_or_raise(problem)
    return merged


def write_grads(peft_model, output_dir: str, step: int) -> None:
    """Collective: writes ``grads_file(output_dir, step)`` from rank 0."""
    from safetensors.torch import save_file

    state = gathered_grads(peft_model)
    if dist.get_rank() == 0:
        os.makedirs(os.path.join(output_dir, GRADS_DIR), exist_ok=True)
        save_file(state, grads_file(output_dir, step))


def read_grads(output_dir: str) -> dict[int, dict[str, torch.Tensor]]:
    """``{step: {key: full gradient}}`` of every recorded step of a finished run."""
    from safetensors.torch import load_file

    folder = os.path.join(output_dir, GRADS_DIR)
    if not os.path.isdir(folder):
        return {}
    return {int(name[len("step_"):-len(".safetensors")]): load_file(os.path.join(folder, name))
            for name in sorted(os.listdir(folder)) if name.startswith("step_") and name.endswith(".safetensors")}
