"""The PEFT API: ``get_peft_model`` and ``PeftModel``, for plain and Megatron models.

``PeftModel.base_model`` is a :class:`~megalora.model.LoraModel`. PEFT keywords
that mean nothing to megalora are accepted and ignored, for the reasons listed
in :mod:`megalora.peft_kwargs`; any other keyword raises ``TypeError``.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import nn

from .config import LoraConfig
from .model import LoraModel, _global_rank
from .peft_kwargs import check_kwargs


class PeftModel(nn.Module):
    """A model with LoRA adapters, with PEFT's methods.

    Attribute access falls through to the wrapped model, so megatron-core's
    schedules find ``set_input_tensor`` and ``config`` as on the bare model.
    """

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 seed: Optional[int] = None):
        super().__init__()
        self.base_model = LoraModel(model, peft_config, adapter_name, seed=seed)

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

        Collective over the world when megatron-core's parallel state is
        initialized: call it on every rank. A TP-sharded tensor
        (``tensor_model_parallel``) is counted on every TP rank, so its shards
        add up to the full tensor; a replicated one on TP rank 0 only; the last
        pipeline stage's copy of a tied embedding (``shared``) not at all;
        pipeline stages are summed, data-parallel replicas are not. Routed
        experts count the same way over their own groups (expert-TP, and
        expert-DP rank 0 of every EP rank), so every expert counts once.
        """
        from .collectives import all_reduce_sum, group_rank
        from .experts import expert_groups, expert_param_ids
        from .parallel_groups import megatron_parallel_state, process_groups

        ps = megatron_parallel_state()
        dense, experts = process_groups(), expert_groups()
        expert_ids = expert_param_ids(self)
        # Each tensor is counted by the one replica that owns it: dense ones on data-parallel
        # rank 0, routed experts' on expert-data-parallel rank 0 of every EP rank.
        counts_dense = dense is None or group_rank(dense.dp_cp) == 0
        counts_expert = experts is None or group_rank(experts.expt_dp) == 0
        trainable = total = 0
        for _, param in self.named_parameters():
            if getattr(param, "shared", False):
                continue
            expert = id(param) in expert_ids
            if not (counts_expert if expert else counts_dense):
                continue
            tp_group = (experts.expt_tp if expert else dense.tp) if ps is not None else None
            if group_rank(tp_group) != 0 and not getattr(param, "tensor_model_parallel", False):
                continue
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        if ps is None:
            return trainable, total
        counts = torch.tensor([trainable, total], dtype=torch.int64)
        all_reduce_sum(counts, torch.distributed.group.WORLD)
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

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[Sequence[str]] = None,
                        path_initial_model_for_weight_conversion: Optional[str] = None, **kwargs) -> None:
        """Write each adapter in PEFT's format; collective under TP/PP (see :mod:`megalora.checkpoint`).

        ``path_initial_model_for_weight_conversion``: the directory where this
        PiSSA/OLoRA adapter was saved right after initialization; the adapter is
        then written as a plain LoRA adapter of rank ``2r`` for the *original*
        base (PEFT's conversion, :mod:`megalora.initializers.conversion`).

        Raises:
            TypeError: For a keyword PEFT's ``save_pretrained`` does not take
                (accepted ones: :mod:`megalora.peft_kwargs`).
        """
        from .checkpoint import save_adapters

        check_kwargs("save_pretrained", kwargs)
        save_adapters(self, save_directory, selected_adapters=selected_adapters,
                      safe_serialization=safe_serialization,
                      path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion)

    def load_adapter(self, model_id: str, adapter_name: str = "default", is_trainable: bool = False, **kwargs):
        """Collective: add the adapter saved in ``model_id`` (see :func:`megalora.checkpoint.load_adapter`).

        Raises:
            TypeError: For a keyword PEFT's ``load_adapter`` does not take.
        """
        from .checkpoint import load_adapter

        check_kwargs("load_adapter", kwargs)
        return load_adapter(self, model_id, adapter_name=adapter_name, is_trainable=is_trainable)

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
        """Load a saved adapter onto ``model`` (PEFT's ``PeftModel.from_pretrained``).

        Raises:
            TypeError: For a keyword PEFT's ``from_pretrained`` does not take.
        """
        from .checkpoint import from_pretrained

        check_kwargs("from_pretrained", kwargs)
        return from_pretrained(cls, model, model_id, adapter_name, is_trainable, config)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", *,
                   seed: Optional[int] = None, **kwargs) -> PeftModel:
    """Inject LoRA into ``model`` and return it as a :class:`PeftModel`.

    Args:
        model: A plain PyTorch model, a megatron-core model (one pipeline
            stage: names are global), or the list of a stage's
            virtual-pipeline chunks, which are all adapted in place and saved
            together.
        peft_config: The LoRA configuration.
        adapter_name: Name of the first adapter.
        seed: The base seed of the LoRA init, the same on every rank; each
            factor is drawn from it, the layer's global name and the adapter
            name, so the init does not depend on the layout. ``None`` (the
            default): the seed given to :func:`megalora.init_parallel` (or
            recorded by the Megatron-LM plug-in), else ``torch.initial_seed()``.
        **kwargs: PEFT's other keywords, accepted and ignored as listed in
            :mod:`megalora.peft_kwargs` (``mixed`` only as ``False``).

    Raises:
        TypeError: For a keyword PEFT's ``get_peft_model`` does not take.
    """
    check_kwargs("get_peft_model", kwargs)
    return PeftModel(model, peft_config, adapter_name, seed=seed)
