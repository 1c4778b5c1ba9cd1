"""``megalora inspect``: what a saved adapter holds, read from its files alone."""

from __future__ import annotations

import json
import os

def inspect_adapter(directory: str) -> dict:
    """Modules, ranks, shapes, sizes and the source layout of a saved adapter (files only)."""
    from safetensors import safe_open

    from ..checkpoint import ADAPTER_WEIGHTS_NAME, CONFIG_NAME, PREFIX

    weights = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} does not exist: pass a folder written by save_pretrained "
                                f"(e.g. runs/tiny_gpt/adapter)")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} not found: pass a folder written by save_pretrained "
                                f"(it holds {CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME})")
    config = {}
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        with open(os.path.join(directory, CONFIG_NAME)) as handle:
            config = json.load(handle)
    modules: dict[str, dict] = {}
    total_params = total_bytes = 0
    with safe_open(weights, framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():
            sl = handle.get_slice(key)
            shape = list(sl.get_shape())
            dtype = str(sl.get_dtype())
            numel = 1
            for n in shape:
                numel *= n
            size = numel * _ITEMSIZE.get(dtype, 0)
            body = key[len(PREFIX):] if key.startswith(PREFIX) else key
            module, _, tensor = body.partition(".lora_")
            if not tensor:
                module, _, tensor = body.rpartition(".")
            entry = modules.setdefault(module, {"tensors": {}, "params": 0})
            entry["tensors"]["lora_" + tensor if "." in tensor else tensor] = shape
            entry["params"] += numel
            if key.endswith(("lora_A.weight", "lora_embedding_A")):
                entry["r"] = shape[0]
            total_params += numel
            total_bytes += size
    layout = metadata.get("megalora_layout")
    return {
        "directory": os.path.abspath(directory),
        "modules": modules,
        "num_modules": len(modules),
        "ranks": sorted({m["r"] for m in modules.values() if "r" in m}),
        "params": total_params,
        "bytes": total_bytes,
        "file_bytes": os.path.getsize(weights),
        "layout": json.loads(layout) if layout else None,
        "megalora_version": metadata.get("megalora_version"),
        "config": {k: config.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
                                              "use_dora", "use_qalora", "qalora_group_size", "rank_pattern", "alpha_pattern", "modules_to_save",
                                              "base_model_name_or_path") if k in config},
    }


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def natural_key(name: str) -> list:
    """Sort key putting numbers in order: layers 0, 1, 2, ..., 10, not 0, 1, 10, 11."""
    import re

    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def format_inspect(info: dict, max_modules: int = 12) -> str:
    """A human-readable report of :func:`inspect_adapter`."""
    lines = [f"adapter: {info['directory']}",
             f"  saved by megalora {info['megalora_version'] or '?'} at layout "
             + (json.dumps(info["layout"]) if info["layout"] else "unknown (not written by megalora)"),
             f"  {info['num_modules']} modules, ranks {info['ranks']}, {info['params']:,} params, "
             f"{info['bytes'] / 2**20:.2f} MiB of tensors ({info['file_bytes'] / 2**20:.2f} MiB file)"]
    for key, value in info["config"].items():
        lines.append(f"  {key}: {value}")
    lines.append("  modules:")
    names = sorted(info["modules"], key=natural_key)
    for name in names[:max_modules]:
        m = info["modules"][name]
        shapes = ", ".join(f"{t} {tuple(s)}" for t, s in sorted(m["tensors"].items()))
        lines.append(f"    {name}: r={m.get('r', '-')} | {shapes}")
    if len(names) > max_modules:
        lines.append(f"    ... and {len(names) - max_modules} more (--all lists every module)")
    return "\n".join(lines)


