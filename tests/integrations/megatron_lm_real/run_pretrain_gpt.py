"""One rank of Megatron-LM's ``pretrain_gpt.py`` with megalora's LoRA, on CPU/gloo (test harness).

Applies :mod:`cpu_patch`, then runs this repository's
``launch/pretrain_gpt_lora.py`` exactly as a user would, which in turn runs the
unmodified ``pretrain_gpt.py`` of the checkout at ``$MEGATRON_LM_PATH``.
Started by ``tests/integrations/test_megatron_lm_real.py``; by hand::

    MEGATRON_LM_PATH=/path/to/Megatron-LM python -m torch.distributed.run --standalone \\
        --nproc_per_node 2 tests/integrations/megatron_lm_real/run_pretrain_gpt.py <pretrain_gpt.py and --lora-* args>

``kill -USR1 <rank pid>`` makes that rank print its Python stacks (the test
does so before killing a run that timed out, to show where it hung).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


def _set_paths(megatron_lm: str) -> None:
    """megalora from this repository; ``megatron.training`` from the checkout; ``megatron.core`` installed.

    The checkout goes *after* site-packages: ``megatron`` is a namespace
    package, so a full clone's own ``megatron/core`` would otherwise shadow
    the installed megatron-core that megalora is tested against. The
    launcher later puts the checkout first (for ``gpt_builders`` and
    ``model_provider``), but by then ``megatron.core`` is already imported.
    """
    sys.path[:0] = [HERE, REPO]
    sys.path.append(megatron_lm)


def main() -> None:
    megatron_lm = os.environ.get("MEGATRON_LM_PATH", "")
    if not os.path.isfile(os.path.join(megatron_lm, "pretrain_gpt.py")):
        sys.exit(f"run_pretrain_gpt.py: MEGATRON_LM_PATH={megatron_lm!r} holds no pretrain_gpt.py")
    _set_paths(megatron_lm)
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    import cpu_patch

    cpu_patch.apply()

    import megalora
    import megatron.core
    import megatron.training

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[run_pretrain_gpt] megalora {os.path.dirname(megalora.__file__)}, "
              f"megatron.core {os.path.dirname(megatron.core.__file__)}, "
              f"megatron.training {os.path.dirname(megatron.training.__file__)}", flush=True)
    launcher = os.path.join(REPO, "launch", "pretrain_gpt_lora.py")
    sys.argv[0] = launcher
    runpy.run_path(launcher, run_name="__main__")


if __name__ == "__main__":
    main()
