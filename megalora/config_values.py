"""The value rules under ``LoraConfig``: checks of single fields, and JSON conversion.

:class:`megalora.config.LoraConfig` validates its fields with these and writes
``adapter_config.json`` through :func:`to_json_safe`; they know nothing of LoRA
itself, so they live apart from the dataclass.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import sys
from typing import Any

MEGATRON_CORE_ALLOWLIST_PREFIX = "megatron."
# to_json_safe's answer for a value with no JSON form.
_DROP = object()


def check_megatron_core(name: str) -> str:
    """Checks that ``name`` is a module path megalora may import for ``megatron_core``.

    The module named here gets imported, so a config loaded from an untrusted file must
    not be able to name an arbitrary module (PEFT issue #3085).

    Args:
        name: Dotted module path, normally ``"megatron.core"``.

    Returns:
        ``name`` unchanged.

    Raises:
        ValueError: If ``name`` is not a dotted module path under ``megatron.``.
    """
    if (not isinstance(name, str) or not name.startswith(MEGATRON_CORE_ALLOWLIST_PREFIX)
            or not all(part.isidentifier() for part in name.split("."))):
        raise ValueError(
            f"megatron_core={name!r} is not allowed: it must be 'megatron.core' or another module path under "
            f"the allowlisted prefix {MEGATRON_CORE_ALLOWLIST_PREFIX!r}, because it is imported and a config "
            "must not import arbitrary modules. Use megatron_core='megatron.core' (or None).")
    return name


def to_json_safe(value: Any) -> Any:
    """Converts ``value`` into plain JSON types, dropping what has no JSON form.

    Dataclasses (such as megatron's ``TransformerConfig``) become dicts of their ``init``
    fields only, so every key is a constructor argument; enums become their name;
    ``torch.dtype`` its ``str`` (``"torch.bfloat16"``); sets sorted lists; tuples lists.
    Callables, other objects and non-finite floats are dropped: a dict loses that key,
    and a list holding one is dropped whole, since a list with a hole means something else.

    Returns:
        The converted value, or the sentinel ``_DROP`` if it has no JSON form.
    """
    if isinstance(value, enum.Enum):  # before str/int: str- and int-enums would pass as is
        return value.name
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _DROP
    torch = sys.modules.get("torch")  # a dtype cannot exist unless torch is already imported
    if torch is not None and isinstance(value, torch.dtype):
        return str(value)
    if _is_dc(value):
        return _json_safe_mapping((f.name, getattr(value, f.name)) for f in dataclasses.fields(value) if f.init)
    if isinstance(value, dict):
        return _json_safe_mapping(value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [to_json_safe(v) for v in value]
        if any(item is _DROP for item in items):
            return _DROP
        if isinstance(value, (set, frozenset)):
            items.sort(key=lambda v: (type(v).__name__, str(v)))  # deterministic files
        return items
    return _DROP


def _json_safe_mapping(items) -> dict:
    out = {}
    for key, val in items:
        if isinstance(key, enum.Enum):
            key = key.name
        elif isinstance(key, (int, float)):
            key = str(key)
        elif not isinstance(key, str):
            continue
        val = to_json_safe(val)
        if val is not _DROP:
            out[key] = val
    return out


def _fail(name: str, problem: str, fix: str) -> None:
    raise ValueError(f"LoraConfig.{name}: {problem}. {fix}")


def _is_dc(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _str_list(name: str, value: Any) -> list:
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
        _fail(name, f"expected a list of str, got {value!r}", f"Pass e.g. {name}=['linear_qkv'] or None")
    return sorted(value) if isinstance(value, (set, frozenset)) else list(value)


def _int_list(name: str, value: Any) -> list:
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= 0 for v in value):
        _fail(name, f"expected a list of non-negative ints, got {value!r}", f"Pass e.g. {name}=[0, 1] or None")
    return list(value)


def _check_loftq(loftq_config: dict) -> None:
    """``loftq_bits`` in 2/4/8 and ``loftq_iter`` ≥ 1 (PEFT's LoftQConfig defaults: 4 and 1)."""
    bits, iters = loftq_config.get("loftq_bits", 4), loftq_config.get("loftq_iter", 1)
    if bits not in (2, 4, 8) or not _is_int(bits):
        _fail("loftq_config", f"loftq_bits={bits!r} is not supported", "Use loftq_bits 2, 4 or 8")
    if not _is_int(iters) or iters < 1:
        _fail("loftq_config", f"loftq_iter={iters!r} must be an int >= 1", "Pass e.g. loftq_iter=1")
