"""What a LoRA layer shows of the layer it wraps, as PEFT's ``BaseTunerLayer`` does."""

from __future__ import annotations

from typing import Any

from torch import nn


class BaseLayerFace(nn.Module):
    """Attribute reads, megatron-core's attribute writes and unwrapped state-dict keys go to ``base_layer``.

    Subclasses register ``unwrapped_keys_to("base_layer")`` as a load-state-dict pre-hook.
    """

    # Attributes megatron-core writes on a layer it built (GPTModel switches the output
    # layer's sequence_parallel off and on for inference): they belong to the base layer.
    _BASE_LAYER_WRITES = frozenset({"sequence_parallel"})

    def __getattr__(self, name: str) -> Any:
        # As PEFT's BaseTunerLayer: code that reads an attribute of the layer it built
        # (megatron-core reads ``output_layer.weight``, ``.sequence_parallel``, ``.config``)
        # finds the base layer's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or name.startswith("__"):
                raise
            return getattr(self.base_layer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._BASE_LAYER_WRITES and "base_layer" in self._modules:
            setattr(self.base_layer, name, value)
        else:
            super().__setattr__(name, value)


def unwrapped_keys_to(child: str):
    """A load-state-dict pre-hook: a key of the unwrapped module (``<prefix>weight``) goes to ``child``.

    Distributed checkpoints and base-model state dicts name a wrapped module's tensors as
    the unwrapped module did (see the parallel LoRA layers' and ModulesToSaveWrapper's
    ``sharded_state_dict``); keys of the wrapper's own children and tensors stay.
    """

    def hook(module: nn.Module, state_dict: dict, prefix: str, *_args: Any) -> None:
        own = set(module._modules) | set(module._parameters) | set(module._buffers)
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if rest.split(".", 1)[0] not in own:
                state_dict[f"{prefix}{child}.{rest}"] = state_dict.pop(key)

    return hook
