"""The trainer (megalora.training) on real megatron-core GPTs over gloo.

* Every layout (TP, TP+SP, PP, PP+VPP, DP, TP x PP x VPP + SP) is run from the
  same config and compared with world size 1 after Adam steps: per-step losses,
  grad norms (which must count each TP-replicated factor once), the saved
  adapters, and greedy generation.
* Resuming (3 steps, exit, resume, 3 steps) reproduces the uninterrupted
  6-step run exactly, with LoRA dropout on so the RNG states matter.
* The whole job: base eval, training, answer, save, merge check, plot.
* Config, data and LR-schedule units.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tests.multirank import run_on_ranks

TINY = "configs/tiny_gpt.yaml"
# Short runs with no extras; clip_grad low so that clipping engages.
QUICK = ["train.steps=4", "job.eval_base=false", "job.merge_check=false", "job.plot=false", "train.eval_every=0",
         "train.log_every=0", "job.max_new_tokens=4", "train.clip_grad=0.05", "data.num_train=64",
         "data.num_eval=16", "train.global_batch_size=8", "train.micro_batch_size=2"]
DEEP = ["model.num_layers=4"]


def _run(out: str, overrides: list[str]):
    from megalora.training import load, run

    return run(load(TINY, [*QUICK, *overrides, f"job.output_dir={out}"]))


def _runs(root: str, layouts: dict) -> dict:
    """Runs each named layout in turn on these ranks; the summaries by name."""
    return {name: _run(os.path.join(root, name), overrides) for name, overrides in layouts.items()}


def _adapter(summary) -> dict:
    from megalora.checkpoint import read_adapter_tensors

    return read_adapter_tensors(summary.adapter_dir)


def _assert_same_training(got, ref, what: str) -> None:
    for (step, a), (_, b) in zip(got.history, ref.history, strict=True):
        assert a == pytest.approx(b, rel=1e-5), f"{what}: step {step} loss {a} vs world size 1 {b}"
    for (step, a), (_, b) in zip(got.grad_norms, ref.grad_norms, strict=True):
        assert a == pytest.approx(b, rel=1e-5), f"{what}: step {step} grad norm {a} vs world size 1 {b}"
    wa, wb = _adapter(got), _adapter(ref)
    assert wa.keys() == wb.keys(), f"{what}: adapters hold different tensors"
    for key in wa:
        diff = (wa[key] - wb[key]).abs().max().item()
        # Adam turns rounding noise in near-zero grads into steps well below lr (3e-3).
        assert diff <= 5e-5, f"{what}: {key} differs by {diff} from world size 1"
    assert got.answer_after == ref.answer_after, f"{what}: greedy answer differs from world size 1"


def test_layouts_match_world_size_one(tmp_path):
    root = str(tmp_path)
    single = ["parallel.tp=1"]
    ref = run_on_ranks(1, _runs, os.path.join(root, "w1"), {"shallow": single, "deep": [*single, *DEEP]})[0]
    two = run_on_ranks(2, _runs, os.path.join(root, "w2"), {
        "tp2": [],
        "tp2_sp": ["parallel.sp=true"],
        "dp2": ["parallel.tp=1"],
        "pp2": ["parallel.tp=1", "parallel.pp=2", *DEEP],
        "pp2_vpp2": ["parallel.tp=1", "parallel.pp=2", "parallel.vpp=2", *DEEP],
    }, timeout_s=600)
    four = run_on_ranks(4, _runs, os.path.join(root, "w4"), {
        "tp2_pp2_vpp2_sp": ["parallel.pp=2", "parallel.vpp=2", "parallel.sp=true", *DEEP],
    }, timeout_s=600)
    assert two[0]["tp2"].history == two[1]["tp2"].history, "ranks disagree on the logged losses"
    for name, summary in {**two[0], **four[0]}.items():
        _assert_same_training(summary, ref["deep" if "pp2" in name else "shallow"], name)
    # Clipping engaged (so the norm decided the update scale), and training moved.
    assert all(n > 0.05 for _, n in ref["shallow"].grad_norms)
    assert ref["shallow"].history[-1][1] < ref["shallow"].history[0][1]


def _resume_body(root: str, extra: tuple = ()) -> tuple:
    dropout = ["lora.lora_dropout=0.1", "train.steps=6", "job.max_new_tokens=0", *extra]
    full = _run(os.path.join(root, "full"), dropout)
    parts = os.path.join(root, "parts")
    first = _run(parts, [*dropout, "train.exit_after=3"])
    second = _run(parts, [*dropout, "train.resume=auto"])
    return full, first, second


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full, first, second = run_on_ranks(2, _resume_body, str(tmp_path))[0]
    assert not first.finished and len(first.history) == 3
    assert os.path.isfile(tmp_path / "parts" / "checkpoints" / "step_000003" / "rank_00001.pt")
    assert second.finished and second.history == full.history, (second.history, full.history)
    assert second.grad_norms == full.grad_norms
    a, b = _adapter(second), _adapter(full)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed adapter is not bit-identical"
    assert second.final_eval_loss == full.final_eval_loss


def _job_body(root: str):
    from megalora.training import load, run

    return run(load(TINY, [f"job.output_dir={root}", "train.log_every=0"]))


def test_tiny_job_end_to_end(tmp_path):
    from megalora.training.inspect import inspect_adapter

    summaries = run_on_ranks(2, _job_body, str(tmp_path))
    s = summaries[0]
    assert summaries[1].final_eval_loss == s.final_eval_loss
    assert s.final_eval_loss < s.base_eval_loss - 0.1, (s.base_eval_loss, s.final_eval_loss)
    assert abs(s.merged_eval_loss - s.final_eval_loss) < 1e-4
    assert [e[0] for e in s.evals] == [10, 20]
    assert isinstance(s.answer_before, str) and isinstance(s.answer_after, str)
    assert os.path.getsize(tmp_path / "loss_curve.png") > 1000
    with open(tmp_path / "summary.json") as handle:
        assert json.load(handle)["final_eval_loss"] == s.final_eval_loss
    info = inspect_adapter(str(tmp_path / "adapter"))
    assert info["num_modules"] == 8 and info["ranks"] == [8]
    assert info["layout"]["tensor_model_parallel_size"] == 2


# ---------------------------------------------------------------------- units (one process)


def test_config_overrides_and_errors(tmp_path):
    from megalora.training import load

    cfg = load(TINY, ["train.steps=7", "lora.target_modules=[linear_qkv]", "parallel.vpp=null", "lora.r=4"])
    assert cfg.train.steps == 7 and cfg.lora_config().target_modules == {"linear_qkv"} and cfg.lora["r"] == 4
    for override, words in [
        ("train.stepz=3", "train.stepz is not a known key"),
        ("parallel.tp=3", "num_attention_heads: 4 is not divisible by parallel.tp=3"),
        ("parallel.vpp=2", "parallel.vpp"),
        ("train.global_batch_size=6", "not a multiple of train.micro_batch_size"),
        ("lora.r=0", "LoraConfig.r"),
        ("model.source=onnx", "model.source"),
        ("trainn.steps=3", "unknown config section 'trainn'"),
        ("train=3", "section.key=value"),
    ]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(".", r"\.")):
            load(TINY, [override])
    with pytest.raises(FileNotFoundError, match="configs/"):
        load(str(tmp_path / "missing.yaml"))


def test_layout_check_names_the_fix():
    from megalora.training import load
    from megalora.training.checks import check_batch_sizes

    cfg = load(TINY, ["parallel.tp=1", "parallel.pp=2", "parallel.vpp=2", "model.num_layers=4",
                      "train.global_batch_size=8", "train.micro_batch_size=4"])
    with pytest.raises(ValueError, match="multiple of parallel.pp=2"):
        check_batch_sizes(cfg, 4)  # DP 2: one micro-batch per step, the interleaved schedule needs 2
    with pytest.raises(ValueError, match="does not divide the world size 3"):
        check_batch_sizes(load(TINY), 3)
    check_batch_sizes(cfg, 2)


def test_lr_schedule():
    from megalora.training.config import TrainSection
    from megalora.training.loop import lr_at

    t = TrainSection(steps=10, lr=1.0, min_lr=0.1, warmup_steps=2)
    lrs = [lr_at(s, t) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0.1
    assert lr_at(10, t) == pytest.approx(0.1)
    assert lr_at(6, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_data_is_deterministic_disjoint_and_masked():
    from megalora.data import ByteTokenizer, eval_microbatches, make_splits, step_microbatches, tokenize

    train, evals = make_splits(300, 40, seed=3)
    assert (train, evals) == make_splits(300, 40, seed=3)
    assert not {e.question for e in train} & {e.question for e in evals}
    assert len({e.category for e in evals}) == 10
    tok = ByteTokenizer()
    data = tokenize(train, tok, 64)
    row = 0
    answer = data.labels[row][data.loss_mask[row] > 0].tolist()
    assert tok.decode(answer) == train[row].answer and answer[-1] == tok.eos_id
    with pytest.raises(ValueError, match="data.seq_length=8 is too short"):
        tokenize(train, tok, 8)
    # DP ranks split the global batch; the union is the world-size-1 batch, epochs roll over.
    whole, tokens = step_microbatches(data, 37, 8, 4, 0, 1, seed=0)
    parts = [step_microbatches(data, 37, 8, 2, r, 2, seed=0) for r in range(2)]
    assert all(t == tokens for _, t in parts)
    assert torch.equal(torch.cat([b.tokens for b in whole]), torch.cat([b.tokens for p, _ in parts for b in p]))
    assert tokens == int(sum(b.loss_mask.sum() for b in whole))
    # Eval padding rows are masked out and every rank runs the same number of micro-batches.
    ev = tokenize(evals, tok, 64)
    shards = [eval_microbatches(ev, 4, r, 2, multiple=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) and len(shards[0]) % 2 == 0
    assert sum(b.loss_mask.sum() for s in shards for b in s) == ev.loss_mask.sum()
