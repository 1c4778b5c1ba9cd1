"""LoRA configuration that reads and writes PEFT's ``adapter_config.json``.

``LoraConfig`` carries every field of ``peft.LoraConfig`` (PEFT 0.21.2) under the same
name, default and order, so a file written by either library loads in the other. PEFT is
not imported here: megalora must work without it installed.
"""

from __future__ import annotations

import copy as _copy
import dataclasses
import enum
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .atomic_write import write_text
from .config_values import (  # noqa: F401  (re-exported: the config's own rules)
    _DROP,
    _check_loftq,
    MEGATRON_CORE_ALLOWLIST_PREFIX,
    _fail,
    _int_list,
    _is_dc,
    _is_int,
    _is_real,
    _str_list,
    check_megatron_core,
    to_json_safe,
)

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "LORA"
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
BIAS_OPTIONS = ("none", "all", "lora_only")
INIT_OPTIONS = ("gaussian", "orthogonal", "pissa", "pissa_niter_<int>", "olora", "loftq", "eva", "corda",
                "lora_ga", "mica")
IMPLEMENTED_INITS = (True, False, "gaussian", "orthogonal", "pissa", "olora", "loftq", "eva", "corda")
_PISSA_NITER = re.compile(r"pissa_niter_\d+")
# Sub-configs that PEFT stores as its own dataclasses and writes as nested dicts.
_SUBCONFIG_FIELDS = ("eva_config", "corda_config", "lora_ga_config", "velora_config", "monteclora_config",
                     "use_bdlora", "arrow_config", "kasa_config")
_BOOL_FIELDS = ("inference_mode", "fan_in_fan_out", "use_rslora", "use_dora", "use_qalora", "lora_bias",
                "ensure_weight_tying")
@dataclass
class LoraRuntimeConfig:
    """PEFT's runtime-only settings (``ephemeral_gpu_offload``); never written to disk."""

    ephemeral_gpu_offload: bool = False


@dataclass
class LoraConfig:
    """Configuration of a LoRA adapter, field for field the same as ``peft.LoraConfig``.

    The meaning of every field is PEFT's; see its documentation. megalora-specific notes:

    Attributes:
        target_modules: None, a regex (full match) or ``"all-linear"``, or a list/set of
            names. Lists are held as a set (as PEFT does) and written as a sorted list.
        exclude_modules: Same forms as ``target_modules``.
        megatron_config: None, a dict, or a megatron ``TransformerConfig`` (any dataclass
            instance). Kept as given in memory; ``to_dict`` writes it through
            ``to_json_safe`` (callables dropped, dtypes as str, enums by name).
        megatron_core: None or a module path under ``megatron.`` (``check_megatron_core``).
        loftq_config: Held as a dict, as PEFT does. ``runtime_config`` is never written.

    Options accepted but not implemented yet are rejected by ``raise_if_unimplemented``.
    """

    task_type: Optional[str] = None
    peft_type: str = PEFT_TYPE
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    r: int = 8
    target_modules: Optional[Union[set, list, str]] = None
    exclude_modules: Optional[Union[set, list, str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    megatron_config: Optional[Any] = field(default=None, repr=False)  # a TransformerConfig repr is pages long
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Optional[Union[list, dict]] = None
    loftq_config: Any = field(default_factory=dict)
    eva_config: Optional[Any] = None
    corda_config: Optional[Any] = None
    lora_ga_config: Optional[Any] = None
    use_dora: bool = False
    velora_config: Optional[Any] = None
    alora_invocation_tokens: Optional[list] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[Any] = None
    layer_replication: Optional[list] = None
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig)
    lora_bias: bool = False
    target_parameters: Optional[list] = None
    use_bdlora: Optional[Any] = None
    arrow_config: Optional[Any] = None
    kasa_config: Optional[Any] = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        self._check_bookkeeping()
        self._check_lora_basics()
        self._check_targets()
        self._check_init()
        self._check_extras()

    def _check_bookkeeping(self) -> None:
        # PEFT hands us its str-enums (PeftType, TaskType) when reading its in-memory dicts.
        if isinstance(self.peft_type, enum.Enum):
            self.peft_type = self.peft_type.value
        if self.peft_type != PEFT_TYPE:
            _fail("peft_type", f"{self.peft_type!r} is not a LoRA adapter", f"Only {PEFT_TYPE!r} is supported")
        if isinstance(self.task_type, enum.Enum):
            self.task_type = self.task_type.value
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            _fail("task_type", f"unknown task type {self.task_type!r}", f"Use None or one of {TASK_TYPES}")
        for name in ("peft_version", "base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                _fail(name, f"expected a str, got {getattr(self, name)!r}", "Pass a str or None")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            _fail("auto_mapping", f"expected a dict, got {self.auto_mapping!r}", "Pass a dict or None")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"expected a bool, got {getattr(self, name)!r}", "Pass True or False")

    def _check_lora_basics(self) -> None:
        if not _is_int(self.r) or self.r <= 0:
            _fail("r", f"rank must be a positive int, got {self.r!r}", "Pass e.g. r=8")
        if not _is_real(self.lora_alpha):
            _fail("lora_alpha", f"expected a finite number, got {self.lora_alpha!r}", "Pass e.g. lora_alpha=16")
        if not _is_real(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            _fail("lora_dropout", f"must be a number in [0, 1), got {self.lora_dropout!r}", "Pass e.g. 0.05")
        if self.bias not in BIAS_OPTIONS:
            _fail("bias", f"unknown value {self.bias!r}", f"Use one of {BIAS_OPTIONS}")
        # PEFT treats None and {} alike; {} saves every reader a None check.
        for name, valid, example in (("rank_pattern", lambda v: _is_int(v) and v > 0, 16),
                                     ("alpha_pattern", lambda v: _is_real(v) and v > 0, 32)):
            pattern = {} if getattr(self, name) is None else getattr(self, name)
            if not isinstance(pattern, dict) or not all(isinstance(k, str) and valid(v) for k, v in pattern.items()):
                _fail(name, f"expected a dict of str to positive {'int' if name == 'rank_pattern' else 'number'}, "
                      f"got {pattern!r}", f"Pass e.g. {name}={{'linear_qkv': {example}}}")
            setattr(self, name, dict(pattern))

    def _check_targets(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as exc:
                    _fail(name, f"{value!r} is not a valid regex ({exc})", "Pass a valid regex or a list of names")
            elif value is not None:
                setattr(self, name, set(_str_list(name, value)))  # PEFT holds lists as sets
        if self.modules_to_save is not None:
            self.modules_to_save = _str_list("modules_to_save", self.modules_to_save)
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str):
                _fail("target_parameters", "a regex str is not supported (nor in PEFT)", "Pass a list of names")
            self.target_parameters = _str_list("target_parameters", self.target_parameters)
        if self.layers_to_transform is not None and not (_is_int(self.layers_to_transform)
                                                         and self.layers_to_transform >= 0):
            self.layers_to_transform = _int_list("layers_to_transform", self.layers_to_transform)
        if self.layers_pattern is not None and not isinstance(self.layers_pattern, str):
            self.layers_pattern = _str_list("layers_pattern", self.layers_pattern)
        if isinstance(self.target_modules, str):
            for name in ("layers_to_transform", "layers_pattern"):
                if getattr(self, name) is not None:
                    _fail(name, "cannot be used when target_modules is a regex str (PEFT forbids it)",
                          "Put the layer index into the regex, or pass target_modules as a list of names")
        if self.layers_pattern and self.layers_to_transform is None:
            _fail("layers_pattern", "is set but layers_to_transform is not",
                  "Also pass layers_to_transform, or drop layers_pattern")
        if self.layer_replication is not None:
            pairs = self.layer_replication
            ok = isinstance(pairs, (list, tuple)) and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(i) for i in p) and 0 <= p[0] < p[1]
                for p in pairs)
            if not ok:
                _fail("layer_replication", f"expected a list of [start, end) int pairs, got {pairs!r}",
                      "Pass e.g. [[0, 4], [2, 5]] with 0 <= start < end")
            self.layer_replication = [tuple(p) for p in pairs]

    def _check_init(self) -> None:
        init = self.init_lora_weights
        known = isinstance(init, str) and (init in INIT_OPTIONS or _PISSA_NITER.fullmatch(init))
        if not (isinstance(init, bool) or known):
            _fail("init_lora_weights", f"unknown initialization {init!r}", f"Use True, False or one of {INIT_OPTIONS}")
        if self.loftq_config is None:
            self.loftq_config = {}
        elif _is_dc(self.loftq_config):
            self.loftq_config = dataclasses.asdict(self.loftq_config)  # PEFT also holds it as a dict
        if not isinstance(self.loftq_config, dict):
            _fail("loftq_config", f"expected a dict, got {self.loftq_config!r}", "Pass a dict or LoftQConfig")
        if init == "loftq" and not self.loftq_config:
            _fail("loftq_config", "must be given when init_lora_weights='loftq'",
                  "Pass loftq_config={'loftq_bits': 4, 'loftq_iter': 1}")
        if init == "loftq":
            _check_loftq(self.loftq_config)
        if init != "loftq" and self.loftq_config:
            warnings.warn("LoraConfig: loftq_config is ignored because init_lora_weights is not 'loftq'.")
            self.loftq_config = {}
        for name in _SUBCONFIG_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict) and not _is_dc(value):
                _fail(name, f"expected a dict or a PEFT config dataclass, got {value!r}", "Pass a dict or None")
        # PEFT falls back to default Eva/CorDA settings here; the initializer does the same.
        for method in ("eva", "corda"):
            sub = getattr(self, f"{method}_config")
            if init == method and sub is None:
                warnings.warn(f"LoraConfig: init_lora_weights={method!r} without {method}_config; defaults apply.")
            elif init != method and sub is not None:
                warnings.warn(f"LoraConfig: {method}_config is ignored because init_lora_weights is not {method!r}.")
        if self.lora_bias and init not in (True, False):
            _fail("lora_bias", f"lora_bias=True needs init_lora_weights True or False, got {init!r}",
                  "Set lora_bias=False or use the default initialization")
        if self.lora_bias and self.use_dora:
            _fail("lora_bias", "lora_bias=True cannot be combined with use_dora=True (PEFT forbids it)",
                  "Set lora_bias=False or use_dora=False")

    def _check_extras(self) -> None:
        mc = self.megatron_config
        if mc is not None and not isinstance(mc, dict) and not _is_dc(mc):
            _fail("megatron_config", f"expected a dict or a TransformerConfig, got {type(self.megatron_config)}",
                  "Pass the model's TransformerConfig, a dict of its fields, or None")
        if self.megatron_core is not None:
            check_megatron_core(self.megatron_core)
        tti = self.trainable_token_indices
        if isinstance(tti, dict):
            if not all(isinstance(k, str) for k in tti):
                _fail("trainable_token_indices", "dict keys must be module names", "Pass e.g. {'embedding': [0]}")
            self.trainable_token_indices = {k: _int_list("trainable_token_indices", v) for k, v in tti.items()}
        elif tti is not None:
            self.trainable_token_indices = _int_list("trainable_token_indices", tti)
        if self.alora_invocation_tokens is not None:
            self.alora_invocation_tokens = _int_list("alora_invocation_tokens", self.alora_invocation_tokens)
            if self.task_type != "CAUSAL_LM":
                warnings.warn("LoraConfig: aLoRA (alora_invocation_tokens) is only supported for CAUSAL_LM.")
        if not _is_int(self.qalora_group_size) or self.qalora_group_size <= 0:
            _fail("qalora_group_size", f"must be a positive int, got {self.qalora_group_size!r}", "Pass e.g. 16")
        if isinstance(self.runtime_config, dict):
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)
        elif not _is_dc(self.runtime_config):
            _fail("runtime_config", f"expected a LoraRuntimeConfig, got {self.runtime_config!r}",
                  "Leave it at its default")

    # -- behaviour the rest of megalora needs ------------------------------------------

    def raise_if_unimplemented(self) -> None:
        """Raises if the config asks for something megalora cannot do yet.

        The config accepts every PEFT option so files round-trip; building a model must
        not silently ignore one instead.

        Raises:
            NotImplementedError: Naming the first such option that is set.
        """
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in IMPLEMENTED_INITS or _PISSA_NITER.fullmatch(str(init))):
            raise NotImplementedError(
                f"megalora does not implement init_lora_weights={init!r} yet; use True, False, 'gaussian', "
                "'orthogonal', 'pissa', 'pissa_niter_<n>', 'olora', 'loftq', 'eva' or 'corda'")
        unimplemented = ("alora_invocation_tokens", "velora_config",
                         "monteclora_config", "use_bdlora", "arrow_config", "kasa_config")
        for name in unimplemented:
            value = getattr(self, name)
            # PEFT turns even an empty sub-config dict into an active variant, so only None is "off".
            if (value is not None) if name in _SUBCONFIG_FIELDS else bool(value):
                raise NotImplementedError(
                    f"megalora does not implement {name}={value!r} yet; leave it at its default "
                    f"({getattr(type(self), name, None)!r})")

    def copy(self) -> "LoraConfig":
        """Returns an independent copy; ``megatron_config`` is shared, not copied.

        The TransformerConfig may hold process groups and other objects that must not be
        duplicated, and it describes the model rather than the adapter.
        """
        values = {f.name: (getattr(self, f.name) if f.name == "megatron_config"
                           else _copy.deepcopy(getattr(self, f.name))) for f in dataclasses.fields(self)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warnings already went out for the original
            return type(self)(**values)

    def replace(self, **changes: Any) -> "LoraConfig":
        """Returns a copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self.copy(), **changes)

    # -- serialization ---------------------------------------------------------------

    def to_dict(self) -> dict:
        """Returns the config as a JSON-safe dict in PEFT's ``adapter_config.json`` layout.

        ``runtime_config`` is left out (as PEFT does), ``target_modules``/``exclude_modules``
        sets become sorted lists, and ``megatron_config`` and sub-configs are converted
        by ``to_json_safe``.
        """
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "runtime_config":
                continue
            value = to_json_safe(getattr(self, f.name))
            if value is _DROP:
                raise TypeError(f"LoraConfig.{f.name}={getattr(self, f.name)!r} has no JSON form")
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        """Returns the JSON text written to ``adapter_config.json`` (PEFT's layout)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Writes ``adapter_config.json`` into ``save_directory`` atomically.

        A crash mid-write leaves either the old file or the new one, never a torn file,
        because the text goes to a temporary file in the same directory that is synced and
        then renamed over the target.

        Args:
            save_directory: Directory to write into; created if missing.

        Returns:
            The path of the written file.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"save_pretrained expects a directory, got the file {save_directory!r}")
        os.makedirs(save_directory, exist_ok=True)
        text = self.to_json_string()
        path = os.path.join(save_directory, CONFIG_NAME)
        write_text(path, text)
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "LoraConfig":
        """Builds a config from a dict such as ``peft.LoraConfig(...).to_dict()``.

        Keys this version does not know (e.g. from a newer PEFT) are ignored with a
        warning, as PEFT does; ``runtime_config`` is dropped with a warning.

        Raises:
            ValueError: If ``peft_type`` is not ``"LORA"`` or a field is invalid.
        """
        if not isinstance(data, dict):
            raise ValueError(f"LoraConfig.from_dict expects a dict, got {type(data)}")
        kwargs = dict(data)
        peft_type = kwargs.get("peft_type", PEFT_TYPE)
        peft_type = peft_type.value if isinstance(peft_type, enum.Enum) else peft_type
        if peft_type != PEFT_TYPE:
            _fail("peft_type", f"{peft_type!r} is not a LoRA adapter config", "Load it with the matching PEFT class")
        if "runtime_config" in kwargs:  # PEFT never writes it, and drops it with a warning too
            del kwargs["runtime_config"]
            warnings.warn("LoraConfig: ignoring 'runtime_config'; it is only valid at runtime.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            warnings.warn(f"LoraConfig: ignoring unknown keys {unknown}; they may come from a newer PEFT version.")
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike]) -> "LoraConfig":
        """Builds a config from a JSON file (unlike PEFT's method, returns the config)."""
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> "LoraConfig":
        """Loads a config from an adapter directory or directly from a JSON file.

        Args:
            path: Directory holding ``adapter_config.json``, or the file itself. Hub ids
                are not supported: megalora runs where there is often no network.
        """
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"No {CONFIG_NAME} at {path!r}")
        return cls.from_json_file(file)
