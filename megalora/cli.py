"""The ``megalora`` command: train, merge, export, inspect, verify.

Verbs that run a model (``train``, ``merge``, ``export``) start their own
processes with ``torchrun --standalone`` when run from a plain shell and the
layout needs more than one (``parallel.tp x parallel.pp``, times ``--nproc``'s
data parallelism). Under a launcher (torchrun, srun, mpirun) they run in the
launched process, as ``python -m megalora.train`` does. ``verify`` always starts
its own two runs. Set ``MEGALORA_TRACEBACK=1`` to see the traceback of a
config or input error instead of its one-line message.

Everything that can be checked without the model's weights (the config, the
layout against the model's shape, the adapter folder) is checked here, before
any rank starts; a rank that fails anyway is reported in one line. A run whose
output folder already exists overwrites the files it writes there, with a
one-line notice (train.resume=auto continues a run in its folder instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional, Sequence

from .launcher import launch, print_error, quiet_other_ranks, strip_option, under_launcher

TRAIN_EXAMPLES = """examples:
  megalora train configs/smollm2_cpu.yaml                 # the main job: SmolLM2 at TP=3 on CPU
  megalora train configs/tiny_gpt.yaml train.steps=50 lora.r=4
  megalora train configs/tiny_gpt.yaml parallel.tp=1 --nproc 2   # 2-way data parallel
  megalora train configs/tiny_gpt.yaml train.save_every=5 train.resume=auto
  torchrun --nproc_per_node 3 -m megalora.train configs/smollm2_cpu.yaml   # same, launched by hand

Overrides are section.key=value with YAML values, e.g. lora.target_modules=[linear_qkv,linear_fc2].
If job.output_dir exists, its files are overwritten (a one-line notice says so); pass
job.output_dir=runs/NEW for a fresh run, or train.resume=auto to continue from its checkpoints."""

VERIFY_EXAMPLES = """examples:
  megalora verify configs/tiny_gpt.yaml                   # TP=2 vs world size 1, 4 steps
  megalora verify configs/tiny_gpt.yaml parallel.sp=true --steps 6
  megalora verify configs/tiny_gpt.yaml parallel.tp=1 parallel.pp=2 model.num_layers=4
  megalora verify configs/smollm2_cpu.yaml --steps 2      # the real model at TP=3 (minutes)

Both runs train the same steps on the same data with lora_dropout=0 (dropout
masks differ by layout) and plain SGD: AdamW's first steps turn rounding noise in
near-zero gradients into +-lr updates, while SGD's update is linear in the gradient,
and the optimizer is elementwise, so it cannot depend on the layout. Compared: the
initial adapters (bit-identical), each step's loss and grad norm, each step's
gathered gradients (per tensor, relative to its norm) and the trained adapters
(per tensor, relative to the update). The exit status is 1 when one exceeds its tolerance.
On CPU the two runs start together (the world-size-1 run writes WORKDIR/single.log)."""

MERGE_EXAMPLES = """examples:
  megalora merge configs/smollm2_cpu.yaml --adapter runs/smollm2_cpu/adapter --output runs/merged
  megalora merge configs/smollm2_cpu.yaml parallel.tp=1 --adapter runs/smollm2_cpu/adapter --output runs/merged
  megalora merge configs/tiny_gpt.yaml --adapter runs/tiny_gpt/adapter --output runs/tiny_merged

An HF base is written as an HF model folder with its tokenizer and generation config:
AutoModelForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR) load it
alone. A random GPT is written as model.safetensors of full megatron tensors with global
names. The merge runs at the config's layout (override parallel.*); the output holds full
tensors, so it loads at any layout. An existing --output folder is overwritten (with a notice)."""

EXPORT_EXAMPLES = """examples:
  megalora export configs/smollm2_cpu.yaml --adapter runs/smollm2_cpu/adapter --output runs/hf_peft
  megalora export configs/smollm2_cpu.yaml --adapter runs/smollm2_cpu/adapter --output runs/hf_merged --format hf

--format peft writes PEFT's adapter_config.json + adapter_model.safetensors, and the base
model as an HF folder in DIR/base (the GGUF base is dequantized there; an HF-folder base is
referred to, not copied): adapter_config.json's base_model_name_or_path points at it, so
peft.AutoPeftModelForCausalLM.from_pretrained(DIR) loads base + adapter alone.
--format hf is another name for `megalora merge` (the same files: merged HF weights,
tokenizer and generation config)."""

GENERATE_EXAMPLES = """examples:
  megalora generate configs/smollm2_cpu.yaml --adapter runs/smollm2_cpu/adapter "What is 25 plus 11?"
  megalora generate configs/tiny_gpt.yaml --adapter runs/tiny_gpt/adapter "What is 2 plus 3?" --max-new-tokens 8

Greedy decoding with the base model and the adapter at the config's layout (override
parallel.*); the prompt is wrapped as in training (ChatML for SmolLM2)."""

INSPECT_EXAMPLES = """examples:
  megalora inspect runs/smollm2_cpu/adapter
  megalora inspect runs/smollm2_cpu/adapter --all
  megalora inspect runs/tiny_gpt/adapter --json"""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML job config (see configs/)")
    p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                   help="config overrides, e.g. train.steps=20 lora.r=8 parallel.tp=1")


def _nproc_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=None,
                   help="processes to start (default: parallel.tp x parallel.pp, i.e. no data parallelism); "
                        "ignored under a launcher")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="megalora", formatter_class=fmt, description=__doc__)
    parser.add_argument("--version", action="version", version=f"megalora {_version()}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("train", help="fine-tune LoRA as a config says", formatter_class=fmt, epilog=TRAIN_EXAMPLES,
                       description="Train LoRA on megatron-core: base eval, fine-tune, answer a prompt, save, "
                                   "merge check, HF PEFT export, loss curve (see megalora/training/job.py).")
    _config_args(p)
    _nproc_arg(p)

    p = sub.add_parser("verify", help="compare the config's layout with world size 1", formatter_class=fmt,
                       epilog=VERIFY_EXAMPLES,
                       description="Run the config at its layout and at world size 1 for a few steps, from the "
                                   "same weights and data, and report the largest loss and weight differences.")
    _config_args(p)
    _nproc_arg(p)
    p.add_argument("--steps", type=int, default=4, help="training steps in each run (default 4)")
    p.add_argument("--loss-tol", type=float, default=None,
                   help="largest allowed relative difference of a step's loss or grad norm (default 1e-4)")
    p.add_argument("--grad-tol", type=float, default=None,
                   help="largest allowed ||g - g_ref|| / ||g_ref|| of a LoRA tensor's gradient at any step "
                        "(default 1e-3)")
    p.add_argument("--weight-tol", type=float, default=None,
                   help="largest allowed ||W - W_ref|| / ||W_ref - W_0|| of a trained LoRA tensor, beyond fp32 "
                        "rounding (default 1e-3)")
    p.add_argument("--workdir", default=None, help="where the two runs write (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    for name, helptext, epilog in (("merge", "merge an adapter into the base weights", MERGE_EXAMPLES),
                                   ("export", "export an adapter for HF PEFT, or merged HF weights", EXPORT_EXAMPLES)):
        p = sub.add_parser(name, help=helptext, formatter_class=fmt, epilog=epilog, description=helptext + ".")
        _config_args(p)
        _nproc_arg(p)
        p.add_argument("--adapter", required=True, help="a saved adapter folder (adapter_config.json + safetensors)")
        p.add_argument("--output", required=True, help="the folder to write")
        if name == "export":
            p.add_argument("--format", choices=("peft", "hf"), default="peft",
                           help="peft: an HF PEFT adapter (default); hf: merged HF model weights")

    p = sub.add_parser("generate", help="answer a prompt with a trained adapter (greedy)", formatter_class=fmt,
                       epilog=GENERATE_EXAMPLES,
                       description="Load the config's base model with a saved adapter and answer a prompt.")
    _config_args(p)
    _nproc_arg(p)
    p.add_argument("--adapter", required=True, help="a saved adapter folder (adapter_config.json + safetensors)")
    p.add_argument("prompt", help="the question to answer (quote it)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: job.max_new_tokens of the config")

    p = sub.add_parser("inspect", help="show an adapter's modules, ranks, sizes and source layout",
                       formatter_class=fmt, epilog=INSPECT_EXAMPLES,
                       description="Read a saved adapter (no model, no processes): its modules, ranks, shapes, "
                                   "sizes, LoRA settings and the layout it was saved from.")
    p.add_argument("adapter_dir")
    p.add_argument("--all", action="store_true", help="list every module")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


# ---------------------------------------------------------------------- launching


def _nproc(cfg, requested: Optional[int]) -> int:
    nproc = requested or cfg.min_world_size()
    if nproc % cfg.min_world_size():
        raise ValueError(f"--nproc {nproc} is not a multiple of {cfg.min_world_size()} (parallel.tp x parallel.pp, "
                         "and parallel.ep x expert-TP x parallel.pp); pass a multiple (the rest is data parallelism)")
    return nproc


def _version() -> str:
    from . import __version__

    return __version__


def _notice_existing(verb: str, directory: str, what: str, hint: str) -> None:
    if os.path.isdir(directory) and os.listdir(directory):
        print(f"megalora {verb}: note: {what} {directory} already exists; the files this run writes there are "
              f"overwritten{hint}", file=sys.stderr, flush=True)


def _precheck(args, cfg) -> None:
    """What the parent can check before starting ranks: the model's shape, the adapter, the output folder."""
    from .training.models import check_model_fits
    from .training.tools import check_adapter_dir

    if getattr(args, "adapter", None) is not None:
        check_adapter_dir(args.adapter)
    check_model_fits(cfg)
    if args.verb == "train":
        if not cfg.train.resume:
            _notice_existing("train", cfg.job.output_dir, "job.output_dir",
                             " (job.output_dir=... for a new run, train.resume=auto to continue this one)")
    elif getattr(args, "output", None):
        _notice_existing(args.verb, args.output, "--output", "")


def _run_here_or_launch(args, argv: Sequence[str], body, precheck=None) -> int:
    """Runs ``body(cfg)`` in this process when launched or single; else re-runs the CLI under torchrun."""
    from .training import load

    cfg = load(args.config, args.overrides)  # config errors surface here, before any process starts
    if precheck is not None:
        precheck(cfg)
    nproc = _nproc(cfg, args.nproc)
    if under_launcher():
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        body(cfg)
        return 0
    from .training.checks import check_batch_sizes

    check_batch_sizes(cfg, nproc)  # batch sizes against the data parallelism --nproc implies
    _precheck(args, cfg)
    if nproc == 1:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        body(cfg)
        return 0
    return launch(nproc, "megalora.cli", strip_option(argv, "--nproc"))


def _rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


# ---------------------------------------------------------------------- verbs


def _train(args, argv) -> int:
    from .training import run

    return _run_here_or_launch(args, argv, run)


def _merge(args, argv) -> int:
    from .training.tools import describe_output, merge_job

    def body(cfg):
        merge_job(cfg, args.adapter, args.output)
        if _rank0():
            print(describe_output(cfg, "merge", args.output), flush=True)

    return _run_here_or_launch(args, argv, body)


def _export(args, argv) -> int:
    from .training.tools import check_export, describe_output, export_job

    def body(cfg):
        export_job(cfg, args.adapter, args.output, args.format)
        if _rank0():
            print(describe_output(cfg, "merge" if args.format == "hf" else "export", args.output), flush=True)

    return _run_here_or_launch(args, argv, body, precheck=check_export)


def _generate(args, argv) -> int:
    from .training.tools import generate_job

    def body(cfg):
        answer = generate_job(cfg, args.adapter, args.prompt, args.max_new_tokens)
        if _rank0():
            print(answer, flush=True)
            if not answer:
                print("megalora generate: note: the answer is empty (the model ended it, or wrote only "
                      "whitespace, at once)", file=sys.stderr, flush=True)

    return _run_here_or_launch(args, argv, body)


def _inspect(args, _argv) -> int:
    from .training.inspect import format_inspect, inspect_adapter

    info = inspect_adapter(args.adapter_dir)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(format_inspect(info, max_modules=10**9 if args.all else 12))
    return 0


def _verify(args, _argv) -> int:
    from .training import load
    from .training.checks import check_batch_sizes
    from .training.models import check_model_fits
    from .training.verify import compare_runs, format_verify
    from .training.verify_runs import SINGLE_OVERRIDES, VERIFY_OVERRIDES, run_both

    if under_launcher():
        raise SystemExit("megalora verify starts its own processes; run it from a shell, not under a launcher")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: pass an integer >= 1")
    common = [*args.overrides, *VERIFY_OVERRIDES, f"train.steps={args.steps}"]
    # Both runs' configs are checked here, so that no rank starts for an error the parent can see.
    cfg = load(args.config, common)
    load(args.config, [*common, *SINGLE_OVERRIDES])
    nproc = _nproc(cfg, args.nproc)
    check_batch_sizes(cfg, nproc)
    check_model_fits(cfg)
    work = args.workdir or tempfile.mkdtemp(prefix="megalora-verify-")
    code = run_both(args.config, common, nproc, work, quiet=args.json)
    if code:
        return code
    # Unset tolerances keep compare_runs' defaults (justified in training/verify.py).
    tols = {f"{k}_tol": getattr(args, f"{k}_tol") for k in ("loss", "grad", "weight")
            if getattr(args, f"{k}_tol") is not None}
    report = compare_runs(f"{work}/layout", f"{work}/single", **tols)
    report["workdir"] = work
    print(json.dumps(report, indent=1) if args.json else format_verify(report, args.config))
    return 0 if report["ok"] else 1


VERBS = {"train": _train, "verify": _verify, "merge": _merge, "export": _export, "generate": _generate,
         "inspect": _inspect}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``megalora`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_other_ranks()
    parser = build_parser()
    if argv and argv[0] in VERBS:
        # Intermixed, so options may follow the overrides: `train CFG train.steps=5 --nproc 2`.
        sub = parser._subparsers._group_actions[0].choices[argv[0]]
        args = sub.parse_intermixed_args(argv[1:])
        args.verb = argv[0]
    else:
        args = parser.parse_args(argv)
    from .parallel_start import shutdown_distributed

    try:
        return VERBS[args.verb](args, argv)
    except (ValueError, FileNotFoundError) as exc:
        # Config and input errors carry their fix; a traceback would only bury it.
        if os.environ.get("MEGALORA_TRACEBACK"):
            raise
        print_error(f"megalora {args.verb}: error: {exc}")  # under the CLI's launcher, the parent prints it
        return 2
    except BrokenPipeError:
        # `megalora inspect ... | head`: the reader left; Python would complain at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        shutdown_distributed()  # a verb run in this process (launched, or one process) started them


if __name__ == "__main__":
    sys.exit(main())
