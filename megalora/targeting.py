"""Which modules get LoRA: PEFT's matching rules, applied to *global* names.

Under pipeline parallelism each stage (and each virtual chunk) numbers its
``decoder.layers`` from 0. megatron-core's ``TransformerLayer.layer_number`` is
1-based and global, pipeline offsets and uneven stages included. So every
local name is first mapped to its global name (``decoder.layers.<layer_number
- 1>....``), and ``target_modules``, ``exclude_modules``,
``layers_to_transform``, ``rank_pattern`` and ``alpha_pattern`` are matched
against global names only. A routed expert's name carries its global expert
index (``mlp.experts.local_experts.<ep_rank * num_local + i>``). A config then picks the same layers at every
layout, and checkpoint keys use the same names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

from .config import LoraConfig
from .experts import expert_index_map
from .layers import LoraLayer, is_supported_linear
from .layers.dispatch import is_supported_module

ALL_LINEAR = "all-linear"
# Output heads that "all-linear" leaves out, as PEFT does with the output embedding.
OUTPUT_HEAD_NAMES = ("output_layer", "lm_head")


@dataclass
class Target:
    """A module that matched: its local path, global name, and LoRA r/alpha."""

    local_name: str
    global_name: str
    module: nn.Module
    r: int
    alpha: float


def layer_index_map(model: nn.Module) -> dict[str, str]:
    """Map each local layer path to its global path, for every layer stack.

    A stack is a ``nn.ModuleList`` whose items carry an integer
    ``layer_number`` (megatron-core's 1-based global number). Stacks without it
    (HF models) keep their local numbering, which then is global. Routed
    experts get their global expert index (:func:`megalora.experts.expert_index_map`).
    """
    mapping = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        for i, layer in enumerate(module):
            number = getattr(layer, "layer_number", None)
            if isinstance(number, int) and number >= 1:
                prefix = f"{name}.{i}" if name else str(i)
                mapping[prefix] = f"{name}.{number - 1}" if name else str(number - 1)
    layers = dict(mapping)
    for local, with_expert in expert_index_map(model).items():
        mapping[local] = to_global_name(with_expert, layers)
    return mapping


def to_global_name(local_name: str, index_map: dict[str, str]) -> str:
    """The global name of a module given the map from :func:`layer_index_map`."""
    parts = local_name.split(".")
    # Longest prefix first, so that nested stacks resolve to the innermost one.
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in index_map:
            rest = parts[cut:]
            return ".".join([index_map[prefix], *rest]) if rest else index_map[prefix]
    return local_name


class ModelChunks(nn.ModuleList):
    """The virtual-pipeline chunks of one model stage, adapted together.

    Local names inside carry the chunk index (``"1.decoder.layers.0..."``);
    global names do not, since ``layer_number`` already says where a layer is.
    """


def global_module_names(model: nn.Module) -> dict[str, str]:
    """Local name → global name for every module of ``model``."""
    if isinstance(model, ModelChunks):
        names = {"": ""}
        for index, chunk in enumerate(model):
            for local, glob in global_module_names(chunk).items():
                names[f"{index}.{local}" if local else str(index)] = glob
        return names
    index_map = layer_index_map(model)
    return {name: to_global_name(name, index_map) for name, _ in model.named_modules()}


def _listed(names, key: str) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def is_excluded(config: LoraConfig, key: str) -> bool:
    """``exclude_modules`` (regex full match, or exact/suffix list) and ``modules_to_save``."""
    excl = config.exclude_modules
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return True
        elif _listed(excl, key):
            return True
    # A module that is trained whole is never also given an adapter.
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return True
    return False


def layer_index(key: str, layers_pattern) -> Optional[int]:
    """The first layer index in a module name, as PEFT finds it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def is_target(config: LoraConfig, key: str, target_modules=None) -> bool:
    """PEFT's ``check_target_module_exists`` on a global name."""
    if is_excluded(config, key):
        return False
    targets = config.target_modules if target_modules is None else target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    index = layer_index(key, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def _param_entry_matches(entries, key: str) -> bool:
    """A ``target_parameters`` entry names ``key`` exactly, as a ``.``-suffix (PEFT's rule) or as a full-match regex."""
    for entry in entries:
        if key == entry or key.endswith(f".{entry}"):
            return True
        try:
            if re.fullmatch(entry, key):
                return True
        except re.error:
            pass
    return False


def weight_parameter_names(global_name: str) -> list[str]:
    """The names ``target_parameters`` may use for a linear module's weight.

    ``<module>.weight``, and for a ``SequentialMLP`` expert
    (``...experts.local_experts.<e>.linear_fc1``) also the expert-independent
    ``...experts.linear_fc1.weight`` that selects every expert's weight, as it
    does on grouped experts.
    """
    names = [f"{global_name}.weight"]
    alias = re.sub(r"\.local_experts\.\d+\.(linear_fc[12])$", r".\1", global_name)
    if alias != global_name:
        names.append(f"{alias}.weight")
    return names


def selects_parameters(config: LoraConfig, names: list[str], global_name: str) -> bool:
    """Whether ``config.target_parameters`` names any of ``names`` (and ``global_name`` is not excluded)."""
    entries = config.target_parameters
    return bool(entries) and not is_excluded(config, global_name) and any(
        _param_entry_matches(entries, n) for n in names)


def grouped_experts_to_wrap(model: nn.Module, config: LoraConfig) -> list[tuple[str, str, nn.Module]]:
    """``(local name, global name, module)`` of each grouped experts module the config selects.

    By ``target_parameters`` (see :mod:`megalora.layers.grouped` for the names a
    grouped weight answers to) or by ``target_modules`` naming its experts'
    ``SequentialMLP`` modules (``linear_fc1``, ``...local_experts.3.linear_fc2``),
    so that a ``SequentialMLP`` adapter config loads onto grouped experts.
    """
    from .layers.grouped import FC1, FC2, expert_module_names, grouped_parameter_names, is_grouped_experts

    names = global_module_names(model)
    modules_list = config.target_modules if config.target_modules != ALL_LINEAR else None
    out = []
    for local, module in model.named_modules():
        if not is_grouped_experts(module) or _is_adapter_internal(local):  # wrapped already: base_layer
            continue
        gname = names[local]
        if any(selects_parameters(config, grouped_parameter_names(module, gname, which), gname)
               or (modules_list and any(is_target(config, n) for n in expert_module_names(module, gname, which)))
               for which in (FC1, FC2)):
            out.append((local, gname, module))
    return out


def pattern_value(patterns: dict, key: str, default):
    """``rank_pattern`` / ``alpha_pattern`` lookup: the first key whose regex ends the name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _is_adapter_internal(name: str) -> bool:
    """Whether a module belongs to megalora itself (a factor, a wrapped base, a saved copy)."""
    return any(
        part in ("base_layer", "original_module", "modules_to_save") or part.startswith("lora_")
        for part in name.split(".")
    )


def all_linear_names(model: nn.Module, mcore=None) -> set[str]:
    """The last name component of every supported linear layer but the output head."""
    names = set()
    for name, module in model.named_modules():
        if name and is_supported_linear(module, mcore) and not _is_adapter_internal(name):
            leaf = name.split(".")[-1]
            if leaf not in OUTPUT_HEAD_NAMES:
                names.add(leaf)
    output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(output_embeddings):
        head = output_embeddings()
        for name, module in model.named_modules():
            if head is not None and module is head:
                names.discard(name.split(".")[-1])
    return names


def find_targets(model: nn.Module, config: LoraConfig, mcore=None) -> list[Target]:
    """Every module of ``model`` that ``config`` selects, with its global name, r and alpha.

    Modules inside an existing LoRA layer's internals (factors, base layer) are
    skipped; a LoRA layer itself is returned so that a new adapter is added to it.
    """
    targets = config.target_modules
    if isinstance(targets, str) and targets == ALL_LINEAR:
        targets = all_linear_names(model, mcore)
    names = global_module_names(model)
    found = []
    skip_prefixes: list[str] = []
    for local_name, module in model.named_modules():
        if not local_name or any(local_name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, LoraLayer):
            skip_prefixes.append(local_name + ".")
        # A grouped expert's layer knows its global expert index (see layers/grouped.py).
        global_name = module.global_name if isinstance(module, LoraLayer) and module.global_name else names[local_name]
        param_names = module.parameter_names() if hasattr(type(module), "parameter_names") else \
            weight_parameter_names(global_name)
        by_param = selects_parameters(config, param_names, global_name) and (
            isinstance(module, LoraLayer) or is_supported_linear(module, mcore))
        if not (by_param or is_target(config, global_name, targets)):
            continue
        if not (isinstance(module, LoraLayer) or is_supported_module(module, mcore)):
            # PEFT raises for an unsupported type it matched; we only skip
            # containers matched by a broad regex, and fail on leaves.
            if any(True for _ in module.children()):
                continue
        found.append(
            Target(
                local_name=local_name,
                global_name=global_name,
                module=module,
                r=int(pattern_value(config.rank_pattern, global_name, config.r)),
                alpha=pattern_value(config.alpha_pattern, global_name, config.lora_alpha),
            )
        )
    return found


def describe_no_match(config: LoraConfig) -> str:
    return (
        f"Target modules {config.target_modules} not found in the base model (layers_to_transform="
        f"{config.layers_to_transform}, exclude_modules={config.exclude_modules}"
        + (f", target_parameters={config.target_parameters}" if config.target_parameters else "")
        + "). Check target_modules: names are matched as exact names or '.'-suffixes of global module names, a "
        "string is a full-match regex; target_parameters entries match '<module>.<parameter>' names the same way "
        "or as full-match regexes (e.g. 'experts.linear_fc1.weight')."
    )


def _names_saved_entry(key: str, entry: str) -> bool:
    return key == entry or key.endswith(f".{entry}")


def find_saved_modules(model: nn.Module, config: LoraConfig) -> tuple[list[tuple[str, nn.Module]], list[int]]:
    """The modules ``config.modules_to_save`` names, and how many each entry matched here.

    An entry matches a global module name exactly or as a ``.``-suffix. LoRA
    layers and megalora's own internals (a wrapper's original and copies) are
    skipped; an existing ``ModulesToSaveWrapper`` matches, so that a new adapter
    adds its copy there.

    Returns:
        ``(local name, module)`` pairs, and per entry the count of matches on
        this rank (one pipeline stage may hold none: compare across ranks).
    """
    entries = list(config.modules_to_save or [])
    counts = [0] * len(entries)
    if not entries:
        return [], counts
    names = global_module_names(model)
    found = []
    for local_name, module in model.named_modules():
        parts = local_name.split(".")
        if not local_name or isinstance(module, LoraLayer) or "modules_to_save" in parts \
                or "original_module" in parts:
            continue
        hits = [i for i, entry in enumerate(entries) if _names_saved_entry(names[local_name], entry)]
        for i in hits:
            counts[i] += 1
        if hits:
            found.append((local_name, module))
    return found, counts


def describe_no_saved_match(config: LoraConfig, missing: list) -> str:
    return (
        f"modules_to_save entries {missing} match no module of the base model (modules_to_save="
        f"{config.modules_to_save}). Check modules_to_save: names are matched as exact names or '.'-suffixes of "
        "global module names (e.g. 'output_layer'); remove or correct the entry."
    )

