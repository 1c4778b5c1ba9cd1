"""Every example the CLI's ``--help`` and the READMEs print, run as a user would.

The examples run in a scratch folder (``configs/`` and ``launch/`` linked in),
so their ``runs/...`` paths land there; train examples get :data:`FAST`
appended (later overrides win): fewer steps and examples, nothing else
changed. verify examples report JSON, which is asserted here.

Each config's first ``train`` example, the ``--nproc`` one and every
``verify`` run from a shell, as typed: the CLI checks in its own process and
starts its ranks through torchrun. The others (:data:`IN_RANKS`: more
trains, merge, export, generate) run the way ``torchrun --nproc_per_node N -m
megalora.cli ...`` runs them, the verb inside each launched rank, here the
suite's warm rank pool: the same verb code at the same world size, without
seconds of interpreter start-up per rank. ``inspect`` starts no rank; it
runs in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megalora.launcher import child_env
from tests import cli_examples as EX
from tests.cli.test_cli import ROOT, TINY, _verify_report


FAST = ["train.steps=4", "data.num_train=32", "data.num_eval=8", "train.eval_every=0", "train.log_every=0",
        "job.max_new_tokens=4", "job.plot=false"]
# One step of 4 examples: the job's every phase still runs (base eval, answer, save, HF PEFT export, merge
# check); a SmolLM2 forward of 16 sequences costs ~3 s on 2 cores, so every batch is 4.
SMOL_FAST = ["train.steps=1", "data.num_train=4", "data.num_eval=4", "train.micro_batch_size=4",
             "train.global_batch_size=4", "train.eval_micro_batch_size=4", "train.eval_every=0",
             "job.max_new_tokens=2", "job.plot=false"]
# verify examples run 2 steps (their report is asserted, see _assert_verified).
VERIFY_FAST = ["--steps", "2", "--json"]


def test_every_example_is_exercised():
    """Each printed example is of a kind this suite runs; the ones not run as printed pass the parent's checks."""
    from megalora.training import load
    from megalora.training.checks import check_batch_sizes

    unknown = [(where, cmd) for where, cmd in EX.all_examples() if not EX.kind(cmd)]
    assert not unknown, f"examples no test exercises (teach tests/cli_examples.kind about them): {unknown}"
    for where, cmd in EX.all_examples():
        if EX.kind(cmd) in ("megalora", "torchrun", "torchrun.sh", "mpirun.sh", "sbatch"):
            config, overrides = EX.config_and_overrides(cmd) if "configs/" in cmd else (None, [])
            if config:
                cfg = load(config, overrides)
                if EX.kind(cmd) == "mpirun.sh":  # NP=16 and friends: the layout fits the world they ask for
                    check_batch_sizes(cfg, int(cmd.split()[0].split("=")[1]))
        if EX.kind(cmd) == "megatron-lm-test":  # the file it names is part of the suite
            assert os.path.isfile(os.path.join(ROOT, cmd.split()[-1])), (where, cmd)
    assert any("--nproc" in cmd for _, cmd in EX.all_examples())


def _scratch(tmp_path):
    for name in ("configs", "launch"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    return tmp_path


def _argv(cmd: str, fast: list[str]) -> list[str]:
    import shlex

    words = shlex.split(cmd.replace("bash launch/setup.sh && ", ""))
    verb = words[1] if words[0].endswith("megalora") else "train"
    if words[0].endswith("megalora"):
        words = [sys.executable, "-m", "megalora.cli", *words[1:]]
    elif words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    elif words[0] == "launch/torchrun.sh":
        words = ["bash", *words]
    extra = fast if verb in ("train", "verify") else []
    if verb == "generate" and "--max-new-tokens" not in words:  # each new token is a forward pass
        extra = ["--max-new-tokens", "2"]
    if verb == "verify":
        extra = [*extra, *VERIFY_FAST]
    return [*words, *extra]


def _run_examples(tmp_path, commands, fast) -> dict:
    env = child_env()
    env.update(PYTHONPATH=ROOT, PYTHON=sys.executable)
    out, trained = {}, set()
    for cmd in commands:
        argv = _argv(cmd, fast)
        where = _in_ranks(cmd, trained)
        if where == "here":
            proc = _cli_here(argv[3:], str(tmp_path))
        elif where:
            proc = _cli_in_ranks(argv[3:], str(tmp_path), where)
        else:
            proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        out[cmd] = proc
        if " train " in cmd:
            trained.add(EX.config_and_overrides(cmd)[0])
    return out


IN_RANKS = ("train", "merge", "export", "generate")


def _in_ranks(cmd: str, trained: set):
    """Where an example runs: ``None`` from a shell, ``"here"`` (inspect), else the world size of its ranks."""
    from megalora.training import load

    words = cmd.split()
    if words[0] != "megalora":
        return None
    verb = words[1]
    if verb == "inspect":
        return "here"
    if verb not in IN_RANKS or "--nproc" in words:
        return None
    config, overrides = EX.config_and_overrides(cmd)
    if verb == "train" and config not in trained:
        return None  # the config's first train: the whole launch path, the output-folder notice on later ones
    return load(config, overrides).min_world_size()


def _cli_here(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    import contextlib
    import io

    from megalora.cli import main

    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _cli_in_ranks(argv: list[str], cwd: str, world: int) -> subprocess.CompletedProcess:
    from tests.multirank import run_on_ranks

    code, out, err = run_on_ranks(world, _cli_rank, argv, cwd, timeout_s=900)[0]
    return subprocess.CompletedProcess(argv, code, out, err)


def _cli_rank(argv: list[str], cwd: str):
    """``megalora ARGV`` in a launched rank: torchrun's variables make the CLI run the verb in this process.

    The pool's default process group is the launched world (``init_distributed`` keeps it); the pool
    puts back the environment and the working directory after the task.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    proc = _cli_here(argv, cwd)
    return proc.returncode, proc.stdout, proc.stderr


def _examples_of(config: str) -> list[str]:
    seen = []
    for _, cmd in EX.all_examples():
        cmd = cmd.replace(".venv/bin/megalora", "megalora").replace("bash launch/setup.sh && ", "")
        # inspect examples name no config, only the run folder it writes (runs/tiny_gpt/adapter).
        mine = config in cmd or f"runs/{os.path.basename(config)[:-len('.yaml')]}/" in cmd
        if mine and EX.kind(cmd) in ("megalora", "torchrun", "torchrun.sh") and cmd not in seen:
            seen.append(cmd)
    # Train first: the other verbs read its adapter.
    return sorted(seen, key=lambda c: 0 if (" train " in c or "megalora.train" in c or "torchrun.sh" in c) else 1)


def test_tiny_gpt_examples(tmp_path):
    """Every tiny-GPT example, as printed plus FAST: what train, verify, merge and generate report and write."""
    from safetensors.torch import load_file

    from megalora.checkpoint import read_adapter_tensors
    from megalora.training import load
    from megalora.training.models import _init_value

    work = _scratch(tmp_path)
    commands = _examples_of("configs/tiny_gpt.yaml")
    assert any("--nproc 2" in c for c in commands) and any(" generate " in c for c in commands)
    procs = _run_examples(work, commands, FAST)
    with open(work / "runs/tiny_gpt/summary.json") as handle:
        summary = json.load(handle)
    assert summary["launcher"] == "torchrun" and summary["final_eval_loss"] < summary["base_eval_loss"]
    # The re-runs into runs/tiny_gpt said they overwrite it.
    assert any("already exists" in p.stderr for c, p in procs.items() if " train " in c)

    # Each verify example passes, at the layout it names (TP=2+SP, PP=2 with 4 layers, TP=2).
    verified = {c: _verify_report(p) for c, p in procs.items() if " verify " in c}
    assert len(verified) == 3
    for command, report in verified.items():
        _, overrides = EX.config_and_overrides(command)
        cfg = load(TINY, overrides)
        _assert_verified(report, steps=2, tensors=8 * cfg.model.num_layers)
        layout = report["layout"]
        assert (layout["tp"], layout["pp"], layout["sp"]) == (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.sp)
    assert any(r["layout"]["sp"] for r in verified.values()) and any(r["layout"]["pp"] == 2 for r in verified.values())

    merge = next(p for c, p in procs.items() if " merge " in c)
    assert "wrote the merged weights" in merge.stdout and str(work / "runs/tiny_merged") in merge.stdout
    merged = load_file(str(work / "runs/tiny_merged/model.safetensors"))
    assert oct(os.stat(work / "runs/tiny_merged/model.safetensors").st_mode & 0o777) == "0o644"
    lora = read_adapter_tensors(str(work / "runs/tiny_gpt/adapter"))
    cfg = load(TINY)
    name = "decoder.layers.1.self_attention.linear_qkv"
    a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
    base = _init_value(f"{name}.weight", list(merged[f"{name}.weight"].shape), cfg)
    # Exact up to fp32 rounding of one matmul and add.
    torch.testing.assert_close(merged[f"{name}.weight"], base + (cfg.lora["lora_alpha"] / cfg.lora["r"]) * (b @ a),
                               rtol=1e-5, atol=1e-6)
    # A 4-step random GPT may answer with whitespace; then generate says so.
    generate = next(p for c, p in procs.items() if " generate " in c)
    assert generate.stdout.strip() or "the answer is empty" in generate.stderr, generate.stderr[-2000:]
    inspect = json.loads(next(p for c, p in procs.items() if " inspect " in c).stdout)
    assert inspect["num_modules"] == 8 and inspect["layout"]["tensor_model_parallel_size"] == 2


# SmolLM2 examples that start a job another example runs too, in another launch form; the form runs at tiny
# size in tests/cli/test_launch_scripts.py (launch/torchrun.sh execs `torchrun ... -m megalora.train`). Here: their
# config at the world size they start. `merge` at TP=3 is `export --format hf` (the same merge_job) at
# TP=3, and `merge` at TP=1: both of those run, and their weights are compared.
SMOL_SAME_JOB = ("torchrun --nproc_per_node 3 -m megalora.train configs/smollm2_cpu.yaml",
                 "launch/torchrun.sh configs/smollm2_cpu.yaml",
                 "megalora merge configs/smollm2_cpu.yaml --adapter runs/smollm2_cpu/adapter --output runs/merged")


@pytest.mark.slow
def test_smollm2_examples(tmp_path):
    """Every SmolLM2 example (train with SMOL_FAST), its outputs standing alone, and a layout that cannot fit."""
    from safetensors.torch import load_file

    from megalora.training import load
    from megalora.training.checks import check_batch_sizes

    work = _scratch(tmp_path)
    # Rejected in this process, before any rank starts (9 heads, TP=5).
    proc = subprocess.run([sys.executable, "-m", "megalora.cli", "train", "configs/smollm2_cpu.yaml", "parallel.tp=5"],
                          cwd=work, env=dict(child_env(), PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "num_attention_heads=9 is not divisible" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "rank" not in proc.stderr.lower()

    commands = _examples_of("configs/smollm2_cpu.yaml")
    assert set(SMOL_SAME_JOB) <= set(commands), sorted(set(SMOL_SAME_JOB) - set(commands))
    for command in SMOL_SAME_JOB:
        config, overrides = EX.config_and_overrides(command)
        check_batch_sizes(load(config, overrides), 3)
    procs = _run_examples(work, [c for c in commands if c not in SMOL_SAME_JOB], SMOL_FAST)

    report = _verify_report(next(p for c, p in procs.items() if " verify " in c))
    _assert_verified(report, steps=2, tensors=8 * 30, grad_rounding=2e-5)
    assert report["layout"]["tp"] == 3

    # `megalora train`'s own HF PEFT export points at a base that loads.
    with open(work / "runs/smollm2_cpu/hf_peft_adapter/adapter_config.json") as handle:
        base = json.load(handle)["base_model_name_or_path"]
    assert base == str(work / "runs/smollm2_cpu/hf_peft_adapter/base")
    assert os.path.isfile(os.path.join(base, "config.json"))

    merged = work / "runs/hf_merged"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert os.path.isfile(merged / "generation_config.json") and model.config.model_type == "llama"
    assert len(tokenizer("What is 25 plus 11?")["input_ids"]) > 3
    for name in os.listdir(merged):
        assert os.stat(merged / name).st_mode & 0o777 == 0o644, name
    del model
    # The merge at TP=1 (`merge ... parallel.tp=1`) and at TP=3 (`export --format hf`) write the same weights:
    # each merged element is the same sum over r, on a shard or on the full tensor.
    tp1, tp3 = load_file(str(work / "runs/merged/model.safetensors")), load_file(str(merged / "model.safetensors"))
    assert tp1.keys() == tp3.keys()
    for key in tp1:
        torch.testing.assert_close(tp1[key], tp3[key], rtol=1e-6, atol=1e-7, msg=key)

    export = next(p for c, p in procs.items() if " export " in c and "--format hf" not in c)
    assert "AutoPeftModelForCausalLM" in export.stdout
    from peft import AutoPeftModelForCausalLM

    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(work / "runs/hf_peft"))
    assert peft_model.peft_config["default"].base_model_name_or_path == str(work / "runs/hf_peft/base")
    generate = next(p for c, p in procs.items() if " generate " in c)
    assert generate.stdout.strip()
    # 30 layers x 4 targets; --all lists each.
    inspect = {"--all" in c: p.stdout for c, p in procs.items() if " inspect " in c}
    assert "120 modules, ranks [16]" in inspect[False] and "--all lists every module" in inspect[False]
    assert sum("decoder.layers." in line for line in inspect[True].splitlines()) == 120


def _assert_verified(report: dict, steps: int, tensors: int, grad_rounding: float = 1e-5) -> None:
    assert report["ok"] and not report["failures"] and report["reference"]["world_size"] == 1, report["failures"]
    assert report["steps"] == steps and report["grad_steps"] == steps
    # Far inside the tolerances: what the layouts leave different is rounding
    # (measured: tiny GPT <= 5e-7, SmolLM2 at TP=3 <= 4e-6; see training/tools.py).
    assert report["init_max_diff"] == 0.0 and report["init_tensors"] == report["tensors_compared"] == tensors
    assert report["max_loss_rel_diff"] < 1e-5 and report["max_grad_rel_diff"] < grad_rounding
    assert report["max_update_rel_diff"] < 1e-4
