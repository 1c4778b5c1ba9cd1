"""The ``megalora`` command: help, errors, counts, and every example ``--help`` and the READMEs print.

The model-running verbs are started as a user would, in fresh processes: the
console script self-launches torchrun at the config's layout. The examples
run in a scratch folder (``configs/`` and ``launch/`` linked in), so their
``runs/...`` paths land there; train examples get :data:`FAST` appended (later
overrides win): fewer steps and examples, nothing else changed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from megalora.cli import child_env, main
from tests import cli_examples as EX

TINY = "configs/tiny_gpt.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["train.steps=6", "train.eval_every=3", "train.log_every=0", "data.num_train=64", "data.num_eval=16"]


def _cli(*args: str, timeout: int = 600, env: dict | None = None, code: int | None = 0) -> subprocess.CompletedProcess:
    script = os.path.join(os.path.dirname(sys.executable), "megalora")
    cmd = [script] if os.path.isfile(script) else [sys.executable, "-m", "megalora.cli"]
    # Its own session, so that a timeout ends torchrun's ranks too, not only the CLI.
    child = subprocess.Popen([*cmd, *args], cwd=ROOT, env=env or child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
    proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    assert code is None or proc.returncode == code, f"megalora {' '.join(args)} exited {proc.returncode}, not {code}:\n" \
                                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _verify_report(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.parametrize("verb", ["train", "verify", "merge", "export", "generate", "inspect"])
def test_every_verb_has_help_with_examples(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"megalora {verb}" in text


def test_top_level_help_lists_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(v in text for v in ("train", "verify", "merge", "export", "inspect"))


def test_config_errors_stop_before_any_process_starts(capsys, tmp_path):
    assert main(["train", TINY, "train.stepz=3"]) == 2
    assert "train.stepz is not a known key" in capsys.readouterr().err
    assert main(["merge", TINY, "parallel.tp=3", "--adapter", str(tmp_path), "--output", str(tmp_path)]) == 2
    assert "parallel.tp=3" in capsys.readouterr().err
    assert main(["export", TINY, "--adapter", str(tmp_path), "--output", str(tmp_path)]) == 2
    assert "model.source: hf" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "adapter_model.safetensors" in capsys.readouterr().err


def test_version(capsys):
    from megalora import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"megalora {__version__}"


def test_lora_typo_is_a_one_line_error(capsys, tmp_path):
    assert main(["train", TINY, "lora.rr=4"]) == 2
    err = capsys.readouterr().err
    assert "lora.rr is not a known key" in err and "lora_alpha" in err and len(err.strip().splitlines()) == 1
    config = tmp_path / "typo.yaml"
    config.write_text("lora:\n  r: 4\n  lora_alpah: 8\n")
    assert main(["train", str(config)]) == 2
    assert "did you mean lora.lora_alpha?" in capsys.readouterr().err


def test_missing_adapter_is_checked_before_launching(capsys, tmp_path):
    # TP=2: the old CLI started two ranks, each printing the error, then torchrun's traceback.
    for verb in ("merge", "generate"):
        extra = ["hi"] if verb == "generate" else ["--output", str(tmp_path / "out")]
        assert main([verb, TINY, "--adapter", str(tmp_path / "nope"), *extra]) == 2
        err = capsys.readouterr().err
        assert f"--adapter '{tmp_path / 'nope'}' does not exist" in err and len(err.strip().splitlines()) == 1


def test_child_argv_drops_nproc():
    from megalora.launcher import strip_option

    argv = ["train", TINY, "parallel.tp=1", "--nproc", "2", "--nproc=4", "train.steps=3"]
    assert strip_option(argv, "--nproc") == ["train", TINY, "parallel.tp=1", "train.steps=3"]


def test_rank_error_is_printed_once(tmp_path):
    """An error only the ranks see (here: a prompt longer than data.seq_length) comes back as one line."""
    proc = _cli("train", TINY, "data.seq_length=8", "train.steps=1", f"job.output_dir={tmp_path}", code=None)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("megalora train: error:"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def _fake_adapter(directory, layers: int) -> None:
    from safetensors.torch import save_file

    directory.mkdir()
    state = {f"base_model.model.decoder.layers.{i}.mlp.linear_fc{k}.lora_{ab}.weight": torch.zeros(1, 1)
             for i in range(layers) for k in (1, 2) for ab in "AB"}
    save_file(state, str(directory / "adapter_model.safetensors"))


def test_inspect_sorts_layers_naturally(tmp_path, capsys):
    _fake_adapter(tmp_path / "a", 12)
    assert main(["inspect", str(tmp_path / "a"), "--all"]) == 0
    layers = [int(line.split("layers.")[1].split(".")[0]) for line in capsys.readouterr().out.splitlines()
              if "decoder.layers." in line]
    assert layers == sorted(layers) and layers[-1] == 11


def test_inspect_into_head_has_no_traceback(tmp_path):
    _fake_adapter(tmp_path / "a", 3000)  # more output than a pipe buffers, so the write meets the closed pipe
    proc = subprocess.run(f"{sys.executable} -m megalora.cli inspect {tmp_path / 'a'} --all | head -2", shell=True,
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert len(proc.stdout.splitlines()) == 2 and proc.stderr == "", proc.stderr[-2000:]


# ---------------------------------------------------------------------- trainable counts


def _counts_body(tp: int, pp: int):
    import contextlib
    import io

    import megalora
    from megalora.training import load
    from megalora.training.models import build_chunks

    megalora.init_parallel(tp, pp)
    cfg = load(TINY, [f"parallel.tp={tp}", f"parallel.pp={pp}"])
    model = megalora.get_peft_model(build_chunks(cfg, 258)[0], cfg.lora_config())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    return model.get_nb_trainable_parameters(), out.getvalue()


def test_trainable_counts_are_global_at_every_layout():
    from tests.multirank import run_on_ranks

    # The tiny GPT's LoRA, r=8, per layer: qkv 8*64 + 192*8, proj 8*64 + 64*8,
    # gated fc1 8*64 + 256*8, fc2 8*128 + 64*8; two layers.
    expected = 2 * ((8 * 64 + 192 * 8) + (8 * 64 + 64 * 8) + (8 * 64 + 256 * 8) + (8 * 128 + 64 * 8))
    results = {layout: run_on_ranks(world, _counts_body, *layout)
               for world, layout in ((1, (1, 1)), (2, (2, 1)), (2, (1, 2)))}
    reference = results[(1, 1)][0][0]
    assert reference[0] == expected
    for layout, per_rank in results.items():
        assert all(counts == reference for counts, _ in per_rank), (layout, per_rank)
        printed = [text for _, text in per_rank if text]
        assert len(printed) == 1 and f"trainable params: {expected:,d}" in printed[0], (layout, per_rank)


# ---------------------------------------------------------------------- the examples


FAST = ["train.steps=5", "data.num_train=48", "data.num_eval=8", "train.eval_every=0", "train.log_every=0",
        "job.max_new_tokens=4", "job.plot=false"]
SMOL_FAST = ["train.steps=2", "data.num_train=32", "data.num_eval=16", "train.eval_every=0", "job.max_new_tokens=4",
             "job.plot=false"]


def test_every_example_is_exercised():
    """Each printed example is of a kind this suite runs; the ones not run as printed pass the parent's checks."""
    from megalora.training import load
    from megalora.training.config import check_batch_sizes

    unknown = [(where, cmd) for where, cmd in EX.all_examples() if not EX.kind(cmd)]
    assert not unknown, f"examples no test exercises (teach tests/cli_examples.kind about them): {unknown}"
    for where, cmd in EX.all_examples():
        if EX.kind(cmd) in ("megalora", "torchrun", "torchrun.sh", "mpirun.sh", "sbatch"):
            config, overrides = EX.config_and_overrides(cmd) if "configs/" in cmd else (None, [])
            if config:
                cfg = load(config, overrides)
                if EX.kind(cmd) == "mpirun.sh":  # NP=16 and friends: the layout fits the world they ask for
                    check_batch_sizes(cfg, int(cmd.split()[0].split("=")[1]))
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
    if verb == "verify":
        extra = [*extra, "--steps", "2"]
    return [*words, *extra]


def _run_examples(tmp_path, commands, fast) -> dict:
    env = child_env()
    env.update(PYTHONPATH=ROOT, PYTHON=sys.executable)
    out = {}
    for cmd in commands:
        proc = subprocess.run(_argv(cmd, fast), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        out[cmd] = proc
    return out


def _examples_of(config: str) -> list[str]:
    seen = []
    for _, cmd in EX.all_examples():
        cmd = cmd.replace(".venv/bin/megalora", "megalora").replace("bash launch/setup.sh && ", "")
        if config in cmd and EX.kind(cmd) in ("megalora", "torchrun", "torchrun.sh") and cmd not in seen:
            seen.append(cmd)
    # Train first: the other verbs read its adapter.
    return sorted(seen, key=lambda c: 0 if (" train " in c or "megalora.train" in c or "torchrun.sh" in c) else 1)


def test_tiny_gpt_examples(tmp_path):
    """Every tiny-GPT example, as printed plus FAST; checks the merged weights' math and what merge says."""
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
    generate = next(p for c, p in procs.items() if " generate " in c)
    assert generate.stdout.strip() != "" or generate.returncode == 0


@pytest.mark.slow
def test_smollm2_examples(tmp_path):
    """Every SmolLM2 example (train with SMOL_FAST), its outputs standing alone, and a layout that cannot fit."""
    work = _scratch(tmp_path)
    # Rejected in this process, before any rank starts (9 heads, TP=5).
    proc = subprocess.run([sys.executable, "-m", "megalora.cli", "train", "configs/smollm2_cpu.yaml", "parallel.tp=5"],
                          cwd=work, env=dict(child_env(), PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "num_attention_heads=9 is not divisible" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "rank" not in proc.stderr.lower()

    commands = _examples_of("configs/smollm2_cpu.yaml")
    procs = _run_examples(work, commands, SMOL_FAST)
    merged = work / "runs/hf_merged"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert os.path.isfile(merged / "generation_config.json") and model.config.model_type == "llama"
    assert len(tokenizer("What is 25 plus 11?")["input_ids"]) > 3
    for name in os.listdir(merged):
        assert os.stat(merged / name).st_mode & 0o777 == 0o644, name
    export = next(p for c, p in procs.items() if " export " in c and "--format hf" not in c)
    assert "AutoPeftModelForCausalLM" in export.stdout
    from peft import AutoPeftModelForCausalLM

    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(work / "runs/hf_peft"))
    assert peft_model.peft_config["default"].base_model_name_or_path == str(work / "runs/hf_peft/base")
    generate = next(p for c, p in procs.items() if " generate " in c)
    assert generate.stdout.strip()


def _assert_verified(report: dict, steps: int) -> None:
    assert report["ok"] and not report["failures"] and report["reference"]["world_size"] == 1, report["failures"]
    assert report["steps"] == steps and report["grad_steps"] == steps
    # Far inside the tolerances: what the layouts leave different is rounding.
    assert report["init_max_diff"] == 0.0 and report["init_tensors"] == report["tensors_compared"] == 16
    assert report["max_loss_rel_diff"] < 1e-5 and report["max_grad_rel_diff"] < 1e-5
    assert report["max_update_rel_diff"] < 1e-4


def test_verify_passes_with_sequence_parallelism(tmp_path):
    report = _verify_report(_cli("verify", TINY, "parallel.sp=true", "--steps", "2", "--json",
                                 "--workdir", str(tmp_path / "verify")))
    _assert_verified(report, steps=2)
    assert report["layout"]["sp"] and report["layout"]["tp"] == 2


# Bugs planted in every process the CLI starts (through sitecustomize, which
# Python imports at start-up): each is patched into its module right after
# that module is first imported. At world size 1 neither changes anything, so
# only the TP=2 run is broken.
_SITECUSTOMIZE = """
import importlib.util, sys

BUG = {bug!r}


def _patch(module):
    if BUG == "gate-up-split" and module.__name__ == "megalora.layers.parallel":
        # B of the gated linear_fc1 split as one block: rank k's rows are no
        # longer [gate_k; up_k] like its base weight's.
        cls = module.LoraColumnParallelLinear
        init = cls.__init__
        cls.__init__ = lambda self, base_layer, out_chunks=1: init(self, base_layer, 1)
    if BUG == "no-grad-sync" and module.__name__ == "megalora":
        # The replicated factors keep their TP-partial gradients.
        module.sync_lora_grads = lambda model: 0


class _Hook:
    def find_spec(self, name, path=None, target=None):
        if name not in ("megalora", "megalora.layers.parallel"):
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Hook())
"""


@pytest.mark.parametrize("bug", ["gate-up-split", "no-grad-sync"])
def test_verify_catches_broken_sharding(tmp_path, bug):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(bug=bug))
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), ROOT, env.get("PYTHONPATH")) if p)
    proc = _cli("verify", TINY, "--steps", "2", "--json", "--workdir", str(tmp_path / "verify"), env=env, code=1)
    report = _verify_report(proc)
    assert not report["ok"]
    # The sharding is wrong, not the rounding: the gradients differ by O(1), not 1e-6.
    assert report["max_grad_rel_diff"] > 0.1, report
    assert any(f.startswith("max_grad_rel_diff") for f in report["failures"]), report["failures"]
    if bug == "gate-up-split":
        assert "linear_fc1.lora_B" in report["max_grad_rel_diff_tensor"]
