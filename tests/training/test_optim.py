"""The trainer on megatron-core's DDP, distributed optimizer and bf16 (megalora.training.optim).

* TP2 x DP2 with the distributed optimizer against world size 1 (same full
  weights): per-step losses, grad norms, the gathered adapter after Adam steps,
  greedy generation.
* Resuming with the distributed optimizer (each DP rank's shard of the Adam
  moments saved and restored) reproduces the uninterrupted run bit for bit.
* ``train.bf16``: bf16 base weights, fp32 master weights and grads of the
  adapter, and the loss goes down.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.multirank import run_on_ranks
from tests.training.test_job import QUICK, TINY, _adapter, _assert_same_training, _resume_body, _run

DIST_OPT = ["train.distributed_optimizer=true"]


def _oracle_and_resume(root: str) -> tuple:
    tp2_dp2 = _run(os.path.join(root, "tp2_dp2"), DIST_OPT)
    return tp2_dp2, _resume_body(os.path.join(root, "resume"), DIST_OPT)


def test_distributed_optimizer_matches_world_size_one_and_resumes_exactly(tmp_path):
    root = str(tmp_path)
    ref = run_on_ranks(1, _run, os.path.join(root, "w1"), ["parallel.tp=1"])[0]
    got, (full, first, second) = run_on_ranks(4, _oracle_and_resume, root, timeout_s=600)[0]
    assert got.layout["tp"] == 2 and got.layout["world_size"] == 4 and got.layout["distributed_optimizer"]
    # Tolerances: see _assert_same_training (4 Adam steps with clipping engaged; rounding differs
    # only in the order of the TP/DP sums, the fp32 reduce-scatter and the sharded Adam update).
    _assert_same_training(got, ref, "tp2_dp2 distributed optimizer")
    for rank in range(4):  # every rank wrote its own shard of the optimizer state
        assert os.path.isfile(tmp_path / "resume" / "parts" / "checkpoints" / "step_000003" / f"rank_{rank:05d}.pt")
    assert not first.finished and len(first.history) == 3
    assert second.finished and second.history == full.history, (second.history, full.history)
    assert second.grad_norms == full.grad_norms
    a, b = _adapter(second), _adapter(full)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed adapter is not bit-identical"
    assert second.final_eval_loss == full.final_eval_loss


def _bf16_body(out: str) -> dict:
    from megalora.training import job, load

    from megalora.training.optim import parts

    cfg = load(TINY, [*QUICK, *DIST_OPT, "parallel.tp=1", "train.bf16=true", "train.steps=6", "job.eval_base=true",
                      "train.clip_grad=1.0", f"job.output_dir={out}"])
    r = job._setup(cfg)
    job._before(r, {})
    job._train(r, 0)
    trainable = [p for c in r.chunks for p in c.parameters() if p.requires_grad]
    frozen = [p for c in r.chunks for p in c.parameters() if not p.requires_grad]
    opt_parts = parts(r.optimizer)
    masters = [q for part in opt_parts for g in part.optimizer.param_groups for q in g["params"]]
    return dict(history=r.summary.history, base=r.summary.base_eval_loss,
                final=job.evaluate(r.model, r.eval_batches, cfg.data.seq_length),
                frozen={str(p.dtype) for p in frozen}, lora={str(p.dtype) for p in trainable},
                main_grads={str(p.main_grad.dtype) for p in trainable},
                masters={str(q.dtype) for q in masters}, master_numel=sum(q.numel() for q in masters),
                lora_numel=sum(p.numel() for p in trainable), optimizers={type(p).__name__ for p in opt_parts})


def test_bf16_trains_with_fp32_master_weights_and_grads(tmp_path):
    ranks = run_on_ranks(2, _bf16_body, str(tmp_path))
    s = ranks[0]
    assert s["frozen"] == {"torch.bfloat16"}, "the base weights must be bf16"
    # Megatron-LM's --bf16: the model's adapter computes in bf16, the optimizer
    # steps fp32 masters of it and reduces its grads in fp32.
    assert s["lora"] == {"torch.bfloat16"} and s["main_grads"] == {"torch.float32"}
    assert s["masters"] == {"torch.float32"} and s["optimizers"] == {"DistributedOptimizer"}
    # Each of the 2 DP ranks steps half of the fp32 masters (ZeRO-1).
    assert sum(r["master_numel"] for r in ranks) == s["lora_numel"]
    losses = [loss for _, loss in s["history"]]
    assert losses[-1] < losses[0] and s["final"] < s["base"] - 0.01, (losses, s["base"], s["final"])


def test_bf16_config_errors():
    from megalora.training import load

    with pytest.raises(ValueError, match="train.bf16: true with model.dtype=float16"):
        load(TINY, ["train.bf16=true", "model.dtype=float16"])
    with pytest.raises(ValueError, match="job.record_grads"):
        load(TINY, [*DIST_OPT, "job.record_grads=true"])
