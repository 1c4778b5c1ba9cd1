"""Tests of megalora.megatron_config: the shared CPU-friendly TransformerConfig fields."""

from __future__ import annotations

import dataclasses

import torch

from megalora.megatron_config import UNFUSED_KWARGS, cpu_friendly_config_kwargs


def test_every_flag_is_a_transformer_config_field():
    from megatron.core.transformer import TransformerConfig

    fields = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    assert set(UNFUSED_KWARGS) <= set(fields)  # a renamed field would be swallowed silently otherwise
    assert all(value is False for value in UNFUSED_KWARGS.values())


def test_kwargs_build_a_config_with_what_the_docstring_says():
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                               **cpu_friendly_config_kwargs())
    assert config.use_cpu_initialization and config.params_dtype == torch.float32
    assert not any(getattr(config, name) for name in UNFUSED_KWARGS)
    custom = cpu_friendly_config_kwargs(params_dtype=torch.bfloat16, use_cpu_initialization=False)
    assert custom["params_dtype"] == torch.bfloat16 and custom["use_cpu_initialization"] is False
    custom["bias_dropout_fusion"] = True  # each call returns a fresh dict
    assert UNFUSED_KWARGS["bias_dropout_fusion"] is False
