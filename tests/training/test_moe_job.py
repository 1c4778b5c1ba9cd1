"""The tiny-MoE job (configs/tiny_moe_cpu.yaml) through the megalora CLI, at EP=2 on CPU.

``megalora verify`` trains the job at its own layout (EP=2, 2 processes) and
at world size 1 (EP=1) with SGD and compares losses, each tensor's gradients
and the trained adapter: the trainer's model builder (base weights drawn from
global names, global expert indices), megatron-core's DDP over the
expert-data-parallel group and the expert writers of the adapter file are all
on that path. Config checks for the MoE fields fail in one line naming the key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megalora.launcher import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOE = "configs/tiny_moe_cpu.yaml"


def test_tiny_moe_job_verifies_at_ep2_against_world_size_one():
    proc = subprocess.run([sys.executable, "-m", "megalora.cli", "verify", MOE, "--steps", "2", "--json"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    # 2 layers x (qkv, proj, shared fc1/fc2, 4 experts x fc1/fc2) x (A, B).
    assert report["ok"] and report["tensors_compared"] == 48, report["failures"]
    assert report["layout"]["ep"] == 2 and report["layout"]["world_size"] == 2
    # Rounding only (sums in another order): measured <= 4e-7 relative.
    assert report["max_loss_rel_diff"] < 1e-5 and report["max_grad_rel_diff"] < 1e-5


@pytest.mark.parametrize("overrides, key", [
    (["parallel.ep=3"], "model.num_moe_experts"),
    (["model.num_moe_experts=null"], "parallel.ep"),
    (["parallel.tp=2"], "parallel.sp"),
    (["model.moe_token_dispatcher_type=flex"], "model.moe_token_dispatcher_type"),
])
def test_moe_config_errors_name_the_key(overrides, key):
    from megalora.training import load

    with pytest.raises(ValueError) as info:
        load(os.path.join(ROOT, MOE), overrides)
    assert str(info.value).startswith(key) and "\n" not in str(info.value), str(info.value)
