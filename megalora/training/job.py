"""The job: build, evaluate the base, fine-tune, answer a prompt, save, merge, export.

:func:`run` is what ``megalora train CONFIG`` and ``python -m megalora.train
CONFIG`` execute on every rank, under torchrun, Slurm, mpirun or alone. Rank 0
logs (tqdm) and writes the summary, metrics and the loss-curve PNG into
``job.output_dir``.
"""

from __future__ import annotations

import contextlib

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..atomic_write import write_json
from ..collectives import agree_or_raise, broadcast_object
from ..launch_env import detect_launch_env
from . import state as ckpt
from .checks import check_batch_sizes, data_parallel_size
from .config import JobConfig
from .generate import greedy_generate
from .loop import StepResult, evaluate, train_step
from .models import build_chunks, hf_config_of, model_vocab_size
from .optim import make_optimizer, trainable_params, wrap_chunks
from .plot import plot_losses
from .record import INITIAL_ADAPTER, write_grads


class Log:
    """Rank-0 output: plain lines, and a tqdm bar over the steps."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.time()
        self.bar = None

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"[megalora {time.time() - self.start:6.1f}s] {text}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)


def layout_of(cfg: JobConfig) -> dict:
    """What a training checkpoint's per-rank optimizer state depends on."""
    p, t = cfg.parallel, cfg.train
    return {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "sp": p.sp, "ep": p.ep, "etp": p.expert_tp,
            "world_size": dist.get_world_size(),
            "distributed_optimizer": t.distributed_optimizer, "bf16": t.bf16}


@dataclass
class TaskData:
    """The tokenized task of a run: the same on every rank, but ``tokenizer`` (rank 0 only)."""

    train: Any  # megalora.data.Tokenized
    eval: Any
    prompt: str
    reference: Optional[str]  # the prompt's answer, when the prompt is one of the task's questions
    prompt_ids: list
    eos_id: int
    vocab: int  # tokens the model may generate (the tokenizer's, capped by the model's vocabulary)
    tokenizer: Any = None


@dataclass
class JobSummary:
    """What a run reports (``summary.json``); the same on every rank.

    Fields stay ``None`` for what the run did not do (no base eval, stopped by
    ``train.exit_after`` before the final eval, ...).
    """

    layout: dict
    launcher: str
    prompt: str
    reference_answer: Optional[str]
    steps: int = 0
    finished: bool = False
    base_eval_loss: Optional[float] = None
    answer_before: Optional[str] = None
    history: list = field(default_factory=list)  # [step, train loss]
    grad_norms: list = field(default_factory=list)  # [step, global grad norm before clipping]
    evals: list = field(default_factory=list)  # [step, eval loss]
    final_eval_loss: Optional[float] = None
    answer_after: Optional[str] = None
    merged_eval_loss: Optional[float] = None
    adapter_dir: Optional[str] = None
    hf_peft_adapter_dir: Optional[str] = None
    plot: Optional[str] = None
    train_seconds: float = 0.0
    seconds_per_step: float = 0.0
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _prepare_data(cfg: JobConfig, log: Log) -> TaskData:
    """Tokenized train/eval sets and the demo prompt. Rank 0 tokenizes and broadcasts.

    Loading an HF tokenizer from GGUF takes seconds of CPU; one rank does it.
    Errors (a too short ``data.seq_length``) are raised on every rank.
    """
    from ..data import load_tokenizer, make_splits, tokenize

    payload, error, tokenizer = None, None, None
    if dist.get_rank() == 0:
        try:
            d = cfg.data
            train, evals = make_splits(d.num_train, d.num_eval, d.seed, d.categories or _all_categories())
            tokenizer = load_tokenizer(d.tokenizer)
            prompt = cfg.job.prompt or evals[0].question
            reference = next((e.answer for e in evals + train if e.question == prompt), None)
            payload = TaskData(tokenize(train, tokenizer, d.seq_length), tokenize(evals, tokenizer, d.seq_length),
                               prompt, reference, tokenizer.prompt_ids(prompt), tokenizer.eos_id, tokenizer.vocab_size)
        except (ValueError, OSError, ImportError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    agree_or_raise(broadcast_object(error))
    payload = broadcast_object(payload)
    payload.tokenizer = tokenizer  # rank 0 decodes the answers
    log(f"data: {len(payload.train)} train / {len(payload.eval)} eval examples, seq_length "
        f"{cfg.data.seq_length}, tokenizer {cfg.data.tokenizer}")
    return payload


def _all_categories():
    from ..data import CATEGORIES

    return CATEGORIES


def _answer(chunks, data: TaskData, cfg: JobConfig) -> str | None:
    ids = greedy_generate(chunks, data.prompt_ids, cfg.job.max_new_tokens, data.eos_id, data.vocab,
                          sequence_parallel=cfg.parallel.sp)
    tok = data.tokenizer
    return tok.decode(ids).strip() if tok is not None else None


def _write_json(path: str, obj) -> None:
    write_json(path, obj, indent=1)  # atomic: a killed job never leaves a torn summary


@dataclass
class _Run:
    """What the phases of a run share."""

    cfg: JobConfig
    log: Log
    data: TaskData
    peft_model: Any
    chunks: list  # the model chunks with LoRA, as built
    model: list  # the same chunks wrapped for training (optim.wrap_chunks)
    optimizer: Any  # megatron-core's optimizer over ``model``
    eval_batches: list
    dp: int
    summary: JobSummary

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.cfg.job.output_dir, "checkpoints")

    def checkpoint(self, step: int) -> str:
        s = self.summary
        extra = {"base_eval_loss": s.base_eval_loss} if s.base_eval_loss is not None else {}
        return ckpt.save(self.ckpt_root, self.peft_model, self.optimizer, step,
                         dict(layout=s.layout, history=s.history, grad_norms=s.grad_norms, evals=s.evals,
                              consumed_samples=step * self.cfg.train.global_batch_size, **extra))


def _setup(cfg: JobConfig) -> _Run:
    """Process groups, data, the model with LoRA, and the optimizer."""
    import megalora
    from megatron.core import parallel_state as ps

    from ..data import eval_microbatches

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    # Read before init_distributed, which exports RANK & co. for whoever reads them next.
    launcher = detect_launch_env(use_scontrol=False).source
    megalora.init_distributed()
    check_batch_sizes(cfg, dist.get_world_size())
    p = cfg.parallel
    megalora.init_parallel(p.tp, p.pp, virtual_pipeline_model_parallel_size=p.vpp, seed=cfg.train.seed,
                           **({"expert_model_parallel_size": p.ep, "expert_tensor_parallel_size": p.expert_tp}
                              if cfg.model.num_moe_experts else {}))
    log = Log(dist.get_rank() == 0)
    if dist.get_rank() == 0:
        os.makedirs(cfg.job.output_dir, exist_ok=True)
        _write_json(os.path.join(cfg.job.output_dir, "config.json"), cfg.to_dict())
    dp = data_parallel_size(cfg, dist.get_world_size())
    log(f"layout: world {dist.get_world_size()} = TP {p.tp} x PP {p.pp} x DP {dp}"
        + (f", VPP {p.vpp}" if p.vpp else "") + (", SP" if p.sp else "")
        + (f", EP {p.ep} x expert-TP {p.expert_tp}" if cfg.model.num_moe_experts else "") + " | device: "
        + ("cuda" if torch.cuda.is_available() else "cpu (gloo)") + f" | launched by {launcher}")

    data = _prepare_data(cfg, log)
    tb = time.time()
    chunks = build_chunks(cfg, data.vocab)
    peft_model = megalora.get_peft_model(chunks if p.vpp else chunks[0], cfg.lora_config())
    chunks = list(peft_model)
    if cfg.model.dtype != "float32" and not cfg.train.bf16:
        # The adapter trains in fp32 on a bf16/fp16 base (the LoRA layers cast their
        # input to the factors' dtype, and the result back). Under train.bf16 the
        # Megatron optimizer keeps the fp32 master weights instead.
        for param in trainable_params(chunks):
            param.data = param.data.float()
    model = wrap_chunks(chunks, cfg.train)
    data.vocab = min(data.vocab, model_vocab_size(chunks))  # padded rows are not tokens
    counts = peft_model.get_nb_trainable_parameters()  # collective: global counts, the same at every layout
    name = cfg.model.hf_path or ("SmolLM2-135M-Instruct" if cfg.model.source == "hf" else "random GPT")
    log(f"model: {name} built in {time.time() - tb:.1f}s | LoRA trainable {counts[0]:,} of "
        f"{counts[1]:,} params")
    multiple = p.pp if p.vpp else 1
    eval_batches = eval_microbatches(data.eval, cfg.train.eval_micro_batch_size or cfg.train.micro_batch_size,
                                     ps.get_data_parallel_rank(), dp, multiple)
    summary = JobSummary(layout_of(cfg), launcher, data.prompt, data.reference, steps=cfg.train.steps)
    return _Run(cfg, log, data, peft_model, chunks, model, make_optimizer(model, cfg.train), eval_batches, dp,
                summary)


def _base_view(r: _Run):
    """The context in which the model is the base model, before training.

    Adapters disabled, except after an init that rewrote the base (PiSSA, OLoRA, LoftQ): there
    the untrained model with its adapter *is* the base (``W_res + s·B0@A0 = W``; LoftQ's quantized
    fit of it), and disabling the adapter would leave the residual.
    """
    from ..initializers.base_weight import reads_base_weight

    init = r.peft_model.peft_config[r.peft_model.active_adapters[0]].init_lora_weights
    return contextlib.nullcontext() if reads_base_weight(init) else r.peft_model.disable_adapter()


def _before(r: _Run, meta: dict) -> None:
    """The base model's eval loss and answer (see :func:`_base_view`)."""
    cfg, seq = r.cfg, r.cfg.data.seq_length
    if cfg.job.eval_base:
        if "base_eval_loss" in meta:  # measured before the run was interrupted
            r.summary.base_eval_loss = meta["base_eval_loss"]
        else:
            with _base_view(r):
                r.summary.base_eval_loss = evaluate(r.model, r.eval_batches, seq)
        r.log(f"base model eval loss: {r.summary.base_eval_loss:.4f}")
    if cfg.job.max_new_tokens > 0:
        with _base_view(r):
            r.summary.answer_before = _answer(r.chunks, r.data, cfg)
        r.log(f"prompt: {r.data.prompt!r}\n    base model answers: {r.summary.answer_before!r}")


def _train(r: _Run, start: int) -> bool:
    """The step loop; returns False when ``train.exit_after`` stopped it early."""
    from megatron.core import parallel_state as ps
    from tqdm.auto import tqdm

    from ..data import step_microbatches

    t, seq, s = r.cfg.train, r.cfg.data.seq_length, r.summary
    # disable=None: a bar on a terminal, none in a log file (the log_every lines remain).
    r.log.bar = tqdm(total=t.steps, initial=start, disable=None if r.log.enabled else True, desc="train",
                     dynamic_ncols=True)
    t_train = time.time()
    finished = True
    for step in range(start, t.steps):
        batches, tokens = step_microbatches(r.data.train, step, t.global_batch_size, t.micro_batch_size,
                                            ps.get_data_parallel_rank(), r.dp, r.cfg.data.seed)
        record = (functools.partial(write_grads, r.peft_model, r.cfg.job.output_dir, step + 1)
                  if r.cfg.job.record_grads else None)
        result: StepResult = train_step(r.model, r.optimizer, batches, tokens, step, t, seq, on_grads=record)
        s.history.append([step + 1, result.loss])
        s.grad_norms.append([step + 1, result.grad_norm])
        r.log.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", gnorm=f"{result.grad_norm:.3f}")
        r.log.bar.update(1)
        done = step + 1
        if t.log_every and done % t.log_every == 0:
            r.log(f"step {done}/{t.steps} loss {result.loss:.4f} lr {result.lr:.2e} grad_norm {result.grad_norm:.3f}")
        if t.eval_every and done % t.eval_every == 0 and done < t.steps:
            s.evals.append([done, evaluate(r.model, r.eval_batches, seq)])
            r.log(f"step {done}: eval loss {s.evals[-1][1]:.4f}")
        stop = bool(t.exit_after) and done - start >= t.exit_after and done < t.steps
        if (t.save_every and done % t.save_every == 0) or stop:
            r.log(f"checkpoint: {r.checkpoint(done)}")
        if stop:
            r.log(f"train.exit_after={t.exit_after}: stopping after step {done}; run again with "
                  "train.resume=auto to continue")
            finished = False
            break
    r.log.bar.close()
    r.log.bar = None
    s.train_seconds = time.time() - t_train
    s.seconds_per_step = s.train_seconds / max(len(s.history) - start, 1)
    return finished


def _after(r: _Run) -> None:
    """Final eval and answer, save, HF PEFT export, merge check."""
    cfg, seq, log, summary = r.cfg, r.cfg.data.seq_length, r.log, r.summary
    final = evaluate(r.model, r.eval_batches, seq)
    summary.evals.append([cfg.train.steps, final])
    summary.final_eval_loss = final
    log(f"fine-tuned eval loss: {final:.4f}" + (f" (base {summary.base_eval_loss:.4f})"
                                                if summary.base_eval_loss is not None else ""))
    if cfg.job.max_new_tokens > 0:
        summary.answer_after = _answer(r.chunks, r.data, cfg)
        log(f"prompt: {r.data.prompt!r}\n    fine-tuned model answers: {summary.answer_after!r}"
            + (f" (reference {r.data.reference!r})" if r.data.reference else ""))

    adapter_dir = os.path.join(cfg.job.output_dir, "adapter")
    r.peft_model.save_pretrained(adapter_dir)
    summary.adapter_dir = adapter_dir
    log(f"adapter saved: {adapter_dir}")
    hf_config = hf_config_of(r.chunks)
    if cfg.job.export_hf_peft and hf_config is not None:
        from .tools import export_peft_with_base

        hf_dir = os.path.join(cfg.job.output_dir, "hf_peft_adapter")
        export_peft_with_base(cfg, r.peft_model, hf_dir)
        summary.hf_peft_adapter_dir = hf_dir
        log(f"HF PEFT adapter exported: {hf_dir} (peft.AutoPeftModelForCausalLM.from_pretrained(that folder))")
    if cfg.job.merge_check:
        merged = r.peft_model.merge_and_unload()
        summary.merged_eval_loss = evaluate(merged if isinstance(merged, list) else [merged], r.eval_batches, seq)
        log(f"merged model eval loss: {summary.merged_eval_loss:.4f} (with the adapter unmerged {final:.4f}, "
            f"difference {abs(summary.merged_eval_loss - final):.2e})")


def run(cfg: JobConfig) -> JobSummary:
    """Runs the whole job on this rank; returns the summary (the same on every rank).

    Collective over the world group. Raises ``ValueError`` on every rank for a
    config that does not fit the world size or the model.
    """
    t0 = time.time()
    r = _setup(cfg)
    resume_from = ckpt.resolve(cfg.train.resume, r.ckpt_root)
    meta = {}
    if resume_from:
        with open(os.path.join(resume_from, "trainer.json")) as handle:
            meta = json.load(handle)
    _before(r, meta)
    start = 0
    if resume_from:
        # Restored last, right before the loop, so nothing above moves an RNG.
        meta = ckpt.load(resume_from, r.peft_model, r.optimizer, r.summary.layout)
        start, r.summary.history, r.summary.evals = meta["step"], meta.get("history", []), meta.get("evals", [])
        r.summary.grad_norms = meta.get("grad_norms", [])
        r.log(f"resumed from {resume_from} at step {start}")
    if cfg.job.record_grads and start == 0:
        r.peft_model.save_pretrained(os.path.join(cfg.job.output_dir, INITIAL_ADAPTER))
    finished = _train(r, start)
    s = r.summary
    s.finished = finished
    if finished:
        _after(r)
    s.wall_seconds = time.time() - t0
    out = cfg.job.output_dir
    if dist.get_rank() == 0:
        if cfg.job.plot and finished:
            s.plot = plot_losses(os.path.join(out, "loss_curve.png"), s.history, s.evals, s.base_eval_loss,
                                 s.merged_eval_loss)
            if s.plot:
                r.log(f"loss curve: {s.plot}")
        _write_json(os.path.join(out, "summary.json"), s.to_dict())
    r.log(f"done in {s.wall_seconds:.1f}s; summary: {os.path.join(out, 'summary.json')}")
    return broadcast_object(r.summary)
