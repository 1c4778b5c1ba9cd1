"""``modules_to_save``: trainable copies of whole modules, saved with the adapter."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

_TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel")


def _copy_with_tp_attributes(module: nn.Module) -> nn.Module:
    """A deep copy that keeps megatron-core's per-parameter TP attributes.

    A copy of a sharded layer (say the TP-sharded ``output_layer``) stays
    sharded, and grad clipping and saving must still see it as such.
    """
    # Process groups cannot be copied, and a copy must use the same ones (and the
    # same model config): share them.
    shared = {
        id(v): v
        for sub in module.modules()
        for v in vars(sub).values()
        if isinstance(v, torch.distributed.ProcessGroup)
        or type(v).__name__.endswith(("Config", "ProcessGroupCollection"))
    }
    clone = copy.deepcopy(module, shared)
    for (_, src), (_, dst) in zip(module.named_parameters(), clone.named_parameters()):
        for attr in _TP_ATTRS:
            if hasattr(src, attr):
                setattr(dst, attr, getattr(src, attr))
    return clone


class ModulesToSaveWrapper(nn.Module):
    """PEFT's wrapper: the original module plus one trainable copy per adapter.

    State-dict keys are PEFT's: ``<path>.original_module.*`` and
    ``<path>.modules_to_save.<adapter>.*``.
    """

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.update(adapter_name)
        self.set_adapter([adapter_name])
        self.register_load_state_dict_pre_hook(self._load_unwrapped_keys)

    def update(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = _copy_with_tp_attributes(self.original_module)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_module(self) -> nn.Module:
        if self._disable_adapters:
            return self.original_module
        for name in self._active_adapter:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.original_module.requires_grad_(False)
        for key, module in self.modules_to_save.items():
            module.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self._active_adapter = [a for a in self._active_adapter if a != adapter_name]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict = None) -> dict:
        """megatron-core distributed checkpointing (else ``__getattr__`` would hand out the active copy's).

        The original module keeps its unwrapped keys, in the checkpoint and in
        the dict (megatron-core's ``LanguageModule`` looks up
        ``output_layer.weight``; :meth:`_load_unwrapped_keys` takes them back on
        load), so a base checkpoint loads into the wrapped model. Each copy is
        keyed ``<prefix>modules_to_save.<adapter>.*``, with the copy's TP split.
        """
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import sharded_state_dict_default

        inner = f"{prefix}original_module."
        original = sharded_state_dict_default(self.original_module, inner, sharded_offsets, metadata)
        replace_prefix_for_sharding(original, inner, prefix)
        out = {prefix + key[len(inner):]: value for key, value in original.items()}
        for adapter, module in self.modules_to_save.items():
            out.update(sharded_state_dict_default(module, f"{prefix}modules_to_save.{adapter}.",
                                                  sharded_offsets, metadata))
        return out

    @staticmethod
    def _load_unwrapped_keys(module, state_dict, prefix, *_args) -> None:
        """Load hook: a key of the unwrapped module (``<prefix>weight``) goes to ``original_module``."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if not rest.startswith(("original_module.", "modules_to_save.")):
                state_dict[f"{prefix}original_module.{rest}"] = state_dict.pop(key)

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        # Code that reads attributes of the wrapped module (megatron-core reads
        # e.g. ``output_layer.weight`` or ``sequence_parallel``) sees the active copy.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)


@torch.no_grad()
def unwrap(wrapper: ModulesToSaveWrapper, keep_trained: bool) -> nn.Module:
    """The module to put back: the active trained copy, or the original."""
    return wrapper.active_module if keep_trained else wrapper.original_module
