"""megatron-core's ``jit_fuser`` without importing torch's compiler at import time.

megatron-core 0.16 sets ``megatron.core.jit.jit_fuser = torch.compile`` and
decorates a dozen fused functions with it while its modules import.
``torch.compile(fn)`` imports dynamo and inductor on the spot, which is most of
megatron's import time (measured: 6.4 s -> 1.5 s for ``import megatron.core``
with this module on a 2-core CPU machine), paid by every rank of every launch,
while those fused functions only run when a config turns the fusions on.

``torch.compile`` is itself lazy about compiling (it compiles on the first
call), so deferring the call that creates the compiled function until that
first call changes nothing but the import time. The patch is scoped: a
one-shot import hook runs ``megatron.core.jit``'s module code with a deferring
``torch.compile`` and puts torch's back right after; only megatron's
``jit_fuser`` keeps the wrapper.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys
from typing import Any, Callable

JIT_MODULE = "megatron.core.jit"


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


class _DeferringLoader(importlib.abc.Loader):
    """Runs ``megatron.core.jit``'s module code with ``torch.compile`` deferring, then puts it back."""

    def __init__(self, inner: importlib.abc.Loader):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        import torch

        original = torch.compile
        torch.compile = deferred_compile(original)
        try:
            self._inner.exec_module(module)
        finally:
            torch.compile = original


class _JitFinder(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` once, with :class:`_DeferringLoader`, and leaves ``sys.meta_path``."""

    def find_spec(self, name, path, target=None):
        if name != JIT_MODULE:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _DeferringLoader(spec.loader)
        return spec


def install() -> None:
    """Makes the first import of ``megatron.core.jit`` (whoever imports megatron) defer ``torch.compile``.

    Nothing is imported now: a self-removing import hook for that one module, so
    that ``import megalora`` stays as cheap as before for plain-layer users. A no-op
    when megatron-core is already imported.
    """
    if JIT_MODULE in sys.modules or any(isinstance(f, _JitFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _JitFinder())
