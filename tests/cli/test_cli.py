"""The ``megalora`` command: help, errors, trainable counts, and verify catching planted bugs.

The model-running verbs are started as a user would, in fresh processes: the
console script self-launches torchrun at the config's layout. Every example
``--help`` and the READMEs print runs in tests/cli/test_cli_examples.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from megalora.cli import main
from megalora.launcher import child_env

TINY = "configs/tiny_gpt.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "nope' does not exist" in capsys.readouterr().err
    # verify checks both of its runs' configs here: neither starts.
    assert main(["verify", TINY, "--steps", "0"]) == 2
    assert "--steps 0: pass an integer >= 1" in capsys.readouterr().err
    assert main(["verify", TINY, "parallel.tp=3"]) == 2
    assert "parallel.tp=3" in capsys.readouterr().err
    assert main(["train", TINY, "--nproc", "3"]) == 2
    assert "megalora train: error: --nproc 3 is not a multiple" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train"])
    assert "required: config\n" in capsys.readouterr().err  # not the optional overrides


def test_train_module_errors_in_one_line(tmp_path):
    """``python -m megalora.train`` (what launchers start): a config error is one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "megalora.train", TINY, "lora.rr=4"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        line for line in proc.stderr.strip().splitlines() if "lora.rr is not a known key" in line], proc.stderr


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

        def one_block(self, base_layer, **kwargs):
            init(self, base_layer, **kwargs)
            self.b_spec = module.ShardSpec(dim=0)

        cls.__init__ = one_block
    if BUG == "no-grad-sync" and module.__name__ == "megalora.grad_sync":
        # The replicated factors lose the tag through which finalize_model_grads
        # sums their TP-partial gradients.
        module.TP_AVERAGE_ATTR = "not_averaged_across_tp"


class _Hook:
    def find_spec(self, name, path=None, target=None):
        if name not in ("megalora.grad_sync", "megalora.layers.parallel"):
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
    # One step of a one-layer model shows both bugs: at step 1 B = 0, so lora_A's gradient is 0 at every
    # layout, but lora_B's is not: fc1's B rows land in the wrong place, and the row-parallel layers' B
    # gradients are TP-partial sums without the sync.
    proc = _cli("verify", TINY, "model.num_layers=1", "data.num_train=8", "data.num_eval=4", "--steps", "1", "--json",
                "--workdir", str(tmp_path / "verify"), env=env, code=1)
    report = _verify_report(proc)
    assert not report["ok"]
    # The sharding is wrong, not the rounding: the gradients differ by O(1), not 1e-6.
    assert report["max_grad_rel_diff"] > 0.1, report
    assert any(f.startswith("max_grad_rel_diff") for f in report["failures"]), report["failures"]
    if bug == "gate-up-split":
        assert "linear_fc1.lora_B" in report["max_grad_rel_diff_tensor"]
