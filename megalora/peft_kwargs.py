"""PEFT keyword arguments megalora accepts without acting on them, and the check that rejects the rest.

PEFT's ``get_peft_model``, ``PeftModel.from_pretrained``, ``load_adapter`` and
``save_pretrained`` take keywords that have no meaning for megalora. Code
written for PEFT may pass them, so they are accepted, each for the reason
given here; any other keyword raises a one-line ``TypeError`` naming it (a
typo no longer disappears silently).

============================  =================================================================
keyword                       why it is accepted and ignored
============================  =================================================================
``autocast_adapter_dtype``    adapters take the base layer's dtype (or ``megatron_config``'s
                              ``params_dtype``); there is no fp16/bf16 → fp32 autocast step
``low_cpu_mem_usage``         adapters are created with their init values on the base
                              weight's device; there is no meta-device stage to skip
``revision``                  recorded by PEFT in the config only; megalora reads local
                              directories
``ephemeral_gpu_offload``     nothing is offloaded
``torch_device``              tensors load onto the device of the parameter they fill
``is_main_process``           every rank must call ``save_pretrained`` (it gathers across
                              ranks); global rank 0 writes
``save_embedding_layers``     megalora saves embedding layers only as ``modules_to_save``
============================  =================================================================

Keywords that change what PEFT does are accepted only at their default:
``mixed=False`` (mixed adapter types) and ``key_mapping=None`` (key renaming
on load). (``save_pretrained``'s ``path_initial_model_for_weight_conversion`` is
a real argument of :meth:`megalora.PeftModel.save_pretrained`.)
"""

from __future__ import annotations

from typing import Any

IGNORED = {
    "get_peft_model": ("autocast_adapter_dtype", "low_cpu_mem_usage", "revision"),
    "from_pretrained": ("autocast_adapter_dtype", "ephemeral_gpu_offload", "low_cpu_mem_usage", "revision"),
    "load_adapter": ("torch_device", "autocast_adapter_dtype", "ephemeral_gpu_offload", "low_cpu_mem_usage",
                     "revision"),
    "save_pretrained": ("is_main_process", "save_embedding_layers"),
}

DEFAULT_ONLY = {
    "get_peft_model": {"mixed": False},
    "from_pretrained": {"key_mapping": None},
    "load_adapter": {"key_mapping": None},
    "save_pretrained": {},
}


def check_kwargs(function: str, kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` for a keyword ``function`` does not know, ``ValueError`` for an unsupported value.

    Args:
        function: One of the keys of :data:`IGNORED`.
        kwargs: The extra keywords the caller was given.
    """
    ignored, defaults = IGNORED[function], DEFAULT_ONLY[function]
    for name, value in kwargs.items():
        if name in defaults:
            if value != defaults[name]:
                raise ValueError(f"{function}({name}={value!r}) is not supported by megalora; "
                                 f"leave {name} at {defaults[name]!r}")
        elif name not in ignored:
            known = sorted(set(ignored) | set(defaults))
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r} "
                            f"(PEFT keywords megalora accepts here: {', '.join(known)})")
