"""Trainable tokens in HF PEFT adapters: the delta key, and the module names of ``trainable_token_indices``.

PEFT stores a ``TrainableTokensLayer``'s rows as full rows under
``<module>.token_adapter.trainable_tokens_delta`` on either side, so only the
module path changes between megatron-core and HF; the dict form of
``trainable_token_indices`` names modules, which differ too.
"""

from __future__ import annotations

import torch

from ..checkpoint import PREFIX
from .arch import Arch

TOKENS = "token_adapter.trainable_tokens_delta"
# trainable_token_indices dict keys: megatron's names (megalora's) ↔ the HF module names PEFT matches.
_MCORE_TOKEN_KEYS = {"embedding": "embedding.word_embeddings", "word_embeddings": "embedding.word_embeddings",
                     "output_layer": "output_layer"}


def split_tokens(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """``({module path: token rows}, the rest)``: trainable-token rows are full rows on either side."""
    tokens, rest = {}, {}
    for key, tensor in state.items():
        body = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if body.endswith("." + TOKENS):
            tokens[body[: -len(TOKENS) - 1]] = tensor
        else:
            rest[key] = tensor
    return tokens, rest


def hf_token_indices(arch: Arch, indices):
    """``trainable_token_indices`` for the HF model: the list form as is, dict keys as HF module names."""
    if not isinstance(indices, dict):
        return indices
    out = {}
    for key, ids in indices.items():
        module = _MCORE_TOKEN_KEYS.get(key, key)
        _, hprefix, rule = arch.rule_for_mcore(module)
        out[(hprefix + rule.hf[0]).rpartition(".")[2]] = ids
    return out


def mcore_token_indices(arch: Arch, indices):
    """The inverse of :func:`hf_token_indices` (HF module names, full or last part, to megatron's keys)."""
    if not isinstance(indices, dict):
        return indices
    where = arch.hf_module_to_mcore()
    out = {}
    for key, ids in indices.items():
        module = next((m for hf, (m, _) in where.items() if hf == key or hf.endswith("." + key)), None)
        if module not in ("embedding.word_embeddings", "output_layer"):
            raise ValueError(f"trainable_token_indices: {key!r} is not the embedding or the output head of the HF "
                             f"{arch.model_type} model")
        out["embedding" if module.startswith("embedding") else "output_layer"] = ids
    return out
