"""``LoraModel``: LoRA injected into a plain or Megatron model, and its adapters managed.

``PeftModel.base_model`` (:mod:`megalora.peft_model`) is a :class:`LoraModel`
whose ``model`` is the user's model with LoRA layers swapped in, so state-dict
keys read ``base_model.model.<path>.lora_A.<adapter>.weight`` as in PEFT.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .collectives import all_gather_objects, group_rank
from .config import LoraConfig
from .initializers.base_weight import init_adapter_from_base, reads_base_weight
from .layers import LoraLayer, create_lora_layer, megatron_core_module
from .layers.embedding import mark_tied_embeddings
from .layers.grouped import LoraGroupedMLP
from .layers.modules_to_save import (ModulesToSaveWrapper, is_tied_output, plan_saved_modules, untie_owner,
                                     untied_message, untied_owners, unwrap)
from .layers.trainable_tokens import TrainableTokensLayer
from .replica_sharing import restore_shared, unshare_for_merge
from .token_targets import TokenTarget, describe_unmatched, plan_tokens
from .targeting import (ModelChunks, describe_no_match, describe_no_saved_match, find_saved_modules, find_targets,
                        global_module_names, grouped_experts_to_wrap)

logger = logging.getLogger(__name__)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def _lora_init_seed() -> int:
    """The default LoRA init seed: the one ``init_parallel`` recorded, else ``torch.initial_seed()``."""
    from . import lora_seed

    return lora_seed.lora_init_seed()


def _params_dtype(megatron_config) -> Optional[torch.dtype]:
    if megatron_config is None:
        return None
    dtype = megatron_config.get("params_dtype") if isinstance(megatron_config, dict) else getattr(
        megatron_config, "params_dtype", None
    )
    return dtype if isinstance(dtype, torch.dtype) else None


class LoraModel(nn.Module):
    """Injects LoRA layers into ``model`` and manages them (PEFT's ``LoraModel``).

    Args:
        model: The model, or a pipeline stage's list of virtual-pipeline chunks.
        config: The first adapter's configuration.
        adapter_name: The first adapter's name.
        seed: The base seed of every adapter's LoRA init (it must be the same on
            every rank). ``None``: the seed given to
            :func:`megalora.init_parallel` (or recorded by the Megatron-LM
            plug-in), else ``torch.initial_seed()``.
    """

    prefix = "lora_"

    def __init__(self, model: nn.Module | Sequence[nn.Module], config: LoraConfig, adapter_name: str = "default",
                 seed: Optional[int] = None):
        super().__init__()
        self.seed = int(_lora_init_seed() if seed is None else seed)
        self.model = ModelChunks(model) if isinstance(model, (list, tuple)) else model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self.inject_adapter(adapter_name, config)
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    # ------------------------------------------------------------------ traversal

    def lora_layers(self) -> list[tuple[str, LoraLayer]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    def saved_module_wrappers(self) -> list[tuple[str, ModulesToSaveWrapper]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    def token_layers(self) -> list[tuple[str, TrainableTokensLayer]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, TrainableTokensLayer)]

    def _adapter_modules(self):
        return ([m for _, m in self.lora_layers()] + [m for _, m in self.saved_module_wrappers()]
                + [m for _, m in self.token_layers()])

    # ------------------------------------------------------------------ injection

    def inject_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Add adapter ``adapter_name`` on every module ``config`` selects.

        Collective under ``torch.distributed``: the match counts of all ranks are
        compared first, so that a config that selects nothing anywhere fails on
        every rank together, while a pipeline stage without matches is fine.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; choose another adapter_name")
        config.raise_if_unimplemented()
        if config.layer_replication:
            self._replicate_layers(config.layer_replication)
        mcore = megatron_core_module(config.megatron_core)
        grouped_problem = self._wrap_grouped_experts(config)
        targets = find_targets(self.model, config, mcore)
        saved, saved_counts = find_saved_modules(self.model, config)
        saved = plan_saved_modules(self.model, config, saved)
        names = global_module_names(self.model)
        untied = [names[name] for name, _, plan in saved if plan is not None and plan.untied]
        # Layers are built (not yet swapped in) before the gather, so that what
        # a variant refuses on one stage only (QALoRA groups straddling a TP shard)
        # fails on every rank together instead of hanging the others.
        layers, problem = _build_layers(targets, config, mcore, adapter_name)
        tie = grouped_problem or _tie_problem(self.model, targets, config)
        problem = ("ValueError", tie) if tie else problem
        tokens, token_problems, token_matched, token_notes = plan_tokens(self.model, config, {n for n, _, _ in saved})
        # One gather, before anything changes: a config that selects nothing anywhere, or a
        # problem seen on one stage only, fails on every rank together; a stage without
        # matches is fine.
        reports = all_gather_objects((len(targets), saved_counts, problem, untied,
                                      token_problems, token_matched, token_notes))
        # Before the no-match check: a refused target (grouped experts) can be why nothing matched.
        problem = next((r[2] for r in reports if r[2]), None)
        if problem:
            kind, text = problem
            raise (TypeError if kind == "TypeError" else ValueError)(text)
        token_problem = next((r[4][0] for r in reports if r[4]), None)
        if token_problem:
            raise ValueError(token_problem)
        unmatched = [k for k in token_matched if not any(r[5].get(k) for r in reports)]
        if unmatched:
            raise ValueError(describe_unmatched(config, unmatched))
        if sum(r[0] for r in reports) == 0 and config.trainable_token_indices is None:
            raise ValueError(describe_no_match(config))
        missing = [e for i, e in enumerate(config.modules_to_save or []) if not any(r[1][i] for r in reports)]
        if missing:
            raise ValueError(describe_no_saved_match(config, missing))
        for target, module in zip(targets, layers):
            if module is not target.module:
                _set_submodule(self.model, target.local_name, module)
            module.update_layer(adapter_name, config, r=target.r, lora_alpha=target.alpha, seed=self.seed)
            dtype = _params_dtype(config.megatron_config)
            if dtype is not None:
                for layer_name in module.adapter_layer_names:
                    if adapter_name in getattr(module, layer_name):
                        getattr(module, layer_name)[adapter_name].to(dtype)
        if reads_base_weight(config.init_lora_weights):
            # Collective (every rank, targets or not): factors and base weights from the full weights.
            init_adapter_from_base([m for _, m in self.lora_layers()], adapter_name, config, self.seed)
        for local_name, module, plan in saved:
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name, plan)
            else:
                wrapper = ModulesToSaveWrapper(module, adapter_name, plan, global_name=names[local_name])
                _set_submodule(self.model, local_name, wrapper)
        self._wrap_tokens(adapter_name, tokens)
        untied = sorted({name for r in reports for name in r[3]})
        notes = sorted({note for r in reports for note in r[6]})
        if group_rank(dist.group.WORLD) == 0:
            if untied:
                logger.warning(untied_message(untied))
            for note in notes:
                logger.warning(note)
        mark_tied_embeddings(self.model)
        self.peft_config[adapter_name] = config
        self._mark_only_adapters_as_trainable(config)

    def _wrap_tokens(self, adapter_name: str, tokens: list[TokenTarget]) -> None:
        """Wrap (or extend) the layers ``trainable_token_indices`` selects, embeddings first."""
        for target in tokens:
            module = self.model.get_submodule(target.local_name)
            if not isinstance(module, TrainableTokensLayer):
                tied_to = self.model.get_submodule(target.tied_to) if target.tied_to else None
                module = TrainableTokensLayer(module, target.global_name, target.saved_name, tied_to, target.synced)
                _set_submodule(self.model, target.local_name, module)
            module.update_layer(adapter_name, target.ids, target.source)

    def _wrap_grouped_experts(self, config: LoraConfig) -> Optional[str]:
        """Wrap the grouped experts ``target_parameters`` selects (see :mod:`megalora.layers.grouped`).

        Returns the problem, if any, instead of raising, so that every rank
        raises it together after the match counts are gathered.
        """
        found = grouped_experts_to_wrap(self.model, config)
        bad = [f for f in ("use_dora", "lora_bias") if found and getattr(config, f)]
        if bad:
            return (f"{bad[0]}=True is not supported on grouped expert weights ({found[0][1]}), as in PEFT's "
                    f"target_parameters; set {bad[0]}=False")
        try:
            for local_name, global_name, module in found:
                _set_submodule(self.model, local_name, LoraGroupedMLP(module, global_name))
        except NotImplementedError as exc:
            return str(exc)
        return None

    def _replicate_layers(self, layer_map) -> None:
        """PEFT's ``layer_replication``, applied once, before targeting (see :mod:`megalora.replication`)."""
        from .replication import replicate_layers

        wanted = [list(pair) for pair in layer_map]
        done = getattr(self, "_layer_replication", None)
        if done is not None:
            if done != wanted:
                raise ValueError(
                    f"layer_replication={wanted} differs from the {done} this model was already built with; "
                    "give every adapter the same layer_replication, or none")
            return
        if self.peft_config:
            raise ValueError("layer_replication must be set on the first adapter, before any adapter is injected")
        self.replication = replicate_layers(self.model, wanted)
        self._layer_replication = wanted

    def _mark_only_adapters_as_trainable(self, config: LoraConfig) -> None:
        for name, param in self.model.named_parameters():
            if self.prefix not in name and ".modules_to_save." not in name and "trainable_tokens_delta" not in name:
                param.requires_grad_(False)
        # As PEFT: the ``bias`` setting of every *active* adapter applies, so adding
        # an inactive adapter with bias="none" keeps the active one's biases trainable.
        biases = {self.peft_config[a].bias for a in self.active_adapters if a in self.peft_config}
        if "all" in biases:
            for name, param in self.model.named_parameters():
                # PEFT's rule, the one saving follows: parameters named ``bias`` (not a TE ``layer_norm_bias``).
                if (name == "bias" or name.endswith(".bias")) and ".original_module." not in name:
                    param.requires_grad_(True)
        if "lora_only" in biases:
            for _, layer in self.lora_layers():
                bias = getattr(layer.get_base_layer(), "bias", None)
                if isinstance(bias, nn.Parameter):
                    bias.requires_grad_(True)
        for _, wrapper in self.saved_module_wrappers():
            wrapper.set_adapter(wrapper.active_adapters, inference_mode=config.inference_mode)

    # ------------------------------------------------------------------ adapters

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"adapter(s) {missing} not found; available: {list(self.peft_config)}")
        for module in self._adapter_modules():
            if isinstance(module, LoraLayer) and module.merged:
                module.unmerge()
            module.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in self._adapter_modules():
            module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; available: {list(self.peft_config)}")
        del self.peft_config[adapter_name]
        for module in self._adapter_modules():
            module.delete_adapter(adapter_name)
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        if remaining:
            self.set_adapter(remaining[0] if len(remaining) == 1 else remaining)
        else:
            self.active_adapter = []

    # ------------------------------------------------------------------ merging

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        for _, layer in self.lora_layers():
            # Replicated layers share base weights but not deltas: copy on merge.
            unshare_for_merge(layer, adapter_names)
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for _, layer in self.token_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            if layer.merged:
                layer.unmerge()
            restore_shared(layer)
        for _, layer in self.token_layers():
            layer.unmerge()

    def _unload(self, merge: bool, progressbar: bool, safe_merge: bool, adapter_names) -> nn.Module:
        layers = self.lora_layers()
        show = progressbar and _global_rank() == 0
        for name, layer in tqdm(layers, desc=f"{'Unloading and merging' if merge else 'Unloading'} model",
                                disable=not show):
            if merge:
                unshare_for_merge(layer, adapter_names)
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            else:
                if layer.merged:
                    layer.unmerge()
                restore_shared(layer)
            _set_submodule(self.model, name, layer.get_base_layer())
        for name, layer in self.token_layers():
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            else:
                layer.unmerge()
            _set_submodule(self.model, name, layer.get_base_layer())
        configs = [self.peft_config[a] for a in self.active_adapters if a in self.peft_config]
        untie = untied_owners(self.model, configs) if merge else []
        for name, wrapper in self.saved_module_wrappers():
            _set_submodule(self.model, name, unwrap(wrapper, keep_trained=merge))
        for owner, weight in untie:
            untie_owner(owner, weight)
        for name, grouped in [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraGroupedMLP)]:
            _set_submodule(self.model, name, grouped.base_layer)
        return list(self.model) if self.is_chunked else self.model

    @property
    def is_chunked(self) -> bool:
        return isinstance(self.model, ModelChunks)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None
    ) -> nn.Module:
        """Merge the adapters and return the base model with its original layers."""
        return self._unload(True, progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Drop every adapter and return the base model as it was."""
        return self._unload(False, False, False, None)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _tie_problem(model: nn.Module, targets: list, config: LoraConfig) -> Optional[str]:
    """Why ``config`` cannot be applied to a layer tied to the embeddings (``None`` if it can).

    DoRA and the base-rewriting inits (PiSSA, OLoRA, LoftQ) need the layer's own
    weight, which a tied output layer lacks at PP=1; refused at every layout, so
    that a config means the same at each.
    """
    rewrites = reads_base_weight(config.init_lora_weights)
    if not (config.use_dora or rewrites):
        return None
    what, fix = ((f"init_lora_weights={config.init_lora_weights!r}", "use init_lora_weights=True") if rewrites
                 else ("use_dora=True", "set use_dora=False"))
    for target in targets:
        parent_name, _, leaf = target.local_name.rpartition(".")
        if is_tied_output(model.get_submodule(parent_name) if parent_name else model, leaf):
            return (f"{what} cannot adapt {target.global_name}: it is tied to the word embeddings "
                    f"(share_embeddings_and_output_weights) and has no weight of its own; {fix} or "
                    f"remove {leaf!r} from target_modules")
    return None


def _build_layers(targets: list, config: LoraConfig, mcore, adapter_name: str) -> tuple[list, Optional[tuple]]:
    """This rank's LoRA layers for ``targets`` (not swapped in yet), and the first problem as ``(kind, text)``.

    An unsupported module type (``TypeError``) or a refusal of ``config`` by a
    layer (QALoRA's groups, embeddings) is returned, not raised, so that the
    caller raises it on every rank after its one gather.
    """
    layers = []
    for target in targets:
        try:
            layer = target.module if isinstance(target.module, LoraLayer) else create_lora_layer(
                target.module, target.global_name, config, mcore)
        except TypeError as exc:
            return layers, ("TypeError", str(exc))
        try:
            layer.check_config(config, adapter_name)
        except (ValueError, NotImplementedError) as exc:
            return layers, ("ValueError", str(exc))
        layers.append(layer)
    return layers, None


def _global_rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# The PEFT-facing classes live in peft_model.py; imported here for ``megalora.model.PeftModel``.
from .peft_model import PeftModel, get_peft_model  # noqa: E402,F401
