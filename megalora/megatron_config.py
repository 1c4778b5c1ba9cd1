"""The ``TransformerConfig`` fields megalora sets so megatron-core runs anywhere.

The tests, the benchmarks, the trainer's model builder and the HF bridge all
build megatron-core models that must run on a CPU-only machine as well as on a
GPU. They share these fields through :func:`cpu_friendly_config_kwargs`.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["UNFUSED_KWARGS", "cpu_friendly_config_kwargs"]

# megatron-core's fused kernels (bias+GeLU/SwiGLU, bias+dropout+add, masked
# softmax, RoPE, gradient-accumulation into main_grad, persistent LayerNorm)
# need CUDA and apex or Transformer Engine. The unfused paths compute the same
# function, so turning them off changes speed on a GPU, never results.
UNFUSED_KWARGS: dict[str, bool] = dict(
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
    persist_layer_norm=False,
)


def cpu_friendly_config_kwargs(params_dtype: torch.dtype = torch.float32,
                               use_cpu_initialization: bool = True) -> dict[str, Any]:
    """``TransformerConfig`` keywords for a model that builds and runs on CPU or GPU.

    What it sets, and why:

    * every fusion flag of ``UNFUSED_KWARGS`` off: the fused kernels need CUDA
      plus apex/TE; the unfused paths compute the same function.
    * ``use_cpu_initialization``: Megatron then draws each *full* master
      weight on the CPU and slices it, so a model has the same weights at
      every TP/PP layout (what the layout oracles compare against); with it
      off, the init needs CUDA. On a GPU it only moves the init to the host.
    * ``params_dtype``: fp32 by default, since CPU half-precision matmuls are
      slow and lossy.

    Args:
        params_dtype: The dtype of the model's weights.
        use_cpu_initialization: Whether Megatron initialises weights on the CPU.

    Returns:
        A fresh dict to unpack into ``TransformerConfig(...)``; callers add
        the model's shape and parallel sizes.
    """
    return dict(UNFUSED_KWARGS, use_cpu_initialization=use_cpu_initialization, params_dtype=params_dtype)
