"""The parent's layout check reads the cached HF config as plain fields, and decides as the config object does."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests import hf_utils as U

LAYOUTS = [(1, 1, None), (2, 2, None), (3, 1, None), (4, 1, None), (5, 1, None), (1, 3, None), (2, 2, 2), (6, 4, 2)]


def _configs():
    import transformers

    yield transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                                   num_attention_heads=6, num_key_value_heads=3)
    yield transformers.GPT2Config(vocab_size=96, n_embd=48, n_head=6, n_layer=4, n_inner=None)
    for config_cls, _, experts_field in U.MOE_KINDS.values():
        fields = dict(vocab_size=96, hidden_size=48, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, num_experts_per_tok=2)
        fields[experts_field] = 4
        if config_cls != "MixtralConfig":
            fields["moe_intermediate_size"] = 16
        yield getattr(transformers, config_cls)(**fields)


def _outcome(config, layout) -> str:
    from megalora.hf.build import check_layout_fits_model

    try:
        check_layout_fits_model(config, *layout)
    except ValueError as exc:
        return str(exc)
    return "fits"


@pytest.mark.parametrize("config", list(_configs()), ids=lambda c: c.model_type)
def test_plain_fields_decide_as_the_config_object(config):
    from megalora.hf.arch import arch_from_hf

    fields = SimpleNamespace(**json.loads(config.to_json_string(use_diff=False)))
    assert arch_from_hf(fields) == arch_from_hf(config)
    outcomes = [_outcome(config, layout) for layout in LAYOUTS]
    assert "fits" in outcomes and any(o != "fits" for o in outcomes)
    assert [_outcome(fields, layout) for layout in LAYOUTS] == outcomes


def test_cached_config_fields_come_from_the_cache_file(tmp_path, monkeypatch):
    from megalora.hf.cache import CACHE_ENV, cache_path, cached_config_fields, convert_to_cache
    from megalora.hf.models import resolve_files

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model = U.tiny_hf("llama")
    model.save_pretrained(str(tmp_path / "model"))
    files = resolve_files(str(tmp_path / "model"))
    assert cached_config_fields(files) is None  # a miss: the caller converts
    convert_to_cache(files, cache_path(files))
    fields = cached_config_fields(files)
    assert fields.num_attention_heads == 6 and fields.num_key_value_heads == 3 and fields.num_hidden_layers == 4
    assert _outcome(fields, (3, 2, None)) == "fits" and "num_key_value_heads" in _outcome(fields, (2, 1, None))
