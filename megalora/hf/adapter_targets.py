"""The ``LoraConfig`` fields that select an exported adapter's HF modules and expert parameters."""

from __future__ import annotations

import re
from collections import Counter

from .arch import Arch, layer_suffix
from .expert_adapters import describe_parameters

def describe_targets(ranks: dict[str, tuple[int, float]], universe: list[str], layer_prefix: str) -> dict:
    """LoraConfig fields that select exactly the modules of ``ranks``, with their r and alpha.

    Tries, in order, leaf names (``q_proj``), paths inside a layer
    (``self_attn.q_proj``), either with ``layers_to_transform``, and last the
    full module names. Rank and alpha patterns use the shortest of those
    names under which the value is uniform.

    Args:
        ranks: ``{module path: (r, alpha)}`` of the adapted modules.
        universe: Every linear module path of the model.
        layer_prefix: ``"model.layers.{i}."`` style prefix of the layer stack.
    """
    wanted = set(ranks)
    where = {name: layer_suffix(name, layer_prefix) for name in set(universe) | wanted}
    namings = (lambda n: n.rpartition(".")[2], lambda n: where[n][1])

    def selected(targets, layers=None):
        return {u for u in universe
                if (u in targets or any(u.endswith("." + t) for t in targets))
                and (layers is None or where[u][0] in layers)}

    layer_set = sorted({where[n][0] for n in wanted if where[n][0] is not None})
    targets, layers = sorted(wanted), None
    for with_layers in (False, True):
        found = next((sorted({name_of(n) for n in wanted}) for name_of in namings
                      if selected({name_of(n) for n in wanted}, set(layer_set) if with_layers else None) == wanted),
                     None)
        if found is not None:
            targets, layers = found, (layer_set if with_layers else None)
            break
    r = Counter(v[0] for v in ranks.values()).most_common(1)[0][0]
    alpha = Counter(v[1] for v in ranks.values()).most_common(1)[0][0]
    patterns = ({}, {})
    for field, default in ((0, r), (1, alpha)):
        for name, values in sorted(ranks.items()):
            if values[field] == default:
                continue
            key = name
            for name_of in namings:
                if len({v[field] for n, v in ranks.items() if name_of(n) == name_of(name)}) == 1:
                    key = name_of(name)
                    break
            patterns[field][re.escape(key)] = values[field]
    return dict(target_modules=targets, layers_to_transform=layers, r=r, lora_alpha=alpha,
                rank_pattern=patterns[0], alpha_pattern=patterns[1])


def target_fields(arch: Arch, hf_ranks: dict, expert_params: dict) -> dict:
    """PEFT config fields selecting the HF modules (``target_modules``) and expert tensors (``target_parameters``)."""
    if hf_ranks:
        fields = describe_targets(hf_ranks, module_universe(arch.linear_hf_modules(), hf_ranks), arch.hf_layer_prefix)
    else:
        r, alpha = Counter(expert_params.values()).most_common(1)[0][0]
        fields = dict(target_modules=[], layers_to_transform=None, r=r, lora_alpha=alpha, rank_pattern={},
                      alpha_pattern={})
    if expert_params:
        fields["target_parameters"] = describe_parameters(expert_params, arch.hf_layer_prefix, arch.num_layers)
        for name, (r, alpha) in sorted(expert_params.items()):
            if r != fields["r"]:
                fields["rank_pattern"][re.escape(name)] = r
            if alpha != fields["lora_alpha"]:
                fields["alpha_pattern"][re.escape(name)] = alpha
    return fields


def module_universe(modules: list[str], ranks: dict) -> list[str]:
    """The modules target names are matched in: every linear one, and the adapted embeddings."""
    return modules + sorted(set(ranks) - set(modules))
