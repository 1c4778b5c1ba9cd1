"""The two runs ``megalora verify`` compares: their overrides, and how they are started.

Both train the same steps from the same weights and data with plain SGD and
no dropout (:mod:`.verify` explains why); the single run also sets every
parallel size to 1.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .. import fork_start
from ..launcher import child_env, launch

VERIFY_OVERRIDES = ("job.eval_base=false", "job.max_new_tokens=0", "job.merge_check=false",
                    "job.export_hf_peft=false", "job.plot=false", "lora.lora_dropout=0.0", "train.save_every=0",
                    "train.resume=null", "train.eval_every=0", "train.log_every=0", "train.optimizer=sgd",
                    "job.record_grads=true")
SINGLE_OVERRIDES = ("parallel.tp=1", "parallel.pp=1", "parallel.vpp=null", "parallel.sp=false", "parallel.ep=1",
                    "parallel.etp=null")


def run_both(config: str, common: list[str], nproc: int, work: str, quiet: bool = False) -> int:
    """Runs ``config`` at its layout on ``nproc`` ranks and at world size 1; the first non-zero exit status.

    ``common`` are both runs' overrides (:data:`VERIFY_OVERRIDES` among them); they write
    ``WORK/layout`` and ``WORK/single``. ``quiet``: the runs' standard output is discarded.

    On CPU they run at once (one start-up overlaps the other's work), the single run writing to
    ``WORK/single.log``, and both are forks of this process (:mod:`..fork_start`); with CUDA one after
    the other, since both would use GPU 0.
    """
    import torch

    out = subprocess.DEVNULL if quiet else None
    layout = [config, *common, f"job.output_dir={work}/layout"]
    single = [sys.executable, "-m", "megalora.train", config, *common, *SINGLE_OVERRIDES,
              f"job.output_dir={work}/single"]
    together = not torch.cuda.is_available()
    if not quiet:
        print(f"megalora verify: layout run: python -m megalora.train {' '.join(layout)}", flush=True)
        print(f"megalora verify: single run: python {' '.join(single[1:])}"
              + (f" (output: {work}/single.log)" if together else ""), flush=True)
    log = started = None
    if together:
        os.makedirs(work, exist_ok=True)
        log = open(os.path.join(work, "single.log"), "w")
        if fork_start.can_fork():
            fork_start.preload("megalora.train")
            started = fork_start.start("megalora.train", single[3:], child_env(), log.fileno())
        else:
            started = subprocess.Popen(single, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        if nproc > 1:
            code = launch(nproc, "megalora.train", layout, stdout=out)
        else:
            code = subprocess.call([sys.executable, "-m", "megalora.train", *layout], env=child_env(), stdout=out)
        if code:
            print(f"megalora verify: the layout run failed (exit {code})", file=sys.stderr)
            return code
        code = started.wait() if started else subprocess.call(single, env=child_env(), stdout=out)
    finally:
        if started and started.poll() is None:
            started.kill()
            started.wait()
        if log:
            log.close()
    if code:
        tail = ""
        if together:
            with open(os.path.join(work, "single.log"), encoding="utf-8", errors="replace") as handle:
                tail = ":\n" + "".join(handle.readlines()[-20:])
        print(f"megalora verify: the single run failed (exit {code}){tail}", file=sys.stderr)
    return code
