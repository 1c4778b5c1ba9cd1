"""HF state dicts ↔ megatron-core state dicts, full tensors, global names.

The megatron side is the whole model at TP=1, PP=1 (``decoder.layers.<i>``
with global ``i``); a rank's shard of any tensor is then
``ShardSpec.local(full)``, with ``chunks=2`` for a gated ``linear_fc1``.
Every conversion goes through :class:`~megalora.hf.arch.Arch`'s fuse/split.

A :class:`WeightSource` hands out this rank's shards of megatron tensors,
either converted from an HF model in memory or read slice by slice from the
converted-weights cache (:mod:`megalora.hf.cache`), so that a rank reads
only what it holds.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import torch

from ..sharding import ShardSpec
from .arch import Arch

EMBEDDING = "embedding.word_embeddings"


def _split_name(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def source_name(arch: Arch, name: str) -> str:
    """The tensor a megatron parameter is read from: a tied output head reads the embedding."""
    module, leaf = _split_name(name)
    if arch.tied and module == "output_layer":
        return f"{EMBEDDING}.{leaf}"
    return name


def mcore_tensor_from_hf(arch: Arch, name: str, get_hf: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The full megatron tensor ``name`` built from HF tensors.

    Args:
        arch: The architecture map.
        name: A global megatron parameter name (``decoder.layers.3.mlp.linear_fc1.weight``).
        get_hf: Returns an HF tensor by its state-dict name.
    """
    module, leaf = _split_name(source_name(arch, name))
    _, hprefix, rule = arch.rule_for_mcore(module)
    leaf = "weight" if leaf == rule.leaf else leaf
    if rule.kind == "expert":
        if leaf != "weight":
            raise KeyError(f"{name}: the HF {arch.model_type} experts have no {leaf}")
        return arch.fuse(rule, [get_hf(f"{hprefix}{rule.hf[0]}.{rule.hf_param}")]).contiguous()
    if leaf == "bias" and not rule.hf_bias:
        # Megatron switches biases on for groups of layers; HF's missing ones are zero.
        weights = [get_hf(f"{hprefix}{hf}.weight") for hf in rule.hf]
        rows = sum(w.shape[1] if rule.conv1d else w.shape[0] for w in weights)
        return torch.zeros(rows, dtype=weights[0].dtype)
    parts = [get_hf(f"{hprefix}{hf}.{leaf}") for hf in rule.hf]
    if rule.conv1d and leaf == "weight":
        parts = [p.t() for p in parts]
    return arch.fuse(rule, parts).contiguous()


def mcore_state_from_hf(arch: Arch, hf_state: Mapping[str, torch.Tensor], names=None) -> dict[str, torch.Tensor]:
    """Full megatron tensors from an HF state dict (all of them, or ``names``)."""
    names = arch.mcore_param_names() if names is None else names
    return {name: mcore_tensor_from_hf(arch, name, hf_state.__getitem__) for name in names}


def hf_parts_from_mcore(arch: Arch, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``(HF name, tensor)`` of every HF tensor the full megatron tensor ``name`` holds, as views where possible.

    Works on ``meta`` tensors too (the shapes of an export are planned that
    way). A bias megatron has but HF's architecture lacks gives none.
    """
    module, leaf = _split_name(name)
    _, hprefix, rule = arch.rule_for_mcore(module)
    leaf = "weight" if leaf == rule.leaf else leaf
    if rule.kind == "expert":
        return [(f"{hprefix}{rule.hf[0]}.{rule.hf_param}", tensor)]  # slice rule.expert of that HF tensor
    if leaf == "bias" and not rule.hf_bias:
        return []
    parts = arch.split(rule, tensor)
    if rule.conv1d and leaf == "weight":
        parts = [p.t() for p in parts]
    return [(f"{hprefix}{hf}.{leaf}", p) for hf, p in zip(rule.hf, parts)]


def hf_tensors_from_mcore(arch: Arch, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """:func:`hf_parts_from_mcore`, checked: a bias HF lacks must be zero.

    Raises:
        ValueError: If a bias that HF's architecture lacks is not zero (an
            adapter with ``lora_bias`` was merged into it, say).
    """
    module, leaf = _split_name(name)
    if leaf == "bias" and not arch.rule_for_mcore(module)[2].hf_bias and tensor.count_nonzero().item():
        raise ValueError(
            f"{name} is not zero, but the HF {arch.model_type} model has no bias there; "
            "it cannot be exported (was an adapter with lora_bias merged into it?)"
        )
    return hf_parts_from_mcore(arch, name, tensor)


class HFNames:
    """The name mapping of a merged export to an HF model's files (see ``megalora.export.MegatronNames``).

    One megatron tensor gives one or several HF tensors (``linear_qkv`` is
    split per query group into q, k and v; a gated ``linear_fc1`` into gate
    and up), so each is mapped as it arrives. A tied ``lm_head.weight`` is
    left out, as transformers' ``save_pretrained`` does.
    """

    format = "hf"

    def __init__(self, arch: Arch):
        self.arch = arch
        self._experts: dict[str, dict[int, torch.Tensor]] = {}  # HF 3-D expert tensor -> slices seen
        self.untied = False

    def check(self, keys: list[str]) -> Optional[str]:
        if self.arch.tied and "output_layer.weight" in keys:
            # A tied model whose output layer trained its own weight (an untied
            # modules_to_save copy): exported as an untied HF model, lm_head included.
            self.arch, self.untied = dataclasses.replace(self.arch, tied=False), True
        want = self.arch.mcore_param_names()
        missing, extra = sorted(set(want) - set(keys)), sorted(set(keys) - set(want))
        if missing:
            return (f"{len(missing)} megatron tensor(s) missing for the HF export, e.g. {missing[:3]}: "
                    "pass every pipeline stage's model (and every virtual chunk)")
        if extra:
            return f"megatron tensors {extra[:3]} have no counterpart in the HF {self.arch.model_type} model"
        return None

    def outputs(self, key: str, shape: tuple, dtype: torch.dtype) -> list[tuple[str, tuple, torch.dtype]]:
        meta = torch.empty(shape, dtype=dtype, device="meta")
        rule = self.arch.rule_for_mcore(_split_name(key)[0])[2]
        if rule.kind == "expert":  # one 3-D HF tensor for all experts, planned with expert 0
            return [] if rule.expert else [(name, (self.arch.num_experts, *shape), dtype)
                                           for name, _ in hf_parts_from_mcore(self.arch, key, meta)]
        return [(name, tuple(t.shape), dtype) for name, t in hf_parts_from_mcore(self.arch, key, meta)]

    def feed(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        rule = self.arch.rule_for_mcore(_split_name(key)[0])[2]
        if rule.kind != "expert":
            return hf_tensors_from_mcore(self.arch, key, tensor)
        (name, part), = hf_parts_from_mcore(self.arch, key, tensor)
        seen = self._experts.setdefault(name, {})
        seen[rule.expert] = part.clone()
        if len(seen) < self.arch.num_experts:
            return []
        del self._experts[name]
        return [(name, torch.stack([seen[e] for e in range(len(seen))]))]


# ---------------------------------------------------------------------- sources


def shard_index_ranges(spec: ShardSpec, size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """The contiguous ``[start, stop)`` ranges along ``spec.dim`` that make this rank's shard.

    Derived from :meth:`ShardSpec.local` itself applied to indices, so a
    sliced read can never disagree with the slicing rule.
    """
    index = spec.local(torch.arange(size).reshape([1] * spec.dim + [size]), rank, world).flatten().tolist()
    ranges, start = [], index[0]
    for prev, cur in zip(index, index[1:] + [None]):
        if cur != prev + 1:
            ranges.append((start, prev + 1))
            start = cur
    return ranges


class WeightSource:
    """Hands out shards of full megatron tensors, by global name.

    Attributes:
        arch: The architecture map.
        hf_config: The HF config of the model.
    """

    def __init__(self, arch: Arch, hf_config):
        self.arch = arch
        self.hf_config = hf_config

    def shape(self, name: str) -> tuple:
        raise NotImplementedError

    def local(self, name: str, spec: ShardSpec, rank: int, world: int) -> torch.Tensor:
        """This rank's shard of the full tensor ``name``."""
        raise NotImplementedError


class HFModelSource(WeightSource):
    """Converts tensors of an HF model in memory, one at a time."""

    def __init__(self, arch: Arch, hf_config, hf_state: Mapping[str, torch.Tensor]):
        super().__init__(arch, hf_config)
        self.hf_state = hf_state

    def _full(self, name: str) -> torch.Tensor:
        return mcore_tensor_from_hf(self.arch, name, lambda k: self.hf_state[k].detach())

    def shape(self, name: str) -> tuple:
        return tuple(self._full(name).shape)

    def local(self, name: str, spec: ShardSpec, rank: int, world: int) -> torch.Tensor:
        return spec.local(self._full(name), rank, world)


class SafetensorsSource(WeightSource):
    """Reads shards from a safetensors file of full megatron tensors, slice by slice."""

    def __init__(self, arch: Arch, hf_config, path: str):
        from safetensors import safe_open

        super().__init__(arch, hf_config)
        self.path = path
        self._file = safe_open(path, framework="pt")

    def shape(self, name: str) -> tuple:
        return tuple(self._file.get_slice(source_name(self.arch, name)).get_shape())

    def local(self, name: str, spec: ShardSpec, rank: int, world: int) -> torch.Tensor:
        handle = self._file.get_slice(source_name(self.arch, name))
        shape = handle.get_shape()
        if not spec.sharded or world == 1:
            return handle[:]
        if shape[spec.dim] % (spec.chunks * world):
            return spec.local(handle[:], rank, world)  # ShardSpec raises its own clear error
        pieces = []
        for start, stop in shard_index_ranges(spec, shape[spec.dim], rank, world):
            index = [slice(None)] * len(shape)
            index[spec.dim] = slice(start, stop)
            pieces.append(handle[tuple(index)])
        return torch.cat(pieces, dim=spec.dim).contiguous()
