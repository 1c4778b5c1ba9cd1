"""LoRA initializers computed from the base model (PiSSA, OLoRA, LoftQ; CorDA and EVA).

``distributed`` runs a decomposition of each layer's full base weight on one
owner rank and scatters the factors (and rewritten base shards) back, at any
TP/PP/DP layout; the other modules hold each method's math as pure functions.
"""

from __future__ import annotations


def preprocess_corda(model, lora_config, run_model=None, hooked_model=None):
    """PEFT's ``preprocess_corda`` (see :func:`megalora.initializers.corda.preprocess_corda`)."""
    from .corda import preprocess_corda as run

    return run(model, lora_config, run_model=run_model, hooked_model=hooked_model)


def get_eva_state_dict(model, dataloader, **kwargs):
    """PEFT's ``get_eva_state_dict`` (see :func:`megalora.initializers.eva.get_eva_state_dict`)."""
    from .eva import get_eva_state_dict as run

    return run(model, dataloader, **kwargs)


def initialize_lora_eva_weights(model, dataloader=None, **kwargs):
    """PEFT's ``initialize_lora_eva_weights`` (see :func:`megalora.initializers.eva.initialize_lora_eva_weights`)."""
    from .eva import initialize_lora_eva_weights as run

    return run(model, dataloader, **kwargs)
