"""megatron's jit_fuser defers torch.compile, so importing megatron through megalora skips torch's compiler."""

from __future__ import annotations

import subprocess
import sys

from megalora.lazy_compile import deferred_compile

PROBE = """
import sys, torch
original = torch.compile
import megalora
assert "megatron" not in sys.modules, "import megalora imported megatron"
from megatron.core.models.gpt import GPTModel  # imports every jit_fuser-decorated fusion
from megatron.core import jit
assert torch.compile is original, "torch.compile was not put back"
assert "torch._inductor" not in sys.modules, "megatron's import still compiled something"
assert jit.jit_fuser is not original and jit.jit_fuser.__module__ == "megalora.lazy_compile"
assert not any(type(f).__name__ == "_JitFinder" for f in sys.meta_path), "the import hook stayed"
print("ok")
"""


def test_importing_megatron_through_megalora_compiles_nothing():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_deferred_compile_compiles_once_on_first_call_with_the_options():
    calls = []

    def fake_compile(fn, **options):
        calls.append(options)
        return lambda *a, **k: ("compiled", fn(*a, **k))

    def add(x, y=1):
        return x + y

    lazy = deferred_compile(fake_compile)
    wrapped, with_options = lazy(add), lazy(mode="max-autotune")(add)
    assert calls == [] and wrapped.__wrapped__ is add and wrapped.__name__ == "add"
    assert wrapped(2) == ("compiled", 3) and wrapped(2, y=5) == ("compiled", 7)
    assert with_options(1) == ("compiled", 2)
    assert calls == [{}, {"mode": "max-autotune"}]
