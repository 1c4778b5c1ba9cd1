"""Tests for megalora.config: validation, PEFT compatibility and serialization."""

import dataclasses
import json
import os
import warnings

import pytest

from megalora.config import (
    CONFIG_NAME,
    MEGATRON_CORE_ALLOWLIST_PREFIX,
    LoraConfig,
    check_megatron_core,
    to_json_safe,
)

peft = pytest.importorskip("peft")
from peft.tuners.lora import config as peft_lora_config  # noqa: E402


def canon(d, keep_version=True):
    """Normalizes a config dict (ours or PEFT's) to plain JSON for comparison."""
    d = {k: v for k, v in d.items() if k != "runtime_config" and (keep_version or k != "peft_version")}

    def default(o):
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        raise TypeError(o)

    return json.loads(json.dumps(d, default=default, sort_keys=True))


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# -- fields and defaults -------------------------------------------------------------


def test_fields_and_order_match_peft():
    ours = [f.name for f in dataclasses.fields(LoraConfig)]
    theirs = [f.name for f in dataclasses.fields(peft.LoraConfig)]
    assert ours == theirs


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def test_field_defaults_match_peft():
    peft_fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    for f in dataclasses.fields(LoraConfig):
        ours, theirs = _default(f), _default(peft_fields[f.name])
        if f.name == "peft_type":
            continue  # PEFT's field default is None, and __post_init__ sets LORA; checked below
        assert canon({"v": ours}) == canon({"v": theirs}), f.name


def test_instance_defaults_match_peft():
    ours = LoraConfig()
    theirs = peft.LoraConfig()
    assert ours.peft_type == "LORA" == theirs.peft_type
    assert canon(ours.to_dict(), keep_version=False) == canon(theirs.to_dict(), keep_version=False)
    assert dataclasses.asdict(ours.runtime_config) == dataclasses.asdict(theirs.runtime_config)


# -- validation ----------------------------------------------------------------------

INVALID = [
    (dict(r=0), "r"),
    (dict(r=-1), "r"),
    (dict(r=2.0), "r"),
    (dict(r=True), "r"),
    (dict(lora_alpha="16"), "lora_alpha"),
    (dict(lora_alpha=float("nan")), "lora_alpha"),
    (dict(lora_alpha=None), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(lora_dropout="0.1"), "lora_dropout"),
    (dict(init_lora_weights="kaiming"), "init_lora_weights"),
    (dict(init_lora_weights="pissa_niter_"), "init_lora_weights"),
    (dict(init_lora_weights="pissa_niter_x"), "init_lora_weights"),
    (dict(init_lora_weights=1), "init_lora_weights"),
    (dict(bias="some"), "bias"),
    (dict(layers_pattern="layers"), "layers_pattern"),
    (dict(target_modules=".*qkv", layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=".*qkv", layers_to_transform=0, layers_pattern="layers"), "layers_to_transform"),
    (dict(layers_to_transform=[-1]), "layers_to_transform"),
    (dict(layers_to_transform=["0"]), "layers_to_transform"),
    (dict(init_lora_weights="loftq"), "loftq_config"),
    (dict(use_dora=True, lora_bias=True), "lora_bias"),
    (dict(init_lora_weights="pissa", lora_bias=True), "lora_bias"),
    (dict(megatron_core="os"), "megatron_core"),
    (dict(megatron_core="megatron"), "megatron_core"),
    (dict(megatron_core="megatron."), "megatron_core"),
    (dict(megatron_core="megatronx.core"), "megatron_core"),
    (dict(megatron_core="megatron.core;import os"), "megatron_core"),
    (dict(megatron_config=object()), "megatron_config"),
    (dict(layer_replication=[[2, 2]]), "layer_replication"),
    (dict(layer_replication=[[-1, 2]]), "layer_replication"),
    (dict(layer_replication=[[0, 1, 2]]), "layer_replication"),
    (dict(layer_replication=[[0, 1.5]]), "layer_replication"),
    (dict(layer_replication=[0, 4]), "layer_replication"),
    (dict(rank_pattern={"qkv": 0}), "rank_pattern"),
    (dict(rank_pattern={"qkv": 4.0}), "rank_pattern"),
    (dict(rank_pattern=["qkv"]), "rank_pattern"),
    (dict(alpha_pattern={"qkv": -1}), "alpha_pattern"),
    (dict(alpha_pattern={"qkv": "8"}), "alpha_pattern"),
    (dict(target_modules=5), "target_modules"),
    (dict(target_modules=["qkv", 3]), "target_modules"),
    (dict(target_modules="(unclosed"), "target_modules"),
    (dict(exclude_modules={"a": 1}), "exclude_modules"),
    (dict(exclude_modules="[bad"), "exclude_modules"),
    (dict(modules_to_save="lm_head"), "modules_to_save"),
    (dict(target_parameters="experts.weight"), "target_parameters"),
    (dict(trainable_token_indices=[1, -2]), "trainable_token_indices"),
    (dict(trainable_token_indices={1: [0]}), "trainable_token_indices"),
    (dict(alora_invocation_tokens=["a"], task_type="CAUSAL_LM"), "alora_invocation_tokens"),
    (dict(qalora_group_size=0), "qalora_group_size"),
    (dict(eva_config="yes", init_lora_weights="eva"), "eva_config"),
    (dict(task_type="CHAT"), "task_type"),
    (dict(peft_type="IA3"), "peft_type"),
    (dict(use_dora="false"), "use_dora"),
    (dict(inference_mode=1), "inference_mode"),
    (dict(revision=3), "revision"),
    (dict(loftq_config=[1]), "loftq_config"),
]


@pytest.mark.parametrize("kwargs,name", INVALID, ids=[f"{n}-{i}" for i, (_, n) in enumerate(INVALID)])
def test_invalid_values_name_the_field(kwargs, name):
    with pytest.raises(ValueError) as info:
        quiet(LoraConfig, **kwargs)
    assert name in str(info.value)


def test_megatron_core_error_names_allowlist():
    with pytest.raises(ValueError, match="megatron_core") as info:
        LoraConfig(megatron_core="subprocess")
    assert MEGATRON_CORE_ALLOWLIST_PREFIX in str(info.value)


@pytest.mark.parametrize("name", ["megatron.core", "megatron.core.tensor_parallel", "megatron.my_fork"])
def test_megatron_core_allowed(name):
    assert check_megatron_core(name) == name
    assert LoraConfig(megatron_core=name).megatron_core == name


def test_megatron_core_none_allowed_and_loaded_configs_checked():
    assert LoraConfig(megatron_core=None).megatron_core is None
    with pytest.raises(ValueError, match="megatron_core"):
        LoraConfig.from_dict({"peft_type": "LORA", "megatron_core": "os"})
    with pytest.raises(ValueError, match="megatron_core"):
        check_megatron_core(None)


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "pissa", "pissa_niter_4", "olora",
                                  "lora_ga", "mica"])
def test_valid_inits(init):
    assert LoraConfig(init_lora_weights=init).init_lora_weights == init


def test_valid_normalizations():
    c = LoraConfig(target_modules=["b", "a", "a"], exclude_modules=("x",), layer_replication=[[0, 2], (1, 3)],
                   layers_to_transform=(0, 1), layers_pattern="layers", rank_pattern=None, alpha_pattern={"a": 2.5})
    assert c.target_modules == {"a", "b"} and c.exclude_modules == {"x"}
    assert c.layer_replication == [(0, 2), (1, 3)]
    assert c.layers_to_transform == [0, 1] and c.rank_pattern == {}
    d = c.to_dict()
    assert d["target_modules"] == ["a", "b"] and d["layer_replication"] == [[0, 2], [1, 3]]
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"
    assert LoraConfig(target_modules=[]).to_dict()["target_modules"] == []


def test_init_specific_configs_warn_like_peft():
    with pytest.warns(UserWarning, match="loftq_config"):
        c = LoraConfig(loftq_config={"loftq_bits": 4})
    assert c.loftq_config == {}
    with pytest.warns(UserWarning, match="eva_config"):
        LoraConfig(init_lora_weights="eva")
    with pytest.warns(UserWarning, match="corda_config"):
        LoraConfig(corda_config={"corda_method": "kpm"})
    c = LoraConfig(init_lora_weights="loftq", loftq_config=peft_lora_config.LoftQConfig(loftq_bits=2))
    assert c.loftq_config == {"loftq_bits": 2, "loftq_iter": 1}


# -- megatron_config -----------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer_config():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer.transformer_config import TransformerConfig

        return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)


def test_transformer_config_serializes_to_json_dict(transformer_config, tmp_path):
    c = LoraConfig(megatron_config=transformer_config)
    assert c.megatron_config is transformer_config  # kept as given in memory
    d = c.to_dict()["megatron_config"]
    assert isinstance(d, dict)
    json.dumps(d, allow_nan=False)
    assert d["num_layers"] == 2 and d["hidden_size"] == 64
    assert d["params_dtype"] == "torch.float32"
    assert d["attention_backend"] == transformer_config.attention_backend.name
    assert "init_method" not in d and "activation_func" not in d  # callables dropped
    init_fields = {f.name for f in dataclasses.fields(transformer_config) if f.init}
    assert set(d) <= init_fields
    c.save_pretrained(tmp_path)
    loaded = LoraConfig.from_pretrained(tmp_path)
    assert loaded.megatron_config == d
    assert peft.LoraConfig.from_pretrained(str(tmp_path)).megatron_config == d
    assert "pages long" not in repr(c) and "init_method" not in repr(c)


def test_to_json_safe_rules():
    import enum

    import torch

    class Color(enum.Enum):
        RED = 1

    value = {"f": print, "dt": torch.bfloat16, "e": Color.RED, "s": {"b", "a"}, "t": (1, 2),
             "nan": float("nan"), "l": [1, print], 3: "int-key", object(): 1}
    assert to_json_safe(value) == {"dt": "torch.bfloat16", "e": "RED", "s": ["a", "b"], "t": [1, 2],
                                   "3": "int-key"}


# -- round trips ---------------------------------------------------------------------


def _peft_configs():
    lc = peft_lora_config
    yield "rich", dict(
        r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["linear_qkv", "linear_proj"],
        exclude_modules=["output_layer"], fan_in_fan_out=True, bias="lora_only", use_rslora=True,
        modules_to_save=["lm_head"], layers_to_transform=[0, 2], layers_pattern="layers",
        rank_pattern={"linear_qkv": 4}, alpha_pattern={"linear_proj": 2.5}, megatron_config={"num_layers": 2},
        megatron_core="megatron.core", task_type="CAUSAL_LM", base_model_name_or_path="HuggingFaceTB/SmolLM2",
        revision="main", inference_mode=True, layer_replication=[[0, 2], [1, 3]], lora_bias=True,
        trainable_token_indices={"embedding": [0, 5]}, target_parameters=["experts.weight"],
        ensure_weight_tying=True, use_qalora=True, qalora_group_size=32)
    yield "regex", dict(target_modules=r".*\.linear_(qkv|proj)", exclude_modules=r".*\.output_layer",
                        init_lora_weights="pissa_niter_4", use_dora=True, megatron_core=None)
    yield "eva", dict(init_lora_weights="eva", eva_config=lc.EvaConfig(rho=1.5))
    yield "corda", dict(init_lora_weights="corda", corda_config=lc.CordaConfig(corda_method="kpm"))
    yield "lora_ga", dict(init_lora_weights="lora_ga", lora_ga_config=lc.LoraGAConfig(direction="ArBr"))
    yield "variants", dict(task_type="CAUSAL_LM", alora_invocation_tokens=[1, 2, 3], trainable_token_indices=[3],
                           velora_config=lc.VeloraConfig(num_groups=8), kasa_config=lc.KasaConfig(beta=0.5),
                           monteclora_config=lc.MontecloraConfig(num_samples=2), arrow_config=lc.ArrowConfig(top_k=2),
                           use_bdlora=lc.BdLoraConfig(target_modules_bd_a=["q"]), init_lora_weights="mica")


PEFT_CASES = list(_peft_configs())


@pytest.mark.parametrize("kwargs", [k for _, k in PEFT_CASES], ids=[n for n, _ in PEFT_CASES])
def test_peft_to_megalora(kwargs, tmp_path):
    theirs = quiet(peft.LoraConfig, **kwargs)
    expected = canon(theirs.to_dict())
    assert canon(quiet(LoraConfig.from_dict, theirs.to_dict()).to_dict()) == expected
    theirs.save_pretrained(str(tmp_path))
    ours = quiet(LoraConfig.from_pretrained, tmp_path)
    assert canon(ours.to_dict()) == expected
    assert ours.peft_version == peft.__version__


@pytest.mark.parametrize("kwargs", [k for _, k in PEFT_CASES], ids=[n for n, _ in PEFT_CASES])
def test_megalora_to_peft(kwargs, tmp_path):
    kwargs = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in kwargs.items()}
    ours = quiet(LoraConfig, **kwargs)
    ours.save_pretrained(tmp_path)
    expected = canon(ours.to_dict(), keep_version=False)
    for loader in (peft.LoraConfig.from_pretrained, peft.PeftConfig.from_pretrained):
        theirs = quiet(loader, str(tmp_path))
        assert isinstance(theirs, peft.LoraConfig)
        assert canon(theirs.to_dict(), keep_version=False) == expected
    back = quiet(LoraConfig.from_pretrained, tmp_path / CONFIG_NAME)
    assert back == ours


def test_loftq_from_peft_file(tmp_path):
    # PEFT's own constructor needs scipy for loftq, so write the file the way PEFT would.
    d = canon(peft.LoraConfig().to_dict())
    d.update(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    (tmp_path / CONFIG_NAME).write_text(json.dumps(d, indent=2, sort_keys=True))
    ours = LoraConfig.from_pretrained(tmp_path)
    assert ours.loftq_config == {"loftq_bits": 4, "loftq_iter": 2}
    assert canon(ours.to_dict()) == d


def test_unknown_keys_warn_and_runtime_config_dropped():
    d = LoraConfig().to_dict()
    d.update(future_option=1, another=2)
    with pytest.warns(UserWarning, match=r"\['another', 'future_option'\]"):
        c = LoraConfig.from_dict(d)
    assert c == LoraConfig()
    with pytest.warns(UserWarning, match="runtime_config"):
        LoraConfig.from_dict({"peft_type": "LORA", "runtime_config": {"ephemeral_gpu_offload": True}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bookkeeping keys are fields, so no warning
        c = LoraConfig.from_dict({"peft_type": "LORA", "peft_version": "0.9.0", "auto_mapping": {"a": "b"}})
    assert c.peft_version == "0.9.0" and c.to_dict()["auto_mapping"] == {"a": "b"}


@pytest.mark.parametrize("peft_type", ["IA3", "ADALORA", None])
def test_wrong_peft_type_rejected(peft_type):
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": peft_type, "r": 4})


def test_save_is_atomic_and_overwrites(tmp_path):
    path = LoraConfig(r=4).save_pretrained(tmp_path / "adapter")
    assert os.path.basename(path) == CONFIG_NAME
    LoraConfig(r=2).save_pretrained(tmp_path / "adapter")
    assert os.listdir(tmp_path / "adapter") == [CONFIG_NAME]  # no temp files left behind
    assert LoraConfig.from_pretrained(tmp_path / "adapter").r == 2
    assert json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["peft_type"] == "LORA"
    with pytest.raises(NotADirectoryError):
        LoraConfig().save_pretrained(path)
    with pytest.raises(FileNotFoundError):
        LoraConfig.from_pretrained(tmp_path / "missing")


def test_to_json_string_matches_file(tmp_path):
    c = LoraConfig(target_modules={"b", "a"})
    c.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_text() == c.to_json_string()


# -- unimplemented options -----------------------------------------------------------

UNIMPLEMENTED = [
    (dict(init_lora_weights="lora_ga"), "init_lora_weights='lora_ga'"),
    (dict(init_lora_weights="mica"), "init_lora_weights='mica'"),
    (dict(alora_invocation_tokens=[1], task_type="CAUSAL_LM"), "alora_invocation_tokens"),
    (dict(velora_config={}), "velora_config"),
    (dict(monteclora_config={"num_samples": 2}), "monteclora_config"),
    (dict(use_bdlora={"nblocks": 2}), "use_bdlora"),
    (dict(arrow_config={"top_k": 2}), "arrow_config"),
    (dict(kasa_config={"beta": 0.1}), "kasa_config"),
]


@pytest.mark.parametrize("kwargs,name", UNIMPLEMENTED, ids=[n for _, n in UNIMPLEMENTED])
def test_raise_if_unimplemented(kwargs, name):
    c = quiet(LoraConfig, **kwargs)
    with pytest.raises(NotImplementedError, match="megalora does not implement") as info:
        c.raise_if_unimplemented()
    assert name in str(info.value)


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "pissa", "pissa_niter_3", "olora"])
def test_implemented_options_pass(init):
    LoraConfig(init_lora_weights=init, target_modules=["linear_qkv"], rank_pattern={"a": 2}, bias="all",
               use_rslora=True, exclude_modules=["x"], layers_to_transform=1, trainable_token_indices=[1],
               ensure_weight_tying=True).raise_if_unimplemented()


# -- helpers -------------------------------------------------------------------------


def test_copy_and_replace(transformer_config):
    c = LoraConfig(target_modules=["a"], rank_pattern={"a": 2}, megatron_config=transformer_config)
    d = c.copy()
    assert d == c and d is not c
    assert d.megatron_config is transformer_config
    d.rank_pattern["a"] = 4
    assert c.rank_pattern == {"a": 2}
    e = c.replace(r=4, target_modules=["b"])
    assert e.r == 4 and e.target_modules == {"b"} and c.r == 8
    with pytest.raises(ValueError, match="r"):
        c.replace(r=0)
