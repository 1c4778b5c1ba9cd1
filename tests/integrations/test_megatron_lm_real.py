"""Megatron-LM's real, unmodified ``pretrain_gpt.py`` trains with LoRA through ``launch/pretrain_gpt_lora.py``.

Optional: skipped unless ``MEGATRON_LM_PATH`` points at a Megatron-LM checkout
(``git clone -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM``). No
Megatron-LM code lives in this repository; ``tests/integrations/megatron_lm_real/`` holds
only the CPU/gloo patches (test-only: they fake ``torch.cuda.is_available()``)
and the per-rank entry point.

Each case runs 2 processes through torchrun: a tiny GPT, 3 iterations, bf16,
the distributed optimizer, ``--save`` and ``--lora-save``, at TP=2 or PP=2,
with an adapted or fully trained ``output_layer`` (tied and untied
embeddings). It must exit 0 within the timeout (a hang prints the ranks'
stacks, is killed and fails), run 3 iterations, write the adapter with full
(TP-gathered) ``output_layer`` tensors next to the checkpoint and at the end,
and print the adapter's trainable-parameter count once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import procs

REPO = Path(__file__).resolve().parents[2]
ENTRY = Path(__file__).resolve().parent / "megatron_lm_real" / "run_pretrain_gpt.py"
MEGATRON_LM = os.environ.get("MEGATRON_LM_PATH", "")
# A case takes about a minute on 2 idle cores; a loaded machine needs more. Override for slower hosts.
TIMEOUT_S = float(os.environ.get("MEGATRON_LM_TEST_TIMEOUT_S", "900"))

pytestmark = [
    pytest.mark.skipif(not MEGATRON_LM, reason="set MEGATRON_LM_PATH to a Megatron-LM checkout "
                       "(git clone -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM) to run it"),
    pytest.mark.skipif(bool(MEGATRON_LM) and not os.path.isfile(os.path.join(MEGATRON_LM, "pretrain_gpt.py")),
                       reason=f"MEGATRON_LM_PATH={MEGATRON_LM!r} holds no pretrain_gpt.py"),
    pytest.mark.skipif(importlib.util.find_spec("six") is None,
                       reason="Megatron-LM's training package needs six: pip install six"),
]

VOCAB, HIDDEN = 128, 64
# NullTokenizer adds an end-of-document token (129), which Megatron-LM pads to a multiple of
# --make-vocab-size-divisible-by times TP: the output layer has 256 rows at TP=1 and TP=2.
PADDED_VOCAB = 256
# Tiny GPT on mock data, CPU-only settings (local transformer, no fused kernels, gloo).
BASE_ARGS = """
--num-layers 4 --hidden-size {HIDDEN} --ffn-hidden-size 128 --num-attention-heads 4
--seq-length 32 --max-position-embeddings 32
--micro-batch-size 2 --global-batch-size 4 --train-iters 3
--lr 1e-3 --min-lr 1e-4 --lr-decay-style constant --clip-grad 1.0 --seed 1234
--mock-data --tokenizer-type NullTokenizer --vocab-size {VOCAB} --make-vocab-size-divisible-by {VOCAB}
--transformer-impl local --use-cpu-initialization --distributed-backend gloo
--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion
--no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm
--attention-dropout 0.0 --hidden-dropout 0.0
--log-interval 1 --eval-iters 0 --eval-interval 1000 --split 99,1,0
--distributed-timeout-minutes 5
--bf16 --use-distributed-optimizer
""".format(VOCAB=VOCAB, HIDDEN=HIDDEN).split()
LORA_OUTPUT = "--lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 output_layer".split()
SAVE_OUTPUT = ["--lora-modules-to-save", "output_layer"]
UNTIE = ["--untie-embeddings-and-output-weights"]
CASES = {
    "tp2-lora-tied": (["--tensor-model-parallel-size", "2"], LORA_OUTPUT),
    "tp2-lora-untied": (["--tensor-model-parallel-size", "2"], LORA_OUTPUT + UNTIE),
    "pp2-lora-tied": (["--pipeline-model-parallel-size", "2"], LORA_OUTPUT),
    "pp2-lora-untied": (["--pipeline-model-parallel-size", "2"], LORA_OUTPUT + UNTIE),
    "tp2-save-tied": (["--tensor-model-parallel-size", "2"], SAVE_OUTPUT),
    "pp2-save-tied": (["--pipeline-model-parallel-size", "2"], SAVE_OUTPUT),
}
TRAINABLE_LINE = re.compile(r"^trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%", re.M)


def _print_rank_stacks(torchrun_pid: int) -> None:
    """Asks each rank to write its Python stacks to the log (its SIGUSR1 handler), so a hang shows where."""
    for pid in procs.descendants(torchrun_pid):
        if str(ENTRY) in procs.cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
    time.sleep(3)


def _run(args: list[str], workdir: Path) -> tuple[int, str]:
    """Runs the 2-rank job in its own process group; on timeout kills it and every descendant, returns rc -9."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = workdir / "run.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ENTRY), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _print_rank_stacks(proc.pid)
            # torchrun starts each rank in a session of its own, so its group alone is not enough.
            tree = procs.descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            procs.end(tree, grace_s=0)
            proc.wait()
            rc = -9
    return rc, log.read_text(errors="replace")


def _output_layer_shapes(path: Path) -> dict[str, list[int]]:
    """Shapes of the ``output_layer`` tensors in a saved adapter (read without loading them)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {n: handle.get_slice(n).get_shape() for n in handle.keys() if ".output_layer." in n}


@pytest.mark.parametrize("case", list(CASES))
def test_pretrain_gpt_with_lora(case, tmp_path):
    layout, lora = CASES[case]
    save = ["--save", str(tmp_path / "ckpt"), "--save-interval", "3", "--lora-save", str(tmp_path / "adapters")]
    rc, log = _run(BASE_ARGS + layout + lora + save, tmp_path)
    tail = log[-6000:]
    assert rc == 0, f"{case}: rc {rc}{' (timed out, killed)' if rc == -9 else ''}; log tail:\n{tail}"

    assert re.search(r"iteration +3/ +3 \|.*lm loss", log), f"{case}: iteration 3 never logged; log tail:\n{tail}"
    counts = TRAINABLE_LINE.findall(log)
    assert len(counts) == 1, f"{case}: trainable-parameter line printed {len(counts)} times; log tail:\n{tail}"
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").is_file(), "Megatron-LM saved no checkpoint"
    for folder in ("iter_0000003", "final"):
        adapter = tmp_path / "adapters" / folder
        assert (adapter / "adapter_config.json").is_file(), f"{case}: no adapter config in {adapter}"
        shapes = _output_layer_shapes(adapter / "adapter_model.safetensors")
        # The saved file holds full tensors: the vocabulary dimension is gathered across TP.
        if "--lora-modules-to-save" in lora:
            assert shapes == {"base_model.model.output_layer.weight": [PADDED_VOCAB, HIDDEN]}, f"{case}/{folder}: {shapes}"
        else:
            a, b = (shapes.get(f"base_model.model.output_layer.lora_{f}.weight") for f in "AB")
            assert a and b and a[1] == HIDDEN and b[0] == PADDED_VOCAB, f"{case}/{folder}: {shapes}"
