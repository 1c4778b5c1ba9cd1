"""Megatron-LM's training wrappers for the trainer: Float16Module, DDP, and the Megatron optimizer.

The model chunks are wrapped as Megatron-LM's ``get_model`` wraps them:
``Float16Module`` under ``train.bf16``, then megatron-core's
``DistributedDataParallel`` (one per virtual chunk, bucketing on the first
only) with ``finalize_model_grads`` (megatron-core's, plus the expert-TP sums
of :func:`megalora.grad_sync.finalize_model_grads`) as the config's
``finalize_model_grads_func``, so that Megatron's pipeline schedule finishes
the DP reduction, the TP sum of the replicated LoRA factors (tagged
``average_gradients_across_tp_domain``) and of ``sequence_parallel`` params,
and the embedding-group sums. Only LoRA (and ``modules_to_save``) params
require grad, so DDP's buckets hold only them.

The optimizer is ``get_megatron_optimizer``'s: Adam (torch's AdamW without
apex/TE, decoupled weight decay, none on biases and 1-D params as in
Megatron) or SGD, ``clip_grad`` on the global norm that counts each
TP-replicated param once; under ``train.bf16`` the mixed-precision optimizer
that keeps fp32 master weights and reduces grads in fp32 (Megatron-LM's
``--bf16``); under ``train.distributed_optimizer`` Megatron's own
``DistributedOptimizer`` (ZeRO-1: grads reduce-scattered, each DP rank steps
its shard of the fp32 master weights and optimizer state, params
all-gathered).

CPU. megatron-core's optimizers check tensor types by their CUDA names
(``param.type() == 'torch.cuda.FloatTensor'``) and allocate a few scalars
with ``device='cuda'``. :func:`megalora.cpu_compat.cuda_names_on_cpu` is a torch function mode,
entered only around the optimizer's construction, step and state I/O, that
answers CUDA type names for CPU tensors and maps those devices to the CPU. It
needs :func:`megalora.cpu_compat.enable` (``torch.cuda.current_device``
and the schedules' CUDA devices) and does nothing when CUDA is available.
"""

from __future__ import annotations

import torch

from ..cpu_compat import cuda_names_on_cpu
from .config import TrainSection

def trainable_params(chunks: list) -> list[torch.nn.Parameter]:
    """LoRA (and modules_to_save) params, in one fixed order on every rank of a stage."""
    return [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]


def wrap_chunks(chunks: list, t: TrainSection) -> list:
    """Each chunk in ``Float16Module`` (``train.bf16``) and megatron-core's DDP, as ``get_model`` does.

    Call after LoRA is injected and the base frozen, so DDP allocates grad
    buffers for the trainable params only.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from ..grad_sync import finalize_model_grads

    # fp32 grad reduction: Megatron-LM turns it on with --bf16; for fp32 params it changes nothing.
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=t.distributed_optimizer)
    wrapped = []
    with cuda_names_on_cpu():
        for index, chunk in enumerate(chunks):
            config = chunk.config
            config.finalize_model_grads_func = finalize_model_grads
            module = Float16Module(config, chunk) if t.bf16 else chunk
            wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=module,
                                                   disable_bucketing=index > 0))
    return wrapped


def make_optimizer(model: list, t: TrainSection):
    """``get_megatron_optimizer`` over the DDP-wrapped chunks' trainable params (see the module docstring)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="sgd" if t.optimizer == "sgd" else "adam", lr=t.lr, min_lr=t.min_lr,
        weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        sgd_momentum=0.0, clip_grad=t.clip_grad, bf16=t.bf16,
        params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
        use_distributed_optimizer=t.distributed_optimizer)
    with cuda_names_on_cpu():
        optimizer = get_megatron_optimizer(config, model)
    for chunk in model:
        # What Megatron-LM's setup_model_and_optimizer sets: the schedule scales the loss by it (1 for bf16/fp32).
        chunk.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def zero_grads(model: list, optimizer) -> None:
    """Clears DDP's grad buffers and the optimizer's main grads before a step."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def optimizer_step(optimizer, lr: float, clip_grad: float) -> float:
    """Sets the LR, clips and steps; returns the global grad norm (before clipping).

    Collective over the model-parallel group (and DP under the distributed
    optimizer). Megatron's ``step`` skips the norm when ``clip_grad`` is 0; it
    is then computed the same way, for the log.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with cuda_names_on_cpu():
        if clip_grad > 0:
            _, norm, _ = optimizer.step()
            return float(norm)
        optimizer.prepare_grads()
        norm = optimizer.get_grad_norm()
        optimizer.step_with_ready_grads()
    return float(norm)


def parts(optimizer) -> list:
    """The optimizers inside a ChainedOptimizer (get_megatron_optimizer always returns one), in order."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_state(optimizer) -> dict:
    """This rank's optimizer state: the inner optimizer's moments and its (fp32 master) params.

    Under the distributed optimizer both are this DP rank's shard. The master
    params are saved as they are, since a bf16 model param cannot give back
    its fp32 master.
    """
    with cuda_names_on_cpu():
        return {"inner": [p.optimizer.state_dict() for p in parts(optimizer)],
                "main_params": [[q.detach().clone() for g in p.optimizer.param_groups for q in g["params"]]
                                for p in parts(optimizer)]}


def load_optimizer_state(optimizer, state: dict) -> None:
    """Restores what :func:`optimizer_state` captured on this rank (same layout and options)."""
    with cuda_names_on_cpu(), torch.no_grad():
        for part, inner, mains in zip(parts(optimizer), state["inner"], state["main_params"], strict=True):
            part.optimizer.load_state_dict(inner)
            params = [q for g in part.optimizer.param_groups for q in g["params"]]
            for param, value in zip(params, mains, strict=True):
                param.copy_(value)
