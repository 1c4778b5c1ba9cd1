"""``layer_replication``: PEFT's stacked layer ranges, also across pipeline stages.

A ``layer_replication`` of ``[[0, 4], [2, 5]]`` on a 5-layer model builds the
7-layer stack ``0 1 2 3 2 3 4`` (global indices of the original layers). Every
position of the new stack is its own module, with its own ``layer_number`` and,
once targeting runs, its own LoRA; copies of one original layer share its frozen
base weights. Ranges follow PEFT: each is ``[start, end)`` with ``0 <= start <
end <= num_layers``; ranges may overlap or repeat (that is how layers get
copied), and layers left out of every range are dropped.

Under pipeline parallelism (and virtual pipeline chunks):

* **Split rule (balanced).** The new stack of ``T`` layers is cut into the
  ``P x V`` virtual stages in megatron-core's order (virtual stage ``k = v * P +
  p`` holds the ``k``-th slice), each getting ``T // (P*V)`` layers and the first
  ``T % (P*V)`` one more. When ``T`` divides evenly this is megatron's own even
  split; otherwise the split is written into the config as a
  ``pipeline_model_parallel_layout`` (and the uneven-stage fields are cleared),
  so that megatron's ``get_transformer_layer_offset`` and
  ``get_num_layers_to_build``, which its ``sharded_state_dict`` and inference
  code call, agree with the new stack. ``config.num_layers`` becomes ``T`` and
  each ``TransformerBlock.num_layers_per_pipeline_rank`` its new local count.
* **Base weights.** A copy whose source layer lives on the same stage (any of
  its chunks) shares the source's ``Parameter`` objects, hence storage. A copy
  whose source lives on another stage gets that layer's base weights by
  point-to-point transfer over the pipeline group, once per (source layer,
  stage); further copies on that stage share the received tensors. Each rank
  sends its own TP shard to the same TP rank of the other stage.
* **Agreement first.** Every rank checks the ranges and the plan and raises
  the same ``ValueError`` before any tensor moves (:func:`~megalora.collectives.agree_or_raise`).

Merging writes into base weights, and copies have different deltas, so
:func:`~megalora.replica_sharing.unshare_for_merge` gives a copy private base weights before a
merge and :func:`~megalora.replica_sharing.restore_shared` puts the shared ones back when the adapters are unloaded
or unmerged.

Limits: replication is applied once, with the first adapter (a later adapter
must repeat the same ``layer_replication`` or leave it unset). Under virtual
pipelining every chunk of the stage must be passed together, since a chunk's
copies may come from chunks not built yet. Base parameters left trainable
(``bias="all"``) stay tied between the copies on one stage, as in PEFT, but a
copy on another stage holds its own.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Optional, Sequence

import torch
from torch import nn

from .collectives import agree_or_raise, all_gather_objects, group_rank, group_size, recv_tensors, send_tensors
from .replica_sharing import SHARED_ATTR
from .replication_plan import balanced_split, expand_layer_map, layer_map_error, stage_starts

# Stack locations, tried in this order at each level of wrapping. megatron-core's
# GPTModel has ``decoder.layers``; HF models ``layers`` (Llama), ``encoder.layer``
# (BERT) or ``h`` (GPT-2, Falcon) under ``model`` / ``transformer`` / ``bert``.
_STACK_PATHS = ("layers", "encoder.layer", "h", "decoder.layers")
_WRAPPERS = ("model", "transformer", "bert", "module")


# ---------------------------------------------------------------------- modules


def find_layer_stack(model: nn.Module) -> Optional[tuple[nn.Module, str, str]]:
    """``(owner, attribute, dotted path)`` of the model's layer ``ModuleList``, or ``None``."""
    node, prefix = model, ""
    for _ in range(8):
        for path in _STACK_PATHS:
            owner_path, _, attr = path.rpartition(".")
            owner = node
            for part in owner_path.split(".") if owner_path else ():
                owner = getattr(owner, part, None)
            if isinstance(owner, nn.Module) and isinstance(getattr(owner, attr, None), nn.ModuleList):
                return owner, attr, prefix + path
        wrapper = next((w for w in _WRAPPERS if isinstance(getattr(node, w, None), nn.Module)), None)
        if wrapper is None:
            return None
        node, prefix = getattr(node, wrapper), f"{prefix}{wrapper}."
    return None


def clone_module(module: nn.Module, memo: Optional[dict] = None) -> nn.Module:
    """A new module tree with the same structure that shares every parameter and buffer.

    Each submodule is a new object (so ``layer_number``, hooks and LoRA layers
    added later are per copy), while config objects, process groups and
    tensors are shared, never deep-copied.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    clone = memo[id(module)] = module.__class__.__new__(module.__class__)
    clone.__dict__.update(module.__dict__)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for key, value in module.__dict__.items():
        if "hook" in key and isinstance(value, dict):  # hooks added to a copy stay on it
            clone.__dict__[key] = value.copy()
    clone._modules = {name: None if child is None else clone_module(child, memo)
                      for name, child in module._modules.items()}
    return clone


def _named_tensors(layer: nn.Module) -> list[tuple[str, torch.Tensor]]:
    params = [(f"p:{n}", p) for n, p in layer.named_parameters()]
    return params + [(f"b:{n}", b) for n, b in layer.named_buffers()]


def _signature(layer: nn.Module) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in _named_tensors(layer))


def _rebind(template: nn.Module, signature: tuple, tensors: list[torch.Tensor]) -> nn.Module:
    """A clone of ``template`` whose parameters and buffers are ``tensors`` (received ones)."""
    clone = clone_module(template)
    by_name = {name: t for (name, _, _), t in zip(signature, tensors)}
    made: dict[int, torch.Tensor] = {}
    for mod_name, mod in clone.named_modules():
        for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
            for name, old in list(table.items()):
                if old is None:
                    continue
                if id(old) not in made:
                    data = by_name[f"{kind}:{mod_name + '.' if mod_name else ''}{name}"]
                    if kind == "p":
                        new = nn.Parameter(data, requires_grad=old.requires_grad)
                        # megatron-core's TP attributes (partition_dim, ...) describe the shard.
                        new.__dict__.update({k: v for k, v in old.__dict__.items() if k != SHARED_ATTR})
                    else:
                        new = data
                    made[id(old)] = new
                table[name] = made[id(old)]
    return clone


def _renumber(layer: nn.Module, index: int, numbered: bool) -> None:
    for module in layer.modules():
        if numbered and isinstance(getattr(module, "layer_number", None), int):
            module.layer_number = index + 1  # megatron's 1-based global number
        if hasattr(module, "layer_idx"):  # transformers' cache index, as PEFT resets it
            module.layer_idx = index


# ---------------------------------------------------------------------- pipeline


def _pp_group(chunk: nn.Module):
    pgs = getattr(getattr(chunk, "decoder", None), "pg_collection", None)
    if getattr(pgs, "pp", None) is not None:
        return pgs.pp
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return ps.get_pipeline_model_parallel_group()
    except ImportError:
        pass
    return None


def _is_transformer_config(obj) -> bool:
    return hasattr(obj, "num_layers") and hasattr(obj, "pipeline_model_parallel_size")


def _update_megatron_configs(chunks, counts, starts, total: int, pp_rank: int) -> None:
    """Make megatron-core's own layer bookkeeping describe the new stack."""
    pp, vp = len(counts), len(counts[0])
    configs = {id(m.config): m.config for c in chunks for m in c.modules()
               if _is_transformer_config(getattr(m, "config", None))}
    even = total % (pp * vp) == 0
    layout = None
    if pp > 1 and not even:
        from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

        flat = [["decoder"] * counts[k % pp][k // pp] for k in range(pp * vp)]
        flat[0].insert(0, "embedding")
        flat[-1].append("loss")
        layout = PipelineParallelLayerLayout(flat, pp)
    for cfg in configs.values():
        cfg.num_layers = total
        if pp > 1:
            cfg.num_layers_in_first_pipeline_stage = None
            cfg.num_layers_in_last_pipeline_stage = None
            cfg.account_for_embedding_in_pipeline_split = False
            cfg.account_for_loss_in_pipeline_split = False
            cfg.pipeline_model_parallel_layout = layout
    if pp == 1:
        return
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    for v, chunk in enumerate(chunks):
        cfg = chunk.config
        vp_stage = v if vp > 1 else getattr(chunk, "vp_stage", None)
        got = (get_transformer_layer_offset(cfg, vp_stage, pp_rank), get_num_layers_to_build(cfg, vp_stage, pp_rank))
        if got != (starts[pp_rank][v], counts[pp_rank][v]):
            raise RuntimeError(f"megatron-core places chunk {v} of stage {pp_rank} at (offset, count)={got}, "
                               f"the replication plan at {(starts[pp_rank][v], counts[pp_rank][v])}")


def _update_hf_configs(chunks, sources: list[int], old_total: int) -> None:
    """PEFT's ``num_hidden_layers`` update, plus per-layer ``layer_types`` lists."""
    configs = {id(m.config): m.config for c in chunks for m in c.modules()
               if hasattr(getattr(m, "config", None), "num_hidden_layers")}
    for cfg in configs.values():
        cfg.num_hidden_layers = len(sources)
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and len(types) == old_total:
            cfg.layer_types = [types[s] for s in sources]


# ---------------------------------------------------------------------- entry point


def _local_view(chunks) -> tuple[Optional[str], list]:
    """This rank's stacks, or the reason none can be replicated."""
    stacks = []
    for v, chunk in enumerate(chunks):
        found = find_layer_stack(chunk)
        if found is None:
            return (f"layer_replication: no layer stack found in {type(chunk).__name__} (model chunk {v}). "
                    f"megalora looks for {', '.join(_STACK_PATHS)} on the model or under "
                    f"{', '.join('.' + w for w in _WRAPPERS)}; remove layer_replication for other models"), []
        stacks.append(found)
    vpp = getattr(getattr(chunks[0], "config", None), "virtual_pipeline_model_parallel_size", None)
    if vpp is not None and getattr(chunks[0].config, "pipeline_model_parallel_size", 1) > 1 and vpp != len(chunks):
        return (f"layer_replication: the model is configured for {vpp} virtual pipeline chunks but {len(chunks)} "
                "were given; pass the list of all of this stage's chunks to get_peft_model"), []
    return None, stacks


@dataclasses.dataclass
class _Plan:
    """What every rank agreed on: the new stack, its split, and where each source lives."""

    sources: list[int]
    counts: list[list[int]]
    starts: list[list[int]]
    owner: dict[int, int]  # source layer -> pipeline rank holding it
    signatures: dict[int, tuple]  # source layer -> its tensors' (name, shape, dtype)

    def layers_of(self, pp_rank: int, vp_stage: int) -> range:
        start = self.starts[pp_rank][vp_stage]
        return range(start, start + self.counts[pp_rank][vp_stage])

    def needed(self) -> list[tuple[int, int]]:
        """``(source, destination stage)`` of every transfer, in the order all ranks walk them."""
        pp, vp = len(self.counts), len(self.counts[0])
        return sorted({(self.sources[i], p) for p in range(pp) for v in range(vp)
                       for i in self.layers_of(p, v) if self.owner[self.sources[i]] != p})


def _agree_on_plan(layer_map, held: list[list[int]], originals: dict, group) -> _Plan:
    """Collective: gather every stage's layers, check everything, and agree (or raise everywhere)."""
    pp, pp_rank = group_size(group), group_rank(group)
    local = {"chunks": held, "signatures": {s: _signature(l) for s, l in originals.items()}}
    views = all_gather_objects(local, group) if pp > 1 else [local]
    owner, signatures, duplicate = {}, {}, False
    for p, view in enumerate(views):
        signatures.update(view["signatures"])
        for s in (s for idx in view["chunks"] for s in idx):
            duplicate |= s in owner
            owner[s] = p
    old_total, vp = len(owner), len(held)
    if duplicate or sorted(owner) != list(range(old_total)):
        error = "layer_replication: the pipeline stages' layer numbers do not form one stack 1..num_layers"
    elif any(len(view["chunks"]) != vp for view in views):
        error = "layer_replication: every pipeline stage must pass the same number of virtual chunks"
    else:
        error = layer_map_error(layer_map, old_total)
    sources = [] if error else expand_layer_map(layer_map, old_total)
    counts = balanced_split(len(sources), pp, vp)
    plan = _Plan(sources, counts, stage_starts(counts), owner, signatures)
    if not error:
        for s, dst in plan.needed():
            if dst == pp_rank and not any(sig == signatures[s] for sig in local["signatures"].values()):
                error = (f"layer_replication: stage {pp_rank} needs a copy of layer {s} from stage {owner[s]} but "
                         "holds no layer of the same structure to build it from")
    agree_or_raise(error)
    return plan


def _transfer(plan: _Plan, originals: dict, group) -> dict:
    """Collective over the pipeline group: the remote source layers this stage needs, built locally.

    Every rank walks the same ordered list, so blocking sends and receives
    pair up without deadlock.
    """
    pp_rank = group_rank(group)
    received = {}
    for s, dst in plan.needed():
        src = plan.owner[s]
        if pp_rank == src:
            send_tensors([t for _, t in _named_tensors(originals[s])], dst, group)
        elif pp_rank == dst:
            signature = plan.signatures[s]
            template = next(l for l in originals.values() if _signature(l) == signature)
            device = next((t.device for _, t in _named_tensors(template)), None)
            tensors = recv_tensors([(shape, dtype) for _, shape, dtype in signature], src, group, device)
            received[s] = _rebind(template, signature, tensors)
    return received


def _install(stack: tuple, layers: list[nn.Module], specs_by_source: dict, sources: list[int]) -> None:
    """Put ``layers`` in place of a stack, with megatron-core's per-block bookkeeping."""
    owner_module, attr, _ = stack
    setattr(owner_module, attr, nn.ModuleList(layers))
    if hasattr(owner_module, "num_layers_per_pipeline_rank"):
        owner_module.num_layers_per_pipeline_rank = len(layers)
    submodules = getattr(owner_module, "submodules", None)
    if dataclasses.is_dataclass(submodules) and isinstance(getattr(submodules, "layer_specs", None), list) \
            and all(s in specs_by_source for s in sources):
        # Replaced, not edited: the spec object may be shared with other chunks or the caller.
        owner_module.submodules = dataclasses.replace(
            submodules, layer_specs=[specs_by_source[s] for s in sources])


def replicate_layers(model: nn.Module, layer_map: Sequence[Sequence[int]]) -> dict:
    """Rebuild the layer stack of ``model`` (a model or ``ModelChunks``) by ``layer_map``.

    Collective over the pipeline group when there is one, and over the world
    group for the agreement on errors: every rank must call it.

    Returns:
        A summary: ``sources`` (the source index of each new layer),
        ``counts`` (layers per ``[pp_rank][vp_stage]``) and ``received``
        (source indices whose weights came from another stage).

    Raises:
        ValueError: On every rank alike, for bad ranges or a model whose stack
            cannot be found or rebuilt.
    """
    from .targeting import ModelChunks

    chunks = list(model) if isinstance(model, ModelChunks) else [model]
    error, stacks = _local_view(chunks)
    layers_of = [list(getattr(owner, attr)) for owner, attr, _ in stacks]
    numbered = bool(stacks) and all(isinstance(getattr(l, "layer_number", None), int)
                                    for layers in layers_of for l in layers)
    if not error and not numbered and len(chunks) > 1:
        error = "layer_replication over several model chunks needs megatron-core layers (with layer_number)"
    agree_or_raise(error)

    group = _pp_group(chunks[0]) if numbered else None
    pp_rank = group_rank(group)
    held = [[(l.layer_number - 1) if numbered else i for i, l in enumerate(layers)] for layers in layers_of]
    originals = {s: l for idx, layers in zip(held, layers_of) for s, l in zip(idx, layers)}
    plan = _agree_on_plan(layer_map, held, originals, group)
    received = _transfer(plan, originals, group)

    # A remote copy is built like the local layer it was cloned from, spec included.
    specs_by_source = {}
    for (owner_module, _, _), idx in zip(stacks, held):
        specs = getattr(getattr(owner_module, "submodules", None), "layer_specs", None)
        if isinstance(specs, list) and len(specs) == len(idx):
            specs_by_source.update(zip(idx, specs))
    for s in received:
        template = next(t for t, l in originals.items() if _signature(l) == plan.signatures[s])
        if template in specs_by_source:
            specs_by_source[s] = specs_by_source[template]

    new_stacks = []
    for v, stack in enumerate(stacks):
        layers = []
        for index in plan.layers_of(pp_rank, v):
            source = plan.sources[index]
            layer = clone_module(originals[source] if source in originals else received[source])
            _renumber(layer, index, numbered)
            layers.append(layer)
        _install(stack, layers, specs_by_source, [plan.sources[i] for i in plan.layers_of(pp_rank, v)])
        new_stacks.append(layers)

    uses = Counter(id(p) for layers in new_stacks for layer in layers for p in layer.parameters())
    for layers in new_stacks:
        for p in (p for layer in layers for p in layer.parameters()):
            if uses[id(p)] > 1:
                setattr(p, SHARED_ATTR, True)
    if numbered:
        _update_megatron_configs(chunks, plan.counts, plan.starts, len(plan.sources), pp_rank)
    else:
        _update_hf_configs(chunks, plan.sources, len(plan.owner))
    return {"sources": plan.sources, "counts": plan.counts, "received": sorted(received)}
