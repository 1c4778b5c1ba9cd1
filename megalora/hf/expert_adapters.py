"""LoRA on routed experts ↔ HF PEFT's ``target_parameters`` LoRA on transformers' 3-D expert parameters.

transformers 5 keeps a MoE layer's experts as 3-D parameters of one module
(``mlp.experts.gate_up_proj`` ``[E, 2·ffn, hidden]``, ``down_proj``
``[E, hidden, ffn]``, each expert ``[out, in]``). PEFT 0.21 adapts such a
parameter with ``lora.ParamWrapper`` (``target_parameters``): one ``lora_A``
``[E·r, in]`` and one ``lora_B`` ``[out, r·E]``, where expert ``e``'s factors
are rows ``e·r .. e·r+r-1`` of ``lora_A`` and columns ``k·E + e`` (``k < r``)
of ``lora_B`` (PEFT's ``reshape(E, r, in)`` and ``reshape(out, r, E)``), and
``ΔW_e = scaling · B_e A_e`` with one ``r`` and ``alpha`` for all experts.
megalora's LoRA on megatron expert ``e``'s ``linear_fc1`` / ``linear_fc2`` is
exactly ``(A_e, B_e)``: the conversion is a relayout, nothing is approximated.

Targeting several parameters of one module nests PEFT's wrappers, the first
parameter in the module's definition order innermost, so a parameter's keys
carry one ``base_layer.`` per targeted parameter defined after it
(``mlp.experts.base_layer.lora_A.weight`` is ``gate_up_proj``'s when
``down_proj`` is targeted too).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch

from .arch import HF_EXPERT_PARAMS

MCORE_EXPERT = re.compile(r"^(?P<layer>decoder\.layers\.\d+)\.mlp\.experts\.local_experts\.(?P<e>\d+)\."
                          r"(?P<fc>linear_fc[12])$")
_TO_HF = {mcore: hf for hf, mcore in HF_EXPERT_PARAMS}
_TO_MCORE = dict(HF_EXPERT_PARAMS)
_ORDER = [hf for hf, _ in HF_EXPERT_PARAMS]


def pack(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``(lora_A [E·r, in], lora_B [out, r·E])`` from per-expert ``A_e [r, in]``, ``B_e [out, r]``."""
    return torch.cat(a, dim=0).contiguous(), torch.stack(b, dim=2).reshape(b[0].shape[0], -1).contiguous()


def unpack(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per expert ``(A_e, B_e)`` from PEFT's stacked factors (inverse of :func:`pack`)."""
    r = lora_a.shape[0] // num_experts
    a = lora_a.reshape(num_experts, r, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], r, num_experts)
    return [(a[e].contiguous(), b[:, :, e].contiguous()) for e in range(num_experts)]


def nesting_prefix(param: str, targeted: Iterable[str]) -> str:
    """The ``base_layer.`` levels of ``param``'s PEFT keys, given the targeted parameters of its module."""
    later = [p for p in _ORDER[_ORDER.index(param) + 1:] if p in set(targeted)]
    return "base_layer." * len(later)


def split_expert_modules(state_by_module: dict) -> tuple[dict, dict]:
    """``(other modules, {(layer, fc): {expert: tensors}})`` of a megalora adapter grouped by module."""
    other, experts = {}, {}
    for module, tensors in state_by_module.items():
        match = MCORE_EXPERT.match(module)
        if match is None:
            other[module] = tensors
        else:
            experts.setdefault((match["layer"], match["fc"]), {})[int(match["e"])] = tensors
    return other, experts


def export_experts(experts: dict, ranks: dict, num_experts: int, hf_layer_prefix: str, prefix: str):
    """PEFT tensors and ``{HF parameter: (r, alpha)}`` for every adapted expert weight.

    Args:
        experts: ``{(megatron layer prefix, fc): {expert: {suffix: tensor}}}``.
        ranks: ``{megatron module: (r, alpha)}``.
        num_experts: Experts per layer.
        hf_layer_prefix: ``"model.layers.{i}."``.
        prefix: PEFT's key prefix (``base_model.model.``).

    Raises:
        ValueError: If some experts of a weight lack the adapter or differ in r/alpha,
            or an expert adapter has a bias or DoRA magnitude (PEFT's ParamWrapper has neither).
    """
    targeted: dict[str, set] = {}
    for (layer, fc) in experts:
        targeted.setdefault(layer, set()).add(_TO_HF[fc])
    out, params = {}, {}
    for (layer, fc), by_expert in sorted(experts.items()):
        names = [f"{layer}.mlp.experts.local_experts.{e}.{fc}" for e in range(num_experts)]
        if sorted(by_expert) != list(range(num_experts)):
            raise ValueError(f"{layer}.mlp.experts: the adapter covers experts {sorted(by_expert)} of {fc}, "
                             f"HF PEFT needs all {num_experts}: target every expert")
        values = {ranks[n] for n in names}
        if len(values) != 1:
            raise ValueError(f"{layer}.mlp.experts.*.{fc}: experts have different (r, alpha) {sorted(values)}; "
                             "HF PEFT's target_parameters uses one for all experts")
        extra = {s for t in by_expert.values() for s in t} - {"lora_A.weight", "lora_B.weight"}
        if extra:
            raise ValueError(f"{layer}.mlp.experts.*.{fc}: {sorted(extra)} cannot be exported; HF PEFT's "
                             "target_parameters supports neither lora_bias nor DoRA")
        a, b = pack([by_expert[e]["lora_A.weight"] for e in range(num_experts)],
                    [by_expert[e]["lora_B.weight"] for e in range(num_experts)])
        index = int(layer.rsplit(".", 1)[1])
        module = hf_layer_prefix.format(i=index) + "mlp.experts"
        param = _TO_HF[fc]
        nest = nesting_prefix(param, targeted[layer])
        out[f"{prefix}{module}.{nest}lora_A.weight"] = a
        out[f"{prefix}{module}.{nest}lora_B.weight"] = b
        params[f"{module}.{param}"] = values.pop()
    return out, params


def describe_parameters(params: dict, hf_layer_prefix: str, num_layers: int) -> list[str]:
    """``target_parameters`` that select exactly ``params``: short names when every layer has them."""
    short = {name.split(".mlp.experts.")[1] for name in params}
    layers = {p: {n for n in params if n.endswith(f".mlp.experts.{p}")} for p in short}
    if all(len(v) == num_layers for v in layers.values()):
        return sorted(f"mlp.experts.{p}" for p in short)
    return sorted(params)


def targeted_parameters(module: str, target_parameters: Optional[list]) -> list[str]:
    """Which of an HF experts module's 3-D parameters ``target_parameters`` selects (PEFT's suffix rule)."""
    entries = list(target_parameters or [])
    return [p for p in _ORDER
            if any(f"{module}.{p}" == t or f"{module}.{p}".endswith(f".{t}") for t in entries)]


def import_experts(module: str, tensors: dict, target_parameters: Optional[list], num_experts: int,
                   hf_layer_prefix: str) -> Optional[tuple]:
    """``(megatron layer prefix, fc, HF parameter, HF module, [(A_e, B_e)])`` of an experts module's tensors.

    ``None`` when ``module`` is not an experts module.

    ``module`` is the PEFT module path with its ``base_layer.`` levels
    (``model.layers.0.mlp.experts.base_layer``).
    """
    levels = 0
    while module.endswith(".base_layer"):
        module, levels = module[: -len(".base_layer")], levels + 1
    head, _, _ = hf_layer_prefix.partition("{i}")
    match = re.fullmatch(re.escape(head) + r"(\d+)\.mlp\.experts", module)
    if match is None:
        return None
    targeted = targeted_parameters(module, target_parameters)
    if levels >= len(targeted):
        raise ValueError(f"{module}: adapter tensors nested {levels} deep, but target_parameters "
                         f"{target_parameters} selects only {targeted} there")
    param = targeted[len(targeted) - 1 - levels]
    extra = set(tensors) - {"lora_A.weight", "lora_B.weight"}
    if extra:
        raise ValueError(f"{module}.{param}: unexpected tensors {sorted(extra)} for a target_parameters LoRA")
    pairs = unpack(tensors["lora_A.weight"], tensors["lora_B.weight"], num_experts)
    return f"decoder.layers.{match.group(1)}", _TO_MCORE[param], param, module, pairs
