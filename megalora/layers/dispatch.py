"""Which LoRA layer wraps which module: an ordered list of (predicate, factory) entries.

The first entry whose predicate accepts a module builds its LoRA layer. The
built-in entries cover ``torch.nn.Linear``, transformers' ``Conv1D``,
megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` and their
Transformer Engine counterparts, ``torch.nn.Embedding`` and megatron-core's
``VocabParallelEmbedding`` (:mod:`megalora.layers.embedding`); :func:`register_lora_layer` adds a user's
own module types (ahead of the built-ins by default) without editing megalora.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from .base import LoraLayer
from .plain import LoraLinear, is_conv1d
from .tensors import gated_chunks


@dataclass(frozen=True)
class LayerContext:
    """What a factory is told about the module it wraps.

    Attributes:
        global_name: The module's layout-independent name (salt of the init).
        config: The :class:`~megalora.config.LoraConfig` of the first adapter.
        out_chunks: 2 for a gated ``linear_fc1`` (rank ``k`` holds
            ``[gate_k; up_k]``), else 1; pass it to a column-parallel layer.
        mcore: The megatron-core module the config names, or ``None``.
    """

    global_name: str
    config: Any = None
    out_chunks: int = 1
    mcore: Any = None


Predicate = Callable[[nn.Module], bool]
Factory = Callable[[nn.Module, LayerContext], LoraLayer]
# Built-in predicates also see the megatron-core module of the config (``None``
# keeps megatron-core's layers unadapted); user predicates are wrapped.
_Entry = tuple[Callable[[nn.Module, Any], bool], Factory]


def _te(mcore) -> tuple[tuple, tuple, tuple]:
    if mcore is None:
        return (), (), ()
    from .te import te_layer_classes

    return te_layer_classes()


def _is_te_norm_column(module, mcore) -> bool:
    classes = _te(mcore)[2]
    return bool(classes) and isinstance(module, classes)


def _is_te_column(module, mcore) -> bool:
    classes = _te(mcore)[0]
    return bool(classes) and isinstance(module, classes)


def _is_te_row(module, mcore) -> bool:
    classes = _te(mcore)[1]
    return bool(classes) and isinstance(module, classes)


def _is_column(module, mcore) -> bool:
    return mcore is not None and isinstance(module, mcore.tensor_parallel.ColumnParallelLinear)


def _is_row(module, mcore) -> bool:
    return mcore is not None and isinstance(module, mcore.tensor_parallel.RowParallelLinear)


def _is_plain(module, mcore) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _is_vocab_parallel_embedding(module, mcore) -> bool:
    return mcore is not None and isinstance(module, mcore.tensor_parallel.VocabParallelEmbedding)


def _is_embedding(module, mcore) -> bool:
    return isinstance(module, nn.Embedding)


def _te_norm_column(module, ctx: LayerContext) -> LoraLayer:
    from .te import LoraColumnCallingBase, layernorm_of

    return LoraColumnCallingBase(module, global_name=ctx.global_name, out_chunks=ctx.out_chunks,
                                 input_norm=layernorm_of(module))


def _te_column(module, ctx: LayerContext) -> LoraLayer:
    from .te import LoraColumnCallingBase

    return LoraColumnCallingBase(module, global_name=ctx.global_name, out_chunks=ctx.out_chunks)


def _te_row(module, ctx: LayerContext) -> LoraLayer:
    from .te import LoraRowCallingBase

    return LoraRowCallingBase(module, global_name=ctx.global_name)


def _column(module, ctx: LayerContext) -> LoraLayer:
    from .parallel import LoraColumnParallelLinear

    return LoraColumnParallelLinear(module, global_name=ctx.global_name, out_chunks=ctx.out_chunks)


def _row(module, ctx: LayerContext) -> LoraLayer:
    from .parallel import LoraRowParallelLinear

    return LoraRowParallelLinear(module, global_name=ctx.global_name)


def _vocab_parallel_embedding(module, ctx: LayerContext) -> LoraLayer:
    from .embedding import LoraVocabParallelEmbedding

    return LoraVocabParallelEmbedding(module, global_name=ctx.global_name)


def _embedding(module, ctx: LayerContext) -> LoraLayer:
    from .embedding import LoraEmbedding

    return LoraEmbedding(module, global_name=ctx.global_name)


def _plain(module, ctx: LayerContext) -> LoraLayer:
    fan_in_fan_out = bool(getattr(ctx.config, "fan_in_fan_out", False))
    return LoraLinear(module, fan_in_fan_out, global_name=ctx.global_name)


# TE classes first: a TE layer may also subclass a plain megatron-core one.
_BUILTIN: list[_Entry] = [
    (_is_te_norm_column, _te_norm_column),
    (_is_te_column, _te_column),
    (_is_te_row, _te_row),
    (_is_column, _column),
    (_is_row, _row),
    (_is_plain, _plain),
    (_is_vocab_parallel_embedding, _vocab_parallel_embedding),
    (_is_embedding, _embedding),
]
_USER: list[_Entry] = []


def register_lora_layer(predicate: Predicate, factory: Factory, first: bool = True) -> Callable[[], None]:
    """Teach megalora to put LoRA on a module type of your own.

    Args:
        predicate: ``predicate(module) -> bool``: whether this entry wraps ``module``.
        factory: ``factory(module, context) -> LoraLayer``, given a
            :class:`LayerContext`. A subclass of one of megalora's layers
            (``LoraColumnParallelLinear``, ``LoraRowParallelLinear``,
            ``LoraLinear``) usually only overrides what differs; pass
            ``global_name=context.global_name`` (and ``out_chunks`` to a
            column-parallel one) to its constructor.
        first: Ahead of every registered and built-in entry (default), so it
            wins over the built-in entry of a base class; ``False`` appends it
            after the other registered entries, still ahead of the built-ins.

    Returns:
        A function that removes this entry again.
    """
    if not callable(predicate) or not callable(factory):
        raise TypeError("register_lora_layer(predicate, factory): both must be callables")
    entry = (lambda module, _mcore: bool(predicate(module)), factory)
    if first:
        _USER.insert(0, entry)
    else:
        _USER.append(entry)

    def remove() -> None:
        if entry in _USER:
            _USER.remove(entry)

    return remove


def _entries() -> list[_Entry]:
    return _USER + _BUILTIN


def _factory_for(module: nn.Module, mcore) -> Optional[Factory]:
    return next((factory for predicate, factory in _entries() if predicate(module, mcore)), None)


def is_supported_module(module: nn.Module, mcore=None) -> bool:
    """Whether megalora can put LoRA on ``module`` (some entry's predicate accepts it)."""
    return _factory_for(module, mcore) is not None


def _is_moe_router(module: nn.Module) -> bool:
    """A megatron-core MoE router (``TopKRouter`` and kin): a gating weight ``[num_experts, hidden]``."""
    return type(module).__name__.endswith("Router") and hasattr(module, "weight") and hasattr(module, "topk")


def is_supported_linear(module: nn.Module, mcore=None) -> bool:
    """:func:`is_supported_module`, embeddings left out (what ``"all-linear"`` selects, as in PEFT)."""
    return not (_is_embedding(module, mcore) or _is_vocab_parallel_embedding(module, mcore)) and \
        is_supported_module(module, mcore)


def create_lora_layer(target: nn.Module, name: str, config=None, mcore=None) -> LoraLayer:
    """Wrap ``target`` in the LoRA layer of the first entry that accepts it.

    Args:
        target: The base module.
        name: Its global module name; the layer records it, and whether the
            module is a gated ``linear_fc1``.
        config: The :class:`~megalora.config.LoraConfig` (``fan_in_fan_out`` for plain layers).
        mcore: The megatron-core module from :func:`~megalora.layers.megatron_core_module`.

    Raises:
        TypeError: If no entry accepts the module type, or a factory returns no ``LoraLayer``.
    """
    factory = _factory_for(target, mcore)
    if factory is None and _is_moe_router(target):
        raise TypeError(
            f"Target module {name} ({type(target).__name__}) is a mixture-of-experts router, which LoRA does not "
            "adapt (its gating weight is small and replicated): remove it from target_modules and train it whole "
            "with modules_to_save=['router']."
        )
    if factory is None:
        raise TypeError(
            f"Target module {name} ({type(target).__name__}) is not supported. megalora supports torch.nn.Linear, "
            "transformers' Conv1D, megatron-core's ColumnParallelLinear / RowParallelLinear and their Transformer "
            "Engine counterparts, torch.nn.Embedding, megatron-core's VocabParallelEmbedding, and types added with megalora.register_lora_layer; "
            "adjust target_modules to select only those."
        )
    layer = factory(target, LayerContext(name, config, gated_chunks(target, name), mcore))
    if not isinstance(layer, LoraLayer):
        raise TypeError(f"the LoRA layer factory for {type(target).__name__} returned {type(layer).__name__}, "
                        "not a megalora LoraLayer; return a LoraLayer subclass")
    layer.global_name = name
    return layer
