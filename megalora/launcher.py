"""How the ``megalora`` command starts its ranks, and how their errors come back as one line.

The CLI re-runs itself under torchrun when the layout needs several
processes. It does not call the ``torchrun`` console script: it runs this
module's :func:`main` (in a forked child on POSIX, which has torch imported
already; else as ``python -m megalora.launcher``), which calls torchrun's own
argument parser and launcher and catches its ``ChildFailedError``. Without
CUDA on Linux the ranks are forks too (:mod:`.fork_start`); else each is a new
``python -u -m MODULE``. A rank that stops on a config or input error
writes its one-line message into ``$MEGALORA_ERROR_DIR`` instead of printing
it (every rank raises the same error); this process prints it once and exits
with status 2. A rank that crashes prints its own traceback; this process
then adds one line naming it, instead of torchrun's 100-line report.

Run as ``python -m megalora.launcher TORCHRUN_ARGS`` (torchrun's arguments).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

ERROR_DIR_ENV = "MEGALORA_ERROR_DIR"

# Variables through which a launcher tells a process its rank; a child started
# by this CLI must not inherit a parent's.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", ERROR_DIR_ENV)
_LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL")


def under_launcher() -> bool:
    """Whether a launcher (torchrun, Slurm, MPI) started this process."""
    from .launch_env import detect_launch_env

    return detect_launch_env(use_scontrol=False).source != "single"


def launched_rank() -> int:
    """This process's global rank as the launcher says (0 when not launched)."""
    from .launch_env import detect_launch_env

    return detect_launch_env(use_scontrol=False).rank


def child_env() -> dict:
    """This environment without a launcher's rank variables, one thread per rank on CPU."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_PREFIXES)}
    env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores; more threads only contend
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return env


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """torchrun (through this module) starting ``python -m module args`` on ``nproc`` local ranks."""
    return [sys.executable, "-m", "megalora.launcher", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``.

    The CLI drops ``--nproc`` from what its ranks get: they ignore it, and
    torchrun's own parser rejects it as an ambiguous abbreviation of
    ``--nproc-per-node`` (argparse matches prefixes even after the script name).
    """
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def report_rank_error(message: str) -> bool:
    """Under the CLI's launcher, store this rank's one-line error for the parent; True if stored."""
    directory = os.environ.get(ERROR_DIR_ENV)
    if not directory or not os.path.isdir(directory):
        return False
    path = os.path.join(directory, f"rank{launched_rank()}.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(message)
    return True


def print_error(message: str) -> None:
    """A config or input error, once: stored for the CLI's launcher, else printed by rank 0.

    Every rank parses the same config and checks the same inputs, so every
    rank raises the same error; N copies of it (and N tracebacks) would only
    bury it.
    """
    if not report_rank_error(message) and launched_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def quiet_other_ranks() -> None:
    """On ranks other than 0: no import-time warnings and no progress bars, which every rank would repeat.

    Call before megatron-core or transformers is imported. Rank 0 still shows
    them once (megatron-core's "Transformer Engine and Apex are not installed",
    the GGUF conversion's progress bar).
    """
    import warnings

    if not under_launcher() or launched_rank() == 0:
        return
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex)( and Apex)? (is|are) not installed")
    # The rest of megatron's start-up warnings (e.g. TransformerConfig's cuda_graph_scope note): rank 0 shows them.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    os.environ["TQDM_DISABLE"] = "1"  # tqdm reads TQDM_* variables as default arguments
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def launch(nproc: int, module: str, args: Sequence[str], stdout=None) -> int:
    """Runs ``module args`` on ``nproc`` ranks; returns the exit status (errors printed once).

    Args:
        stdout: ``None`` (inherit) or ``subprocess.DEVNULL`` for the ranks' standard output.
    """
    from . import fork_start

    errors = tempfile.mkdtemp(prefix="megalora-errors-")
    env = child_env()
    env[ERROR_DIR_ENV] = errors
    command = torchrun_command(nproc, module, args)
    ranks = None
    if fork_start.can_fork():
        fork_start.preload(module)
        ranks = (module, list(args))
    try:
        if hasattr(os, "fork"):
            return _run_forked(command[3:], env, stdout, ranks)
        return subprocess.call(command, env=env, stdout=stdout)
    finally:
        shutil.rmtree(errors, ignore_errors=True)


def _run_forked(torchrun_args: list[str], env: dict, stdout, ranks: Optional[tuple] = None) -> int:
    """:func:`main` in a forked child with ``env``; its exit status.

    The same process as ``python -m megalora.launcher ARGS``, without a new
    interpreter importing torch again (~2.5 s of CPU per launch). ``ranks``:
    ``(module, args)`` to fork the ranks from it too, else torchrun's agent
    starts them as new processes.
    """
    from .fork_start import fork

    out = None
    if stdout is not None:
        if stdout != subprocess.DEVNULL:
            raise ValueError("launch(stdout=...) takes None or subprocess.DEVNULL")
        out = os.open(os.devnull, os.O_WRONLY)
    try:
        return fork(lambda: main(torchrun_args, ranks), env, stdout=out).wait()
    finally:
        if out is not None:
            os.close(out)


def _rank_errors(directory: Optional[str]) -> list[str]:
    messages = []
    for path in sorted(glob.glob(os.path.join(directory or "", "rank*.txt"))):
        with open(path, encoding="utf-8") as handle:
            text = handle.read().strip()
        if text and text not in messages:
            messages.append(text)
    return messages


def _run_forked_ranks(args, module: str, module_args: list[str]) -> None:
    """``torchrun.run(args)`` with each rank a fork of this process running ``module.main(module_args)``."""
    import uuid

    from torch.distributed import run as torchrun
    from torch.distributed.launcher.api import elastic_launch

    from .fork_start import run_module

    if not args.standalone:
        raise ValueError("forked ranks are started with --standalone only")
    # What torchrun.run does for --standalone; only its entry point differs.
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500
    config, _, _ = torchrun.config_from_args(args)
    config.start_method = "fork"
    elastic_launch(config, run_module)(module, module_args)


def main(argv: Optional[Sequence[str]] = None, ranks: Optional[tuple] = None) -> int:
    """torchrun's launcher; a failed rank is reported in one line, not a ChildFailedError traceback.

    Args:
        argv: torchrun's arguments.
        ranks: ``(module, args)``: the ranks are forks of this process running
            ``module.main(args)`` (:mod:`.fork_start`) instead of the command in ``argv``.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The agent logs every rank's exit code and the SIGTERMs it sends the others;
    # the one line below says what matters.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
        if ranks is None:
            torchrun.run(args)
        else:
            _run_forked_ranks(args, *ranks)
    except ChildFailedError as exc:
        messages = _rank_errors(os.environ.get(ERROR_DIR_ENV))
        for message in messages:
            print(message, file=sys.stderr)
        if messages:
            return 2
        rank, failure = min(exc.failures.items())
        code = failure.exitcode
        how = f"signal {failure.signal_name()}" if code < 0 else f"exit code {code}"
        print(f"megalora: rank {rank} failed ({how}); its output is above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
