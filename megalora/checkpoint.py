"""Adapters on disk, in PEFT's format, at any TP/PP layout.

A saved adapter holds *full* tensors keyed by *global* module names
(``base_model.model.<global path>.lora_A.weight``), so it loads at any layout
and in HF PEFT. Saving gathers each factor along its own split dimension and
sends every stage's tensors to global rank 0, which alone writes; loading reads
the full tensors on every rank and keeps this rank's slice, with the same
:class:`~megalora.distributed.ShardSpec` the init uses.

Files are written atomically (temporary file, fsync, rename), so a process
killed mid-save leaves the previous adapter loadable.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from . import distributed as D
from .config import LoraConfig
from .layers import LoraLayer
from .targeting import global_module_names

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."


def _version() -> str:
    from . import __version__

    return __version__


def _layout() -> dict:
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return {
                "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
                "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
                "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size(),
                "world_size": dist.get_world_size(),
            }
    except ImportError:
        pass
    return {"world_size": dist.get_world_size() if dist.is_initialized() else 1}


def _is_stage_writer() -> bool:
    """Whether this rank holds the tensors its pipeline stage contributes (TP and DP rank 0)."""
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    except ImportError:
        pass
    return not dist.is_initialized() or dist.get_rank() == 0


def _model_tp_group():
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return ps.get_tensor_model_parallel_group()
    except ImportError:
        pass
    return None


def _param_spec(param: torch.Tensor) -> D.ShardSpec:
    if getattr(param, "tensor_model_parallel", False):
        return D.ShardSpec(dim=param.partition_dim)
    return D.FULL


def _layer_entries(layer: LoraLayer, adapter: str) -> list[tuple[str, torch.Tensor, D.ShardSpec]]:
    """``(saved suffix, local tensor, spec)`` for each of one adapter's tensors on a layer."""
    out = [
        ("lora_A.weight", layer.lora_A[adapter].weight, layer.a_spec),
        ("lora_B.weight", layer.lora_B[adapter].weight, layer.b_spec),
    ]
    bias = layer.lora_B[adapter].bias
    if bias is not None:
        out.append(("lora_B.bias", bias, layer.b_spec if layer.b_spec.dim == 0 else D.FULL))
    if adapter in layer.lora_magnitude_vector:
        out.append(("lora_magnitude_vector", layer.lora_magnitude_vector[adapter].weight, layer.magnitude_spec))
    return out


def adapter_state_dict(peft_model, adapter: str) -> dict[str, torch.Tensor]:
    """Collective over each TP group: this stage's full tensors of ``adapter``, PEFT keys."""
    from .layers.modules_to_save import ModulesToSaveWrapper

    model = peft_model.base_model.model
    names = global_module_names(model)
    state = {}
    for local_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            for suffix, tensor, spec in _layer_entries(module, adapter):
                full = D.gather_full(tensor.detach(), spec, module.tp_group)
                state[f"{PREFIX}{names[local_name]}.{suffix}"] = full.to("cpu", copy=True).contiguous()
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            for pname, param in module.modules_to_save[adapter].named_parameters():
                full = D.gather_full(param.detach(), _param_spec(param), _model_tp_group())
                state[f"{PREFIX}{names[local_name]}.{pname}"] = full.to("cpu", copy=True).contiguous()
    return state


def _gather_stages(state: dict) -> Optional[dict]:
    """Collective: every stage's tensors, merged on global rank 0 (``None`` elsewhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return state
    payload = state if _is_stage_writer() else {}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(payload, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_adapter(directory: str, config: LoraConfig, state: dict[str, torch.Tensor]) -> None:
    """Write PEFT's two files into ``directory`` (tensors first, config last)."""
    os.makedirs(directory, exist_ok=True)
    metadata = {"format": "pt", "megalora_version": _version(), "megalora_layout": json.dumps(_layout())}
    _atomic_write(os.path.join(directory, WEIGHTS_NAME), safetensors_bytes(state, metadata=metadata))
    saved = config.copy() if hasattr(config, "copy") else config
    saved.inference_mode = True
    _atomic_write(os.path.join(directory, CONFIG_NAME), saved.to_json_string().encode())


def save_adapters(
    peft_model, save_directory: str, selected_adapters: Optional[Sequence[str]] = None, **_ignored
) -> None:
    """Save adapters in PEFT's layout: ``default`` at the top, others in subfolders.

    Collective under ``torch.distributed``: every rank must call it. Only global
    rank 0 writes.
    """
    available = list(peft_model.peft_config)
    adapters = available if selected_adapters is None else list(selected_adapters)
    unknown = [a for a in adapters if a not in available]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} do not exist; available adapters: {available}")
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file; give a directory path")
    for adapter in adapters:
        state = _gather_stages(adapter_state_dict(peft_model, adapter))
        if state is not None:
            target = save_directory if adapter == "default" else os.path.join(save_directory, adapter)
            write_adapter(target, peft_model.peft_config[adapter], state)
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------- loading



def read_adapter_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a saved adapter. Only safetensors are read: nothing is unpickled."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: megalora loads adapters saved as {WEIGHTS_NAME} (pickle files are never read)"
        )
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _plan_load(peft_model, adapter: str, tensors: dict) -> tuple[list, set, list[str]]:
    """Match file tensors to this rank's parameters; collect every problem as text."""
    from .layers.modules_to_save import ModulesToSaveWrapper

    model = peft_model.base_model.model
    names = global_module_names(model)
    plan, used, problems = [], set(), []

    def take(key, param, spec, group):
        if key not in tensors:
            problems.append(f"missing tensor {key} in the adapter file")
            return
        used.add(key)
        full = tensors[key]
        world = D.group_size(group)
        expected = list(param.shape)
        if spec.sharded:
            expected[spec.dim] *= world
        if list(full.shape) != expected:
            problems.append(
                f"shape mismatch for {key}: the file has {tuple(full.shape)}, the model needs {tuple(expected)} "
                "(was the adapter saved with another r, or for another model?)"
            )
            return
        plan.append((param, spec.local(full, D.group_rank(group), world)))

    for local_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            for suffix, param, spec in _layer_entries(module, adapter):
                take(f"{PREFIX}{names[local_name]}.{suffix}", param, spec, module.tp_group)
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            for pname, param in module.modules_to_save[adapter].named_parameters():
                take(f"{PREFIX}{names[local_name]}.{pname}", param, _param_spec(param), _model_tp_group())
    return plan, used, problems


def load_adapter_weights(peft_model, directory: str, adapter: str) -> None:
    """Collective: copy a saved adapter's tensors into ``adapter``'s parameters.

    Every rank checks its own modules; the problems of all ranks, and file
    tensors that no rank used, are gathered once, and every rank raises the
    same error before anything is written.
    """
    tensors = read_adapter_tensors(directory)
    plan, used, problems = _plan_load(peft_model, adapter, tensors)
    all_used = set().union(*D.all_gather_objects(used))
    unexpected = sorted(set(tensors) - all_used)
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) in {directory} match no module of the model, e.g. {unexpected[:3]}; "
            "the adapter was made for another model or config"
        )
    D.agree_or_raise("; ".join(problems[:5]) if problems else None)
    with torch.no_grad():
        for param, value in plan:
            param.copy_(value.to(dtype=param.dtype, device=param.device))


def load_adapter(peft_model, model_id: str, adapter_name: str = "default", is_trainable: bool = False, **_ignored):
    """Add a saved adapter to an existing ``PeftModel`` (PEFT's ``load_adapter``)."""
    config = LoraConfig.from_pretrained(model_id)
    config.inference_mode = not is_trainable
    peft_model.base_model.inject_adapter(adapter_name, config)
    peft_model.base_model.set_adapter(peft_model.active_adapter, inference_mode=False)
    load_adapter_weights(peft_model, model_id, adapter_name)
    if not is_trainable:
        for module in peft_model.base_model._adapter_modules():
            for layer_name in getattr(module, "adapter_layer_names", ("modules_to_save",)):
                container = getattr(module, layer_name)
                if adapter_name in container:
                    container[adapter_name].requires_grad_(False)


def from_pretrained(cls, model, model_id, adapter_name, is_trainable, config=None, **_ignored):
    """Build a ``cls`` (PeftModel) on ``model`` from the adapter saved in ``model_id``."""
    if config is None:
        config = LoraConfig.from_pretrained(model_id)
    config.inference_mode = not is_trainable
    peft_model = cls(model, config, adapter_name)
    load_adapter_weights(peft_model, model_id, adapter_name)
    return peft_model
