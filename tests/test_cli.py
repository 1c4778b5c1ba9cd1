"""The ``megalora`` command: help, errors, and train → inspect → merge → verify on the tiny GPT.

The model-running verbs are started as a user would, in fresh processes: the
console script self-launches torchrun at the config's layout (TP=2).
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

TINY = "configs/tiny_gpt.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["train.steps=6", "train.eval_every=3", "train.log_every=0", "data.num_train=64", "data.num_eval=16"]


def _cli(*args: str, timeout: int = 600, env: dict | None = None, code: int = 0) -> subprocess.CompletedProcess:
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
    assert proc.returncode == code, f"megalora {' '.join(args)} exited {proc.returncode}, not {code}:\n" \
                                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _verify_report(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.parametrize("verb", ["train", "verify", "merge", "export", "inspect"])
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


def test_train_inspect_merge_verify(tmp_path, capsys):
    from megalora.checkpoint import read_adapter_tensors
    from megalora.training import load
    from megalora.training.models import _init_value

    out = tmp_path / "run"
    _cli("train", TINY, *QUICK, f"job.output_dir={out}")
    with open(out / "summary.json") as handle:
        summary = json.load(handle)
    assert summary["layout"]["world_size"] == 2 and summary["layout"]["tp"] == 2
    assert summary["launcher"] == "torchrun"  # the CLI started torchrun itself
    assert summary["final_eval_loss"] < summary["base_eval_loss"]
    assert os.path.isfile(out / "loss_curve.png")

    assert main(["inspect", str(out / "adapter")]) == 0
    text = capsys.readouterr().out
    assert '"tensor_model_parallel_size": 2' in text and "decoder.layers.1.mlp.linear_fc2: r=8" in text

    # Merge at another layout (one process, TP=1): merged = base + (alpha / r) B A, exactly.
    merged_dir = tmp_path / "merged"
    _cli("merge", TINY, "parallel.tp=1", "--adapter", str(out / "adapter"), "--output", str(merged_dir))
    from safetensors.torch import load_file

    merged = load_file(str(merged_dir / "model.safetensors"))
    lora = read_adapter_tensors(str(out / "adapter"))
    cfg = load(TINY)
    name = "decoder.layers.1.self_attention.linear_qkv"
    a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
    base = _init_value(f"{name}.weight", list(merged[f"{name}.weight"].shape), cfg)
    expected = base + (cfg.lora["lora_alpha"] / cfg.lora["r"]) * (b @ a)
    torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged[f"{name}.weight"], base)

    report = _verify_report(_cli("verify", TINY, "--steps", "3", "--json", "--workdir", str(tmp_path / "verify")))
    _assert_verified(report, steps=3)
    assert report["layout"]["tp"] == 2 and not report["layout"]["sp"]


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
