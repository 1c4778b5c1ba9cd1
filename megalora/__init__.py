"""megalora: PEFT's LoRA for megatron-core models under TP, SP and PP."""

from __future__ import annotations

__version__ = "0.1.0"

from . import lazy_compile as _lazy_compile

_lazy_compile.install()  # megatron's import then skips torch's compiler (see lazy_compile)

from .config import LoraConfig
from .model import LoraModel, PeftModel, get_peft_model
from .parallel_start import init_distributed, init_parallel
from .export import export_merged
from .layers import register_lora_layer
from .initializers import get_eva_state_dict, initialize_lora_eva_weights, preprocess_corda


def sync_lora_grads(model) -> int:
    """Sum the TP-partial gradients of replicated LoRA factors (a plain loop's step call).

    megatron-core's ``finalize_model_grads`` does this already for models
    wrapped in its ``DistributedDataParallel``; a loop without it calls this once
    per step, after backward and before the optimizer step. Collective over each
    LoRA layer's tensor-parallel group (the expert-TP group for routed experts);
    one coalesced all-reduce per group, and, for trainable tokens tied across the
    first and last pipeline stage, one over megatron's embedding group (as
    ``finalize_model_grads`` does for the shared weight). Data-parallel reductions
    (the dense one, and the expert-data-parallel one of routed experts) are not part
    of it: megatron-core's DDP does those.

    Returns:
        The number of parameters whose gradient was reduced.
    """
    from .grad_sync import sync_replicated_grads
    from .layers import LoraLayer
    from .layers.embedding_group import sync_embedding_group_grads
    from .layers.trainable_tokens import TrainableTokensLayer

    groups: dict = {}
    tokens = []
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        for module in chunk.modules():
            if isinstance(module, LoraLayer) and module.tp_size > 1:
                groups.setdefault(module.tp_group, []).extend(module.parameters())
            elif isinstance(module, TrainableTokensLayer):
                tokens.append(module)
    count = sum(sync_replicated_grads(params, group) for group, params in groups.items())
    return count + sync_embedding_group_grads(tokens)


__all__ = [
    "LoraConfig",
    "LoraModel",
    "PeftModel",
    "get_peft_model",
    "export_merged",
    "register_lora_layer",
    "init_distributed",
    "init_parallel",
    "sync_lora_grads",
    "preprocess_corda",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "__version__",
]
