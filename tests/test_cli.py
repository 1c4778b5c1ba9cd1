"""The ``megalora`` command: help, errors, and train → inspect → merge → verify on the tiny GPT.

The model-running verbs are started as a user would, in fresh processes: the
console script self-launches torchrun at the config's layout (TP=2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megalora.cli import child_env, main

TINY = "configs/tiny_gpt.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["train.steps=6", "train.eval_every=3", "train.log_every=0", "data.num_train=64", "data.num_eval=16"]


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    script = os.path.join(os.path.dirname(sys.executable), "megalora")
    cmd = [script] if os.path.isfile(script) else [sys.executable, "-m", "megalora.cli"]
    proc = subprocess.run([*cmd, *args], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"megalora {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-6000:]}"
    return proc


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

    proc = _cli("verify", TINY, "--steps", "3", "--json", "--workdir", str(tmp_path / "verify"))
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["ok"] and report["layout"]["tp"] == 2 and report["reference"]["world_size"] == 1
    assert report["steps"] == 3 and report["max_loss_rel_diff"] < 1e-5 and report["max_weight_diff"] < 5e-5
