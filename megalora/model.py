"""The PEFT API: ``get_peft_model`` and ``PeftModel``, for plain and Megatron models.

``PeftModel.base_model`` is a :class:`LoraModel` whose ``model`` is the user's
model with LoRA layers swapped in, so state-dict keys read
``base_model.model.<path>.lora_A.<adapter>.weight`` as in PEFT.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .collectives import all_gather_objects, all_reduce_sum, group_rank
from .parallel_groups import megatron_parallel_state
from .config import LoraConfig
from .layers import LoraLayer, create_lora_layer, megatron_core_module
from .layers.modules_to_save import ModulesToSaveWrapper, unwrap
from .replication import restore_shared, unshare_for_merge
from .targeting import ModelChunks, describe_no_match, find_targets, global_module_names


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def _lora_init_seed() -> int:
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
    """Injects LoRA layers into ``model`` and manages them (PEFT's ``LoraModel``)."""

    prefix = "lora_"

    def __init__(self, model: nn.Module | Sequence[nn.Module], config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
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

    def _adapter_modules(self):
        return [m for _, m in self.lora_layers()] + [m for _, m in self.saved_module_wrappers()]

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
        targets = find_targets(self.model, config, mcore)
        if sum(all_gather_objects(len(targets))) == 0:
            raise ValueError(describe_no_match(config))
        for target in targets:
            module = target.module
            if not isinstance(module, LoraLayer):
                module = create_lora_layer(module, target.global_name, config.fan_in_fan_out, mcore)
                _set_submodule(self.model, target.local_name, module)
            module.update_layer(
                adapter_name,
                target.r,
                target.alpha,
                lora_dropout=config.lora_dropout,
                init_lora_weights=config.init_lora_weights,
                use_rslora=config.use_rslora,
                use_dora=config.use_dora,
                lora_bias=config.lora_bias,
                seed=_lora_init_seed(),
                global_name=target.global_name,
                inference_mode=config.inference_mode,
            )
            dtype = _params_dtype(config.megatron_config)
            if dtype is not None:
                for layer_name in module.adapter_layer_names:
                    if adapter_name in getattr(module, layer_name):
                        getattr(module, layer_name)[adapter_name].to(dtype)
        self._add_modules_to_save(adapter_name, config)
        self.peft_config[adapter_name] = config
        self._mark_only_adapters_as_trainable(config)

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

    def _add_modules_to_save(self, adapter_name: str, config: LoraConfig) -> None:
        if not config.modules_to_save:
            return
        names = global_module_names(self.model)
        for local_name, module in list(self.model.named_modules()):
            if not local_name or isinstance(module, LoraLayer) or ".modules_to_save." in f".{local_name}.":
                continue
            key = names[local_name]
            if not any(key == m or key.endswith(f".{m}") for m in config.modules_to_save):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
            elif ".original_module" not in local_name:
                _set_submodule(self.model, local_name, ModulesToSaveWrapper(module, adapter_name))

    def _mark_only_adapters_as_trainable(self, config: LoraConfig) -> None:
        for name, param in self.model.named_parameters():
            if self.prefix not in name and ".modules_to_save." not in name:
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

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            if layer.merged:
                layer.unmerge()
            restore_shared(layer)

    def _unload(self, merge: bool, progressbar: bool, safe_merge: bool, adapter_names) -> nn.Module:
        layers = self.lora_layers()
        show = progressbar and group_rank(None) == 0
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
        for name, wrapper in self.saved_module_wrappers():
            _set_submodule(self.model, name, unwrap(wrapper, keep_trained=merge))
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


class PeftModel(nn.Module):
    """A model with LoRA adapters, with PEFT's methods.

    Attribute access falls through to the wrapped model, so megatron-core's
    schedules find ``set_input_tensor`` and ``config`` as on the bare model.
    """

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = LoraModel(model, peft_config, adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    def forward(self, *args, **kwargs):
        if self.base_model.is_chunked:
            raise TypeError("this PeftModel holds virtual-pipeline chunks: call each chunk (peft_model[i]) instead")
        return self.base_model.model(*args, **kwargs)

    # Virtual-pipeline chunks: the schedule runs the chunks themselves, which
    # were adapted in place.
    def __getitem__(self, index: int) -> nn.Module:
        return self.base_model.model[index] if self.base_model.is_chunked else [self.base_model.model][index]

    def __len__(self) -> int:
        return len(self.base_model.model) if self.base_model.is_chunked else 1

    def __iter__(self):
        return iter(list(self.base_model.model) if self.base_model.is_chunked else [self.base_model.model])

    # ------------------------------------------------------------------ delegation

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self):
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    def get_base_model(self):
        """The adapted model, or the list of adapted chunks."""
        return list(self.base_model.model) if self.base_model.is_chunked else self.base_model.model

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add a new adapter; the active adapter does not change."""
        active = self.base_model.active_adapter
        self.base_model.inject_adapter(adapter_name, peft_config)
        self.base_model.set_adapter(active)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    def enable_adapter_layers(self) -> None:
        self.base_model.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        self.base_model.disable_adapter_layers()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block."""
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs) -> None:
        """PEFT's ``add_weighted_adapter``; see :func:`megalora.merge.add_weighted_adapter`."""
        from .merge import add_weighted_adapter

        add_weighted_adapter(self.base_model, adapters, weights, adapter_name, **kwargs)

    def sync_lora_grads(self) -> int:
        """Sum the replicated LoRA factors' partial grads across TP; see :func:`megalora.sync_lora_grads`."""
        from . import sync_lora_grads

        return sync_lora_grads(self)

    # ------------------------------------------------------------------ counting

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts of the whole model, the same at every layout.

        Collective over megatron-core's model-parallel (TP x PP) group when it
        is initialized: call it on every rank. A TP-sharded tensor
        (``tensor_model_parallel``) is counted on every TP rank, so its shards
        add up to the full tensor; a replicated one on TP rank 0 only; the last
        pipeline stage's copy of a tied embedding (``shared``) not at all;
        pipeline stages are summed, data-parallel replicas are not.
        """
        from .collectives import all_reduce_sum
        from .parallel_groups import megatron_parallel_state

        ps = megatron_parallel_state()
        tp_rank = ps.get_tensor_model_parallel_rank() if ps is not None else 0
        trainable = total = 0
        for _, param in self.named_parameters():
            if getattr(param, "shared", False):
                continue
            if tp_rank != 0 and not getattr(param, "tensor_model_parallel", False):
                continue
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        if ps is None:
            return trainable, total
        counts = torch.tensor([trainable, total], dtype=torch.int64)
        all_reduce_sum(counts, ps.get_model_parallel_group())
        return int(counts[0]), int(counts[1])

    def print_trainable_parameters(self) -> None:
        """Prints the global counts on global rank 0; collective like :meth:`get_nb_trainable_parameters`."""
        trainable, total = self.get_nb_trainable_parameters()
        if _global_rank() == 0:
            print(
                f"trainable params: {trainable:,d} || all params: {total:,d} || "
                f"trainable%: {100 * trainable / max(total, 1):.4f}"
            )

    # ------------------------------------------------------------------ files

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[Sequence[str]] = None, **kwargs) -> None:
        """Write each adapter in PEFT's format; collective under TP/PP (see :mod:`megalora.checkpoint`)."""
        from .checkpoint import save_adapters

        save_adapters(self, save_directory, selected_adapters=selected_adapters, **kwargs)

    def load_adapter(self, model_id: str, adapter_name: str = "default", is_trainable: bool = False, **kwargs):
        from .checkpoint import load_adapter

        return load_adapter(self, model_id, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[LoraConfig] = None,
        **kwargs,
    ) -> "PeftModel":
        """Load a saved adapter onto ``model`` (PEFT's ``PeftModel.from_pretrained``)."""
        from .checkpoint import from_pretrained

        return from_pretrained(cls, model, model_id, adapter_name, is_trainable, config, **kwargs)


def _global_rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", **kwargs) -> PeftModel:
    """Inject LoRA into ``model`` and return it as a :class:`PeftModel`.

    Args:
        model: A plain PyTorch model, a megatron-core model (one pipeline
            stage: names are global), or the list of a stage's
            virtual-pipeline chunks, which are all adapted in place and saved
            together.
        peft_config: The LoRA configuration.
        adapter_name: Name of the first adapter.
    """
    return PeftModel(model, peft_config, adapter_name)
