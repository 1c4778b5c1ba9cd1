"""Adapters on disk, in PEFT's format, at any TP/PP/VPP layout.

A saved adapter holds *full* tensors keyed by *global* module names
(``base_model.model.<global path>.lora_A.weight``), so it loads at any layout
and in HF PEFT. Saving gathers each factor along its own split dimension; the
TP rank 0 of the first data-parallel replica of every pipeline stage (all
virtual chunks of a stage live on the same ranks) sends its stage's tensors to
global rank 0, which alone writes. Loading reads the full tensors on every
rank and keeps this rank's slice, with the same
:class:`~megalora.sharding.ShardSpec` the init uses.

Both files are first written to temporary files in the target directory and
fsynced, then renamed over the old ones (tensors first, config last), so a
process killed mid-save leaves the previous adapter in place. The one window
left is between the two renames (microseconds): it leaves the new tensors
next to the old config, which is still loadable when the config did not
change, and gives the clear "different r" error otherwise.

Every problem found while loading (a missing or unexpected tensor, a shape or
``r`` that differs, a config that names a module outside the megatron
allowlist, a missing or corrupt file) is gathered from all ranks and raised on
every rank before anything is written into the model.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .collectives import agree_or_raise, all_gather_objects, gather_objects, group_rank, group_size
from .experts import is_expert_param, is_expert_writer
from .parallel_groups import is_stage_writer, megatron_parallel_state
from .sharding import gather_full
from .atomic_write import remove_stale_temporaries, write_files
from .config import CONFIG_NAME, LoraConfig
from .adapter_entries import PREFIX, _adapter_entries  # noqa: F401 - PREFIX is part of this module's API

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def _version() -> str:
    from . import __version__

    return __version__


def _layout() -> dict:
    ps = megatron_parallel_state()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if ps is None:
        return {"world_size": world}
    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size(),
        "world_size": world,
    }


def adapter_state_dict(peft_model, adapter: str) -> dict[str, torch.Tensor]:
    """Collective over each TP group: this stage's full tensors of ``adapter``, PEFT keys, on the CPU."""
    state = {}
    for key, tensor, spec, group in _adapter_entries(peft_model, adapter):
        full = gather_full(tensor.detach(), spec, group)
        state[key] = full.to("cpu", copy=True).contiguous()
    return state


def expert_keys(peft_model, adapter: str) -> frozenset:
    """The keys of ``adapter``'s tensors on expert-parallel layers (written by the expert writers)."""
    return frozenset(key for key, tensor, _, _ in _adapter_entries(peft_model, adapter) if is_expert_param(tensor))


def gather_stages(state: dict, experts: frozenset = frozenset()) -> tuple[Optional[dict], Optional[str]]:
    """Collective: every stage's tensors merged on global rank 0.

    Args:
        state: This rank's full tensors.
        experts: The keys of ``state`` that live on expert-parallel layers:
            sent by the expert writers, the rest by the stage writers.

    Returns:
        ``(merged, problem)`` on rank 0, ``(None, None)`` elsewhere. A key that
        two stages hold with different values is a problem (it would make the
        file depend on the layout).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return state, None
    dense_writer, expert_writer = is_stage_writer(), is_expert_writer()
    mine = {k: v for k, v in state.items() if (expert_writer if k in experts else dense_writer)}
    parts = gather_objects(mine, dst=0)
    if parts is None:
        return None, None
    merged, clash = {}, []
    for part in parts:
        for key, value in part.items():
            if key in merged and not torch.equal(merged[key], value):
                clash.append(key)
            merged.setdefault(key, value)
    if clash:
        return merged, f"pipeline stages disagree on {clash[:3]}: one module saved twice with different values"
    return merged, None


# ---------------------------------------------------------------------- files


def write_adapter(directory: str, config: LoraConfig, state: dict[str, torch.Tensor]) -> None:
    """Write PEFT's two files into ``directory``, each atomically.

    Both are staged and synced before either is renamed, so the old pair is
    replaced only once the new one is complete on disk.
    """
    os.makedirs(directory, exist_ok=True)
    metadata = {"format": "pt", "megalora_version": _version(), "megalora_layout": json.dumps(_layout())}
    saved = config.copy() if hasattr(config, "copy") else config
    saved.inference_mode = True
    weights_path, config_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME), os.path.join(directory, CONFIG_NAME)
    remove_stale_temporaries(weights_path)
    remove_stale_temporaries(config_path)
    write_files([(weights_path, safetensors_bytes(state, metadata=metadata)),
                 (config_path, saved.to_json_string().encode())])


def save_adapters(
    peft_model,
    save_directory: str,
    selected_adapters: Optional[Sequence[str]] = None,
    safe_serialization: bool = True,
    path_initial_model_for_weight_conversion: Optional[str] = None,
) -> None:
    """Save adapters in PEFT's layout: ``default`` at the top, others in subfolders.

    Collective under ``torch.distributed``: every rank must call it. Only global
    rank 0 writes; an error there (a full disk, say) is raised on every rank.
    With ``path_initial_model_for_weight_conversion``, each adapter is written
    as PEFT's converted plain-LoRA adapter (:mod:`megalora.initializers.conversion`).

    Raises:
        ValueError: For an unknown adapter, a ``save_directory`` that is a
            file, or ``safe_serialization=False`` (only safetensors are written).
    """
    available = list(peft_model.peft_config)
    adapters = available if selected_adapters is None else list(selected_adapters)
    unknown = [a for a in adapters if a not in available]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} do not exist; available adapters: {available}")
    if not safe_serialization:
        raise ValueError("safe_serialization=False: megalora writes only safetensors (no pickle); drop the argument")
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file; give a directory path")
    init_dir = path_initial_model_for_weight_conversion
    if init_dir is not None:
        from .initializers.conversion import check_convertible

        # The same on every rank (config and a shared directory), so raised before any collective.
        problem = next(filter(None, (check_convertible(peft_model.peft_config[a], init_dir) for a in adapters)), None)
        if problem:
            raise ValueError(problem)
    error = None
    for adapter in adapters:
        state, problem = gather_stages(adapter_state_dict(peft_model, adapter), expert_keys(peft_model, adapter))
        error = error or problem
        if state is None or error:
            continue
        target = save_directory if adapter == "default" else os.path.join(save_directory, adapter)
        config = peft_model.peft_config[adapter]
        try:
            if init_dir is not None:
                state, config = _convert(state, config, init_dir)
            write_adapter(target, config, state)
        except (OSError, ValueError) as exc:  # keep taking part in the other adapters' collectives
            error = f"saving adapter {adapter!r} to {target!r} failed on rank 0: {exc}"
    agree_or_raise(error)


def _convert(state: dict, config: LoraConfig, init_dir: str) -> tuple[dict, LoraConfig]:
    """PEFT's PiSSA/OLoRA-to-LoRA conversion of one adapter's full tensors, on the writing rank."""
    from .initializers.conversion import converted_config, converted_state, mark_initial_config

    state = converted_state(state, read_adapter_tensors(init_dir))
    mark_initial_config(config, init_dir)
    return state, converted_config(config)


# ---------------------------------------------------------------------- loading


def read_adapter_config(model_id: str) -> LoraConfig:
    """Collective: the adapter's config, or the same clear error on every rank.

    Reading validates every field, so a hand-edited ``megatron_core`` outside
    the ``megatron.`` allowlist is refused before anything is imported.
    """
    config, error = None, None
    try:
        config = LoraConfig.from_pretrained(model_id)
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        error = f"cannot use the adapter config in {model_id!r}: {exc}"
    agree_or_raise(error)
    return config


def read_adapter_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a saved adapter. Only safetensors are read: nothing is unpickled."""
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: megalora loads adapters saved as {ADAPTER_WEIGHTS_NAME} (pickle files are never read)"
        )
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _shape_problem(key: str, file_shape: tuple, expected: tuple) -> str:
    r_dim = {"lora_A.weight": 0, "lora_B.weight": 1}.get(".".join(key.split(".")[-2:]))
    if r_dim is not None and len(file_shape) == len(expected) == 2:
        other = 1 - r_dim
        if file_shape[other] == expected[other] and file_shape[r_dim] != expected[r_dim]:
            return (
                f"different r for {key}: the file holds r={file_shape[r_dim]}, the config asks r={expected[r_dim]}; "
                "make r / rank_pattern in adapter_config.json match the saved tensors"
            )
    return (
        f"shape mismatch for {key}: the file has {file_shape}, the model needs {expected} "
        "(was the adapter saved for another model?)"
    )


def _plan_load(peft_model, adapter: str, tensors: dict) -> tuple[list, set, list[str]]:
    """Match file tensors to this rank's parameters; collect every problem as text."""
    plan, used, problems = [], set(), []
    for key, param, spec, group in _adapter_entries(peft_model, adapter):
        if key not in tensors:
            problems.append(f"missing tensor {key} in the adapter file: the config targets a module it lacks")
            continue
        used.add(key)
        full = tensors[key]
        world = group_size(group)
        expected = list(spec.full_shape(param.shape, world))
        if list(full.shape) != expected:
            problems.append(_shape_problem(key, tuple(full.shape), tuple(expected)))
            continue
        plan.append((param, spec.local(full, group_rank(group), world)))
    return plan, used, problems


def load_adapter_weights(peft_model, directory: str, adapter: str) -> None:
    """Collective: copy a saved adapter's tensors into ``adapter``'s parameters.

    Every rank checks its own modules; the problems of all ranks, and file
    tensors that no rank used, are gathered once, and every rank raises the
    same error before anything is written.
    """
    tensors, plan, used, problems = {}, [], set(), []
    try:
        tensors = read_adapter_tensors(directory)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: report it on every rank
        problems.append(f"cannot read the adapter tensors in {directory!r}: {exc}")
    if not problems:
        plan, used, problems = _plan_load(peft_model, adapter, tensors)
    all_used = set().union(*all_gather_objects(used))
    unexpected = sorted(set(tensors) - all_used)
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) in {directory} match no module of the model, e.g. {unexpected[:3]}; "
            "the adapter was made for another model, or its target_modules differ from the saved ones"
        )
    agree_or_raise("; ".join(problems[:5]) if problems else None)
    with torch.no_grad():
        for param, value in plan:
            param.copy_(value.to(dtype=param.dtype, device=param.device))


def load_adapter(peft_model, model_id: str, adapter_name: str = "default", is_trainable: bool = False):
    """Collective: add a saved adapter to an existing ``PeftModel`` (PEFT's ``load_adapter``).

    On any error the half-added adapter is removed again.
    """
    config = read_adapter_config(model_id)
    config.inference_mode = not is_trainable
    # Injecting re-applies the active adapters' trainability with the new config's
    # inference_mode; as in PEFT, the existing parameters keep theirs.
    before = {id(p): p.requires_grad for p in peft_model.parameters()}
    peft_model.base_model.inject_adapter(adapter_name, config)
    for param in peft_model.parameters():
        if id(param) in before:
            param.requires_grad_(before[id(param)])
    try:
        load_adapter_weights(peft_model, model_id, adapter_name)
    except BaseException:
        peft_model.base_model.delete_adapter(adapter_name)
        raise
    # PEFT: the new adapter is trainable everywhere (active or not) exactly when is_trainable.
    for module in peft_model.base_model._adapter_modules():
        for layer_name in getattr(module, "adapter_layer_names", ("modules_to_save",)):
            container = getattr(module, layer_name)
            if adapter_name in container:
                container[adapter_name].requires_grad_(is_trainable)


def from_pretrained(cls, model, model_id, adapter_name, is_trainable, config=None):
    """Collective: build a ``cls`` (PeftModel) on ``model`` from the adapter saved in ``model_id``.

    On a load error the base model's original layers are put back before the
    error is raised.
    """
    if config is None:
        config = read_adapter_config(model_id)
    config.inference_mode = not is_trainable
    peft_model = cls(model, config, adapter_name)
    try:
        load_adapter_weights(peft_model, model_id, adapter_name)
    except BaseException:
        peft_model.base_model.unload()
        raise
    return peft_model
