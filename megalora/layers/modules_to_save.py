"""``modules_to_save``: trainable copies of whole modules, saved with the adapter.

Megatron ties the output layer to the word embeddings by default
(``share_embeddings_and_output_weights``): at PP=1 the output layer has no
weight of its own (``GPTModel`` passes ``shared_embedding_or_output_weight()``),
and under PP the last stage holds a duplicate that ``finalize_model_grads``
all-reduces with the first stage's embedding over the embedding group. What
a trained copy of either side does is decided in one place,
:func:`tied_weight_plan`, from PEFT's ``ensure_weight_tying``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..parallel_groups import model_tp_group
from .face import unwrapped_keys_to
from .tensors import AdapterTensor, model_tensor_spec

_TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel")
# megatron-core's marks of the tied weight: the embedding all-reduce and grad clipping read them.
_TIE_ATTRS = ("shared", "shared_embedding", "is_embedding_or_output_parameter", "zero_out_wgrad")
EMBEDDING_NAME = "embedding.word_embeddings"
# Module names (PEFT's suffix match) that select a side of megatron's tied pair.
_PAIR = ("output_layer", EMBEDDING_NAME, "embedding")


def is_tied_output(parent: nn.Module, leaf: str) -> bool:
    """Whether ``parent.<leaf>`` is a megatron-core output layer tied to the word embeddings."""
    return leaf == "output_layer" and bool(getattr(parent, "share_embeddings_and_output_weights", False))


@dataclass(frozen=True)
class TiePlan:
    """What a trained copy of one side of a tied embedding/output pair does.

    Attributes:
        untie_from: For an untied output-layer copy, the tensor its own weight
            starts from (the model passes the embedding weight at forward; the
            copy ignores it).
        untied: The copy is hidden from ``shared_embedding_or_output_weight()``,
            which keeps returning the frozen original, so the embedding
            all-reduce sees a frozen weight on every stage.
        keep_tied: The copy *is* the shared weight (``ensure_weight_tying=True``):
            at PP=1 the output layer uses the embedding's copy, at PP>1 the
            last stage's copy keeps megatron's tie marks, so
            ``finalize_model_grads`` sums both stages' gradients as for the
            shared weight.
        saved_name: The module name the copy is saved under (the last stage's
            tied copy: the embedding's, so the file holds one tensor).
        drop: Wrap nothing here (a tied output layer at PP=1: the embedding's
            copy is its weight).
    """

    untie_from: Optional[torch.Tensor] = None
    untied: bool = False
    keep_tied: bool = False
    saved_name: Optional[str] = None
    drop: bool = False


def _tied_owner(model: nn.Module, local_name: str) -> Optional[nn.Module]:
    """The tied megatron model (``share_embeddings_and_output_weights``) that holds ``local_name``, if any."""
    parts = local_name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:cut])) if cut else model
        if hasattr(owner, "share_embeddings_and_output_weights"):
            return owner if owner.share_embeddings_and_output_weights else None
    return None


def tied_weight_plan(model: nn.Module, local_name: str, ensure_weight_tying: bool = False) -> Optional[TiePlan]:
    """What a trained copy of the module at ``local_name`` does about the embedding tie (``None``: not tied).

    The one place this is decided. ``ensure_weight_tying=False`` (PEFT's
    default) unties on purpose: an output-layer copy trains its own weight,
    initialised from the tied one; an embedding copy trains the input side
    only, and the output layer keeps the frozen original. ``True`` keeps one
    shared trained copy (see :class:`TiePlan`); :func:`plan_saved_modules`
    then also wraps the side the config did not name.
    """
    owner = _tied_owner(model, local_name)
    if owner is None:
        return None
    rel = local_name[len(_name_of(model, owner)):].lstrip(".")
    has_embedding = getattr(owner, "pre_process", True) and hasattr(owner, "embedding")
    if rel == "output_layer":
        if not ensure_weight_tying:
            return TiePlan(untie_from=owner.shared_embedding_or_output_weight(), untied=True)
        return TiePlan(keep_tied=True, saved_name=EMBEDDING_NAME, drop=has_embedding)
    if rel in ("embedding", EMBEDDING_NAME):
        return TiePlan(keep_tied=True) if ensure_weight_tying else TiePlan(untied=True)
    return None


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _selects_pair(entries: Sequence[str]) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries for name in _PAIR)


def plan_saved_modules(model: nn.Module, config, saved: list) -> list:
    """``(local name, module, plan)`` for every copy to make, after the tie rule.

    With ``ensure_weight_tying=True`` on a tied model whose ``modules_to_save``
    names either side, each stage with the embedding copies it (whether or not
    it was named), a PP=1 output layer is left alone (it uses that copy) and a
    last stage's output layer gets a copy that stays tied. Decided from the
    config and the local model alone, so the first and last stage agree.
    """
    ensure = bool(config.ensure_weight_tying)
    out = []
    for local, module in saved:
        plan = tied_weight_plan(model, local, ensure)
        if plan is None or not plan.drop:
            out.append((local, module, plan))
    if not (ensure and _selects_pair(config.modules_to_save or [])):
        return out
    have = {local for local, _, _ in out}
    for local, module in model.named_modules():
        plan = tied_weight_plan(model, local, ensure) if local.endswith(("output_layer", EMBEDDING_NAME)) else None
        covered = local in have or any(local.startswith(h + ".") for h in have)
        internal = {"original_module", "modules_to_save", "base_layer"} & set(local.split("."))
        if plan is not None and not plan.drop and not covered and not internal:
            out.append((local, module, plan))
    return out


def untied_message(names: Sequence[str]) -> str:
    """The one-line notice that :func:`tied_weight_plan` untied ``names``."""
    return (f"modules_to_save {sorted(set(names))}: the trained copy is untied from the tied embedding/output "
            "weight (PEFT's default, ensure_weight_tying=False): an output-layer copy trains its own weight, "
            "initialised from the embeddings, an embedding copy trains the input side only; set "
            "ensure_weight_tying=True to train one shared copy")


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
    _copy_attributes(module, clone, _TP_ATTRS)
    return clone


def _copy_attributes(module: nn.Module, clone: nn.Module, attrs: Sequence[str]) -> None:
    """Copy megatron-core's per-parameter attributes ``attrs`` (deepcopy drops them) onto ``clone``'s."""
    for (_, src), (_, dst) in zip(module.named_parameters(), clone.named_parameters()):
        for attr in attrs:
            if hasattr(src, attr):
                setattr(dst, attr, getattr(src, attr))


class ModulesToSaveWrapper(nn.Module):
    """PEFT's wrapper: the original module plus one trainable copy per adapter.

    State-dict keys are PEFT's: ``<path>.original_module.*`` and
    ``<path>.modules_to_save.<adapter>.*``.

    Args:
        module: The module to copy.
        adapter_name: The first adapter.
        plan: For a side of a tied embedding/output pair, what its copies do
            (see :func:`tied_weight_plan`).
        global_name: The module's global name, recorded for :meth:`tensors`.
    """

    def __init__(self, module: nn.Module, adapter_name: str, plan: Optional[TiePlan] = None,
                 global_name: str = ""):
        super().__init__()
        self.global_name = global_name
        self.saved_name = global_name
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.untied = False
        self.update(adapter_name, plan)
        self.set_adapter([adapter_name])
        self.register_load_state_dict_pre_hook(unwrapped_keys_to("original_module"))

    def update(self, adapter_name: str, plan: Optional[TiePlan] = None) -> None:
        clone = _copy_with_tp_attributes(self.original_module)
        if plan is not None:
            if plan.untie_from is not None:
                _own_weight(clone, plan.untie_from)
            self.untied = self.untied or plan.untied
            if plan.keep_tied:
                _copy_attributes(self.original_module, clone, _TIE_ATTRS)
            self.saved_name = plan.saved_name or self.saved_name
        self.modules_to_save[adapter_name] = clone

    def tensors(self, adapter: str) -> list[AdapterTensor]:
        """Every parameter of ``adapter``'s copy, split by megatron-core's TP attributes on it.

        The equivalent of :meth:`LoraLayer.tensors <megalora.layers.base.LoraLayer.tensors>`;
        saved under the module's own name (``<module>.weight``), as PEFT does.
        """
        copy_ = self.modules_to_save[adapter]
        group = model_tp_group()
        return [
            AdapterTensor("saved", p, model_tensor_spec(copy_, self.global_name, p), group, self.saved_name,
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
            if name in ("weight", "word_embeddings") and self.untied:
                return getattr(self.original_module, name)
            return getattr(self.active_module, name)


@torch.no_grad()
def unwrap(wrapper: ModulesToSaveWrapper, keep_trained: bool) -> nn.Module:
    """The module to put back: the active trained copy, or the original."""
    return wrapper.active_module if keep_trained else wrapper.original_module


def untied_owners(model: nn.Module, configs: Sequence) -> list:
    """``(tied model, its frozen shared weight)`` to untie when the copies of ``configs`` are kept for good.

    A pair untied on purpose (``ensure_weight_tying=False``) must stay untied
    once the wrappers are gone, or ``GPTModel`` would pass the embedding weight
    to the output layer again. Call before unwrapping; see :func:`untie_owner`.
    """
    if not any(not c.ensure_weight_tying and _selects_pair(c.modules_to_save or []) for c in configs):
        return []
    owners = [m for m in model.modules() if getattr(m, "share_embeddings_and_output_weights", False)]
    return [(owner, owner.shared_embedding_or_output_weight()) for owner in owners]


def untie_owner(owner: nn.Module, weight: Optional[torch.Tensor]) -> None:
    """Make ``owner`` an untied model: its output layer keeps ``weight`` (the frozen original) unless it has its own."""
    output = getattr(owner, "output_layer", None) if getattr(owner, "post_process", True) else None
    if output is not None:
        if output.weight is None:
            output.weight = weight
        else:
            for attr in ("shared", "shared_embedding"):
                if hasattr(output.weight, attr):
                    delattr(output.weight, attr)
    owner.share_embeddings_and_output_weights = False
