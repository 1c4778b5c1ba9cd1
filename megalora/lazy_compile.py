"""megatron-core's ``jit_fuser`` without importing torch's compiler at import time.

megatron-core 0.16 sets ``megatron.core.jit.jit_fuser = torch.compile`` and
decorates a dozen fused functions with it while its modules import.
``torch.compile(fn)`` imports dynamo and inductor on the spot, which is most of
megatron's import time (measured: 6.4 s -> 1.5 s for ``import megatron.core``
with this module on a 2-core CPU machine), paid by every rank of every launch,
while those fused functions only run when a config turns the fusions on.

``torch.compile`` is itself lazy about compiling (it compiles on the first
call), so deferring the call that creates the compiled function until that
first call changes nothing but the import time. The patch is scoped: only
megatron's ``jit_fuser`` keeps the deferring wrapper; ``torch.compile`` is put
back before this returns.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable


def deferred_compile(compile_fn: Callable) -> Callable:
    """Returns ``compile_fn`` (``torch.compile``'s signature) that compiles on the first call."""

    def compile_later(fn: Any = None, **options: Any):
        if fn is None:  # used as @jit_fuser(mode=...)
            return lambda f: compile_later(f, **options)
        compiled = None

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any):
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(fn, **options)
            return compiled(*args, **kwargs)

        return run

    return compile_later


def import_megatron_jit() -> None:
    """Imports ``megatron.core.jit`` with ``jit_fuser`` deferring ``torch.compile``; no-op if already imported."""
    if "megatron.core.jit" in sys.modules:
        return
    import torch

    original = torch.compile
    torch.compile = deferred_compile(original)
    try:
        import megatron.core.jit  # noqa: F401 - its import binds jit_fuser
    except ImportError:  # megatron-core not installed: the plain-layer API still works
        pass
    finally:
        torch.compile = original
