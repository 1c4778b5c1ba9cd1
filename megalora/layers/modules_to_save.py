"""``modules_to_save``: trainable copies of whole modules, saved with the adapter.

A megatron-core output layer tied to the word embeddings
(``share_embeddings_and_output_weights``, Megatron's default) has no weight of
its own at PP=1, and under PP its weight is a duplicate that
``finalize_model_grads`` all-reduces with the first stage's embedding. Its
trained copy is untied on purpose, as PEFT does by default
(``ensure_weight_tying=False``): see :func:`tied_weight_plan`.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from ..parallel_groups import model_tp_group
from .face import unwrapped_keys_to
from .tensors import AdapterTensor, model_tensor_spec

_TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel")


def is_tied_output(parent: nn.Module, leaf: str) -> bool:
    """Whether ``parent.<leaf>`` is a megatron-core output layer tied to the word embeddings."""
    return leaf == "output_layer" and bool(getattr(parent, "share_embeddings_and_output_weights", False))


def tied_weight_plan(parent: nn.Module, leaf: str, ensure_weight_tying: bool = False) -> Optional[torch.Tensor]:
    """What a trained copy of ``parent.<leaf>`` does about a weight tied to the embeddings.

    The one place this is decided. With PEFT's default
    (``ensure_weight_tying=False``) the copy is untied: it gets its own weight,
    initialised from the tied one and used instead of the weight the model
    passes at forward, while the frozen original stays what
    ``shared_embedding_or_output_weight()`` returns, so the embedding all-reduce
    of ``finalize_model_grads`` sees a frozen weight on every stage.

    Args:
        parent: The module holding the one to copy (a ``GPTModel`` for ``output_layer``).
        leaf: The attribute name of the module to copy.
        ensure_weight_tying: PEFT's switch to keep the tie (train embedding and
            output together); not implemented yet (``LoraConfig`` refuses it).

    Returns:
        The tensor the untied copy's weight starts from, or ``None`` if the
        module is not tied (the copy then is a plain deep copy).
    """
    if not is_tied_output(parent, leaf):
        return None
    if ensure_weight_tying:
        raise NotImplementedError("ensure_weight_tying=True is not implemented yet; leave it False")
    return parent.shared_embedding_or_output_weight()


def untied_message(names: Sequence[str]) -> str:
    """The one-line notice that :func:`tied_weight_plan` untied ``names``."""
    return (f"modules_to_save {sorted(set(names))}: the trained copy is untied from the word embeddings "
            "(PEFT's default, ensure_weight_tying=False): it trains its own output weight, initialised from "
            "the embeddings, and is saved with the adapter; ensure_weight_tying=True (coming later) will keep "
            "the tie")


def _own_weight(clone: nn.Module, source: torch.Tensor) -> None:
    """Give ``clone`` a trainable weight of its own, a copy of ``source`` with its TP split."""
    weight = nn.Parameter(source.detach().clone())
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(source, attr):
            setattr(weight, attr, getattr(source, attr))
    # Like an untied output layer's weight; never ``shared``/``shared_embedding``, which
    # would keep it out of grad clipping and in the embedding all-reduce.
    weight.is_embedding_or_output_parameter = True
    clone.weight = weight


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

    Args:
        module: The module to copy.
        adapter_name: The first adapter.
        untie_from: For a module tied to the embeddings, the tensor each copy's
            own weight starts from (see :func:`tied_weight_plan`).
        global_name: The module's global name, recorded for :meth:`tensors`.
    """

    def __init__(self, module: nn.Module, adapter_name: str, untie_from: Optional[torch.Tensor] = None,
                 global_name: str = ""):
        super().__init__()
        self.global_name = global_name
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.untied = False
        self.update(adapter_name, untie_from)
        self.set_adapter([adapter_name])
        self.register_load_state_dict_pre_hook(unwrapped_keys_to("original_module"))

    def update(self, adapter_name: str, untie_from: Optional[torch.Tensor] = None) -> None:
        clone = _copy_with_tp_attributes(self.original_module)
        if untie_from is not None:
            _own_weight(clone, untie_from)
            self.untied = True
        self.modules_to_save[adapter_name] = clone

    def tensors(self, adapter: str) -> list[AdapterTensor]:
        """Every parameter of ``adapter``'s copy, split by megatron-core's TP attributes on it.

        The equivalent of :meth:`LoraLayer.tensors <megalora.layers.base.LoraLayer.tensors>`;
        saved under the module's own name (``<module>.weight``), as PEFT does.
        """
        copy_ = self.modules_to_save[adapter]
        group = model_tp_group()
        return [
            AdapterTensor("saved", p, model_tensor_spec(copy_, self.global_name, p), group, self.global_name,
                          f"modules_to_save.{adapter}.{pname}", pname)
            for pname, p in copy_.named_parameters()
        ]

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
        ``output_layer.weight``; :func:`~megalora.layers.face.unwrapped_keys_to` takes them back on
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

    def forward(self, *args, **kwargs):
        module = self.active_module
        if self.untied and module is not self.original_module:
            # The model passes the tied embedding weight; an untied copy uses its own.
            kwargs.pop("weight", None)
        return module(*args, **kwargs)

    def __getattr__(self, name: str):
        # Code that reads attributes of the wrapped module (megatron-core reads
        # e.g. ``output_layer.weight`` or ``sequence_parallel``) sees the active copy,
        # but the weight of an untied one stays the frozen original: it is what
        # ``shared_embedding_or_output_weight()`` hands the embedding all-reduce.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "untied"):
                raise
            if name == "weight" and self.untied:
                return self.original_module.weight
            return getattr(self.active_module, name)


@torch.no_grad()
def unwrap(wrapper: ModulesToSaveWrapper, keep_trained: bool) -> nn.Module:
    """The module to put back: the active trained copy, or the original."""
    return wrapper.active_module if keep_trained else wrapper.original_module
