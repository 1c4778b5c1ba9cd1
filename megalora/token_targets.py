"""Which layers ``trainable_token_indices`` wraps, and what the tied output layer does (PEFT 0.21's rules).

* The list form targets the input embedding; the dict form names modules:
  ``embedding`` / ``word_embeddings`` (the input embedding), ``output_layer``,
  and, on a plain model, any module name (PEFT's ``.``-suffix match).
* On a tied model (megatron-core's ``share_embeddings_and_output_weights``, or
  an output layer holding the embedding's very weight), wrapping the input
  embedding also ties the output layer to its rows, unless the dict gives the
  output layer other ids and ``ensure_weight_tying=False``: then the two train
  independent rows (logged). Other ids with ``ensure_weight_tying=True`` are
  an error, as in PEFT.
* A tied output layer in the embedding's chunk (PP=1) shares its delta; at
  PP>1 the last stage holds a copy kept equal through megatron's embedding
  group and saved under the embedding's key.

Every rank decides from the config alone, so the first and last stage agree
without talking; the problems found are gathered by the caller and raised on
every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .layers import LoraLayer
from .layers.trainable_tokens import TrainableTokensLayer, vocab_layout
from .targeting import ModelChunks, global_module_names

FIELD = "trainable_token_indices"
EMBEDDING_KEYS = ("embedding", "word_embeddings")
OUTPUT_KEYS = ("output_layer",)
MCORE_EMBEDDING = "embedding.word_embeddings"
MCORE_OUTPUT = "output_layer"


@dataclass
class TokenTarget:
    """One layer to wrap on this rank.

    Attributes:
        local_name: Its name in the model (chunk index first under VPP).
        global_name: Its layout-independent name.
        ids: The token ids it trains.
        saved_name: The module name its rows are saved under.
        tied_to: Local name of the embedding layer whose rows it shares (PP=1 tie).
        synced: Its gradient is summed over megatron's embedding group (PP>1 tie).
        source: The table its rows start from (this rank's shard).
    """

    local_name: str
    global_name: str
    ids: list
    saved_name: str
    tied_to: Optional[str] = None
    synced: bool = False
    source: Optional[torch.Tensor] = None


def _unwrap(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TrainableTokensLayer) else module


def _ends(chunk: nn.Module, names: dict, prefix: str) -> tuple[Optional[str], Optional[str], bool, Optional[nn.Module]]:
    """``(embedding local name, output local name, tied, model)`` of one chunk (or a plain model)."""
    emb = out = None
    owner = None
    for local, module in chunk.named_modules():
        glob = names[f"{prefix}{local}" if local else prefix.rstrip(".")]
        if hasattr(module, "share_embeddings_and_output_weights") and owner is None:
            owner = module
        if glob == MCORE_EMBEDDING or glob.endswith("." + MCORE_EMBEDDING):
            emb = local
        elif glob == MCORE_OUTPUT or glob.endswith("." + MCORE_OUTPUT):
            out = local
    if owner is not None:
        return emb, out, bool(owner.share_embeddings_and_output_weights), owner
    # A plain model: PEFT's input/output embeddings, tied when they hold one weight.
    get_in, get_out = getattr(chunk, "get_input_embeddings", None), getattr(chunk, "get_output_embeddings", None)
    modules = {id(m): n for n, m in chunk.named_modules()}
    emb_mod = get_in() if callable(get_in) else next((m for m in chunk.modules() if isinstance(m, nn.Embedding)), None)
    out_mod = get_out() if callable(get_out) else None
    emb = modules.get(id(emb_mod)) if emb_mod is not None else None
    out = modules.get(id(out_mod)) if out_mod is not None else None
    tied = emb_mod is not None and out_mod is not None and getattr(_unwrap(out_mod), "weight", 1) is getattr(
        _unwrap(emb_mod), "weight", 2)
    return emb, out, tied, chunk


def _resolve(spec) -> tuple[Optional[list], Optional[list], dict]:
    """``(embedding ids, output ids, {other module name: ids})`` from the config's value."""
    if not isinstance(spec, dict):
        return list(spec), None, {}
    emb = out = None
    other = {}
    for key, ids in spec.items():
        if key in EMBEDDING_KEYS:
            emb = list(ids)
        elif key in OUTPUT_KEYS:
            out = list(ids)
        else:
            other[key] = list(ids)
    return emb, out, other


def _problems_for(name: str, ids: list, module: nn.Module, saved_locals: set, local: str) -> list[str]:
    out = []
    if isinstance(module, LoraLayer):
        out.append(f"{FIELD}: {name} is also a LoRA target; trainable tokens and LoRA on one layer are not "
                   f"supported (nor in PEFT): remove {name.rsplit('.', 1)[-1]!r} from target_modules")
    if local in saved_locals:
        out.append(f"{FIELD}: {name} is also in modules_to_save; train it fully or train some tokens, not both "
                   "(PEFT forbids it): drop one of the two")
    vocab = vocab_layout(_unwrap(module.get_base_layer() if isinstance(module, LoraLayer) else module))[0]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        out.append(f"{FIELD}: ids {bad[:5]} are outside the vocabulary [0, {vocab}) of {name}; pass ids of "
                   "the resized tokenizer (resize the embeddings first to add tokens)")
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        out.append(f"{FIELD}: ids {twice[:5]} are listed more than once for {name}; list each id once")
    return out


def plan_tokens(model: nn.Module, config, saved_locals: set) -> tuple[list[TokenTarget], list[str], dict, list[str]]:
    """This rank's layers to wrap, the problems found, the keys matched here and notes to log.

    Returns:
        ``(targets, problems, matched, notes)``: ``matched`` counts, per dict
        key, the modules it matched on this rank (a key may live on another
        pipeline stage: the caller sums them over ranks).
    """
    spec = config.trainable_token_indices
    if spec is None:
        return [], [], {}, []
    ensure = bool(config.ensure_weight_tying)
    chunks = list(model) if isinstance(model, ModelChunks) else [model]
    names = global_module_names(model)
    targets, problems, notes = [], [], []
    matched = {key: 0 for key in (spec if isinstance(spec, dict) else ["embedding"])}
    emb_ids, out_ids, other = _resolve(spec)
    for index, chunk in enumerate(chunks):
        prefix = f"{index}." if isinstance(model, ModelChunks) else ""
        emb, out, tied, owner = _ends(chunk, names, prefix)
        gname = {local: names[f"{prefix}{local}"] for local in (emb, out) if local is not None}
        mismatch = emb_ids is not None and out_ids is not None and emb_ids != out_ids
        if tied and mismatch and ensure:
            problems.append(f"{FIELD}: ensure_weight_tying=True but the embedding and the output layer get different "
                            "ids; give both the same ids, or set ensure_weight_tying=False to train them apart")
            continue
        tie = tied and emb_ids is not None and (ensure or not mismatch)
        emb_global = gname.get(emb, MCORE_EMBEDDING)
        if emb is not None and emb_ids is not None:
            for key in EMBEDDING_KEYS:
                if key in matched:
                    matched[key] += 1
            module = chunk.get_submodule(emb)
            problems += _problems_for(gname[emb], emb_ids, module, saved_locals, prefix + emb)
            targets.append(TokenTarget(prefix + emb, gname[emb], emb_ids, gname[emb],
                                       synced=tie and out is None, source=_unwrap(module).weight))
        if out is not None and (tie or out_ids is not None):
            if OUTPUT_KEYS[0] in matched:
                matched[OUTPUT_KEYS[0]] += 1
            module = chunk.get_submodule(out)
            ids = emb_ids if tie else out_ids
            problems += _problems_for(gname[out], ids, module, saved_locals, prefix + out)
            weight = getattr(_unwrap(module), "weight", None)
            if weight is None and owner is not None and hasattr(owner, "shared_embedding_or_output_weight"):
                weight = owner.shared_embedding_or_output_weight()
            if tie and emb is not None:
                targets.append(TokenTarget(prefix + out, gname[out], ids, emb_global, tied_to=prefix + emb))
            elif tie:
                targets.append(TokenTarget(prefix + out, gname[out], ids, MCORE_EMBEDDING, synced=True, source=weight))
            else:
                if tied:
                    notes.append(f"{FIELD}: {gname[out]} trains its own rows {out_ids}, untied from the word "
                                 "embeddings (PEFT's rule for different ids with ensure_weight_tying=False)")
                targets.append(TokenTarget(prefix + out, gname[out], ids, gname[out], source=weight))
        if ensure and not tied and (emb is not None or out is not None):
            notes.append(f"{FIELD}: ensure_weight_tying=True but the model's embeddings are not tied; nothing to tie")
        for key, ids in other.items():
            for local, module in chunk.named_modules():
                glob = names[f"{prefix}{local}"] if local else ""
                if local and (glob == key or glob.endswith("." + key)) and not _internal(local):
                    matched[key] += 1
                    problems += _problems_for(glob, ids, module, saved_locals, prefix + local)
                    targets.append(TokenTarget(prefix + local, glob, ids, glob, source=_unwrap(module).weight))
    return targets, problems, matched, notes


def _internal(local: str) -> bool:
    parts = local.split(".")
    return any(p in ("base_layer", "token_adapter", "original_module", "modules_to_save") for p in parts)


def describe_unmatched(config, missing: list) -> str:
    """The one-line error for dict keys that matched no module on any rank."""
    return (f"{FIELD}: {missing} matched no module; name the input embedding 'embedding' (or 'word_embeddings') "
            "and the output layer 'output_layer' on a megatron-core model, or a module name of a plain model")
