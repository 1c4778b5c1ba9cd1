"""``python -m megalora.train CONFIG [section.key=value ...]``: run a job on this process's rank.

This is what every launcher starts, once per rank: ``torchrun``, Slurm's
``srun`` (with ``SLURM_PROCID``), ``mpirun`` (ranks and the rendezvous come
from MPI through mpi4py), or nothing for a single process. The layout comes
from the config; the world size from the launcher. Examples::

    torchrun --nproc_per_node 3 -m megalora.train configs/smollm2_cpu.yaml
    mpirun -np 2 python -m megalora.train configs/tiny_gpt.yaml train.steps=10
    python -m megalora.train configs/tiny_gpt.yaml parallel.tp=1
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megalora.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a YAML job config (see configs/)")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides, e.g. train.steps=20 lora.r=8")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .launcher import print_error, quiet_other_ranks

    quiet_other_ranks()
    args = parser().parse_args(argv)
    # Megatron warns about this on every TP layer; it only matters on GPUs, where it is required.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from .parallel_start import shutdown_distributed
    from .training import load, run

    try:
        run(load(args.config, args.overrides))
    except (ValueError, FileNotFoundError) as exc:
        # Config and input errors carry their fix and are raised on every rank: one line, once.
        if os.environ.get("MEGALORA_TRACEBACK"):
            raise
        print_error(f"python -m megalora.train: error: {exc}")
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
