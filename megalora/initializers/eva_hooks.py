"""EVA's input side: PEFT's input functions (and megatron's ``[s, b, h]`` ones) and its hooks.

A hook rebuilds the layer's full input over its TP group, selects the rows
(``prepare_layer_inputs_fn``), then gathers the rows of the data-parallel
replicas, so every rank holding a layer sees the same rows. See :mod:`.eva`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
import torch.distributed as dist

from ..collectives import group_size
from ..parallel_groups import process_groups
from .calibration import full_input
from .incremental_pca import IncrementalPCA


def forward_fn_dict(model, inputs):
    """PEFT's default: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_megatron(model_input, peft_config):
    """The ``(b, s)`` indices of the tokens EVA uses, or ``None`` for all of them.

    A dict batch with ``input_ids`` (or ``tokens``) ``[b, s]``: PEFT's rule, a
    2-D ``attention_mask`` (1 = keep) and, with ``use_label_mask``, labels not
    equal to ``label_mask_value``; a ``loss_mask`` (megatron's) is applied too.
    Any other batch: every token.
    """
    if not isinstance(model_input, Mapping):
        return None
    tokens = model_input.get("input_ids", model_input.get("tokens"))
    if tokens is None:
        return None
    mask = model_input.get("attention_mask")
    mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None or mask.dim() != 2 else mask.bool()
    from .eva import eva_settings

    settings = eva_settings(peft_config)
    if settings["use_label_mask"] and model_input.get("labels") is not None:
        mask = mask & (model_input["labels"] != settings["label_mask_value"])
    if model_input.get("loss_mask") is not None:
        mask = mask & model_input["loss_mask"].bool()
    return mask.nonzero()


def prepare_layer_inputs_fn_megatron(layer_input, model_input, layer_name) -> torch.Tensor:
    """A layer's ``[s, b, h]`` input as the ``[tokens, h]`` rows that ``model_input`` selects."""
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer "
                        f"{layer_name}, please provide a custom prepare_layer_inputs_fn")
    x = layer_input.transpose(0, 1) if layer_input.dim() == 3 else layer_input
    if model_input is None:
        return x.reshape(-1, x.shape[-1])
    return x[model_input.T.unbind()]


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    """PEFT's function, for a ``[b, s, h]`` (HF) layer input: the rows ``model_input`` selects."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.reshape(-1, x.shape[-1]) if model_input is None else x[model_input.T.unbind()]


def _prepare_default(layer_input, model_input, layer_name) -> torch.Tensor:
    """PEFT's fallback for ``prepare_layer_inputs_fn=None``: flatten all but the last dimension."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.reshape(-1, x.size(-1)) if x.ndim > 2 else x


def _dp_group():
    if not (dist.is_available() and dist.is_initialized()):
        return None  # and no megatron import for a plain model
    pgs = process_groups()
    return pgs.dp_cp if pgs is not None else dist.group.WORLD


def _gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Collective: every replica's rows, in rank order (PEFT's padded all-gather)."""
    world = group_size(group)
    if world == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device), group=group)
    sizes = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def _is_megatron(module) -> bool:
    """Whether the layer is megatron-core's (its activations are ``[s, b, h]``)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return type(base).__module__.startswith("megatron.")


class Hook:
    """Prepares a layer's input as PEFT's hooks do, with the TP and DP gathers around it."""

    def __init__(self, name: str, prepare_fn: Callable, gather: bool):
        self.name = name
        self.prepare_fn = prepare_fn
        self.gather = gather
        self.model_input = None

    def states(self, module, inputs) -> torch.Tensor:
        x = full_input(module, inputs[0])  # every TP rank: the whole input
        fn = self.prepare_fn
        if fn is prepare_layer_inputs_fn_megatron and not _is_megatron(module):
            fn = prepare_layer_inputs_fn_language_modeling  # a plain (HF) layer sees [b, s, h]
        x = fn((x, *inputs[1:]), self.model_input, self.name)
        return _gather_rows(x, _dp_group()) if self.gather else x


class HashHook(Hook):
    def __init__(self, *args):
        super().__init__(*args)
        self.hashed_inputs = []

    @torch.no_grad()
    def __call__(self, module, inputs, output):
        x = self.states(module, inputs)
        self.hashed_inputs.append(hash(tuple(x.cpu().view(-1).tolist())))


class SVDHook(Hook):
    def __init__(self, name, prepare_fn, gather, n_components: int, sim_thresh: float):
        super().__init__(name, prepare_fn, gather)
        self.n_components = n_components
        self.sim_thresh = sim_thresh
        self.svd = IncrementalPCA(n_components=n_components, lowrank_seed=42)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module, inputs, output):
        previous = self.svd.components_.clone().detach() if hasattr(self.svd, "components_") else None
        states = self.states(module, inputs)
        if states.size(0) < self.n_components:
            print(f"skipping SVD for {self.name} because there are less than {self.n_components} examples")
            return
        self.svd.partial_fit(states.to(torch.float32))
        if previous is None:
            return
        components = self.svd.components_
        if len(components.shape) == 1:
            components, previous = components.reshape(1, -1), previous.reshape(1, -1)
        self.converged = torch.nn.functional.cosine_similarity(components, previous) >= self.sim_thresh
