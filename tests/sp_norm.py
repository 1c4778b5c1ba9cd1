"""A torch LayerNorm for the local GPT spec under sequence parallelism (CPU tests).

The local spec's ``WrappedTorchNorm`` refuses ``sequence_parallel=True``;
Megatron expects apex or TE there. This one accepts it and marks its params
``sequence_parallel`` so that their TP-partial grads are summed.
"""

from __future__ import annotations

import copy

import torch


class SPLayerNorm(torch.nn.LayerNorm):
    def __init__(self, config, hidden_size, eps=1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel


def sp_layer_spec(spec):
    """``spec`` with its norms replaced (the block's final norm comes from the block spec)."""
    spec = copy.deepcopy(spec)
    spec.submodules.input_layernorm = SPLayerNorm
    spec.submodules.pre_mlp_layernorm = SPLayerNorm
    return spec


def sp_block_spec(spec, config, vp_stage=None):
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(
        layer_specs=[sp_layer_spec(spec)] * get_num_layers_to_build(config, vp_stage), layer_norm=SPLayerNorm
    )
