"""The job: build, evaluate the base, fine-tune, answer a prompt, save, merge, export.

:func:`run` is what ``megalora train CONFIG`` and ``python -m megalora.train
CONFIG`` execute on every rank, under torchrun, Slurm, mpirun or alone. Rank 0
logs (tqdm) and writes the summary, metrics and the loss-curve PNG into
``job.output_dir``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..collectives import agree_or_raise, broadcast_object
from ..atomic_write import write_json
from . import state as ckpt
from .config import JobConfig, check_batch_sizes, data_parallel_size
from .generate import greedy_generate
from .loop import StepResult, evaluate, make_optimizer, train_step, trainable_params
from .models import build_chunks, hf_config_of, model_vocab_size
from .plot import plot_losses


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
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "sp": p.sp, "world_size": dist.get_world_size()}


def _prepare_data(cfg: JobConfig, log: Log) -> dict:
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
            payload = dict(train=tokenize(train, tokenizer, d.seq_length), eval=tokenize(evals, tokenizer, d.seq_length),
                           prompt=prompt, reference=reference, prompt_ids=tokenizer.prompt_ids(prompt),
                           eos_id=tokenizer.eos_id, vocab=tokenizer.vocab_size)
        except (ValueError, OSError, ImportError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    agree_or_raise(broadcast_object(error))
    payload = broadcast_object(payload)
    payload["tokenizer"] = tokenizer  # rank 0 decodes the answers
    log(f"data: {len(payload['train'])} train / {len(payload['eval'])} eval examples, seq_length "
        f"{cfg.data.seq_length}, tokenizer {cfg.data.tokenizer}")
    return payload


def _all_categories():
    from ..data import CATEGORIES

    return CATEGORIES


def _answer(chunks, data, cfg: JobConfig) -> str | None:
    ids = greedy_generate(chunks, data["prompt_ids"], cfg.job.max_new_tokens, data["eos_id"], data["vocab"],
                          sequence_parallel=cfg.parallel.sp)
    tok = data["tokenizer"]
    return tok.decode(ids).strip() if tok is not None else None


def _write_json(path: str, obj) -> None:
    write_json(path, obj, indent=1)  # atomic: a killed job never leaves a torn summary


@dataclass
class _Run:
    """What the phases of a run share."""

    cfg: JobConfig
    log: Log
    data: dict
    peft_model: object
    chunks: list
    optimizer: torch.optim.Optimizer
    eval_batches: list
    dp: int
    summary: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    evals: list = field(default_factory=list)

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.cfg.job.output_dir, "checkpoints")

    def checkpoint(self, step: int) -> str:
        extra = {"base_eval_loss": self.summary["base_eval_loss"]} if "base_eval_loss" in self.summary else {}
        return ckpt.save(self.ckpt_root, self.peft_model, self.optimizer, step,
                         dict(layout=self.summary["layout"], history=self.history, grad_norms=self.grad_norms,
                              evals=self.evals,
                              consumed_samples=step * self.cfg.train.global_batch_size, **extra))


def _setup(cfg: JobConfig) -> _Run:
    """Process groups, data, the model with LoRA, and the optimizer."""
    import megalora
    from megatron.core import parallel_state as ps

    from ..data import eval_microbatches

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    # Read before init_distributed, which exports RANK & co. for whoever reads them next.
    launcher = megalora.launch_env.detect_launch_env(use_scontrol=False).source
    megalora.init_distributed()
    check_batch_sizes(cfg, dist.get_world_size())
    p = cfg.parallel
    megalora.init_parallel(p.tp, p.pp, virtual_pipeline_model_parallel_size=p.vpp, seed=cfg.train.seed)
    log = Log(dist.get_rank() == 0)
    if dist.get_rank() == 0:
        os.makedirs(cfg.job.output_dir, exist_ok=True)
        _write_json(os.path.join(cfg.job.output_dir, "config.json"), cfg.to_dict())
    dp = data_parallel_size(cfg, dist.get_world_size())
    log(f"layout: world {dist.get_world_size()} = TP {p.tp} x PP {p.pp} x DP {dp}"
        + (f", VPP {p.vpp}" if p.vpp else "") + (", SP" if p.sp else "") + " | device: "
        + ("cuda" if torch.cuda.is_available() else "cpu (gloo)") + f" | launched by {launcher}")

    data = _prepare_data(cfg, log)
    tb = time.time()
    chunks = build_chunks(cfg, data["vocab"])
    peft_model = megalora.get_peft_model(chunks if p.vpp else chunks[0], cfg.lora_config())
    chunks = list(peft_model)
    if cfg.model.dtype != "float32":
        # Master weights: the adapter trains in fp32 on a bf16/fp16 base (the LoRA
        # layers cast their input to the factors' dtype, and the result back).
        for param in trainable_params(chunks):
            param.data = param.data.float()
    data["vocab"] = min(data["vocab"], model_vocab_size(chunks))  # padded rows are not tokens
    counts = peft_model.get_nb_trainable_parameters()  # collective: global counts, the same at every layout
    name = cfg.model.hf_path or ("SmolLM2-135M-Instruct" if cfg.model.source == "hf" else "random GPT")
    log(f"model: {name} built in {time.time() - tb:.1f}s | LoRA trainable {counts[0]:,} of "
        f"{counts[1]:,} params")
    multiple = p.pp if p.vpp else 1
    eval_batches = eval_microbatches(data["eval"], cfg.train.eval_micro_batch_size or cfg.train.micro_batch_size,
                                     ps.get_data_parallel_rank(), dp, multiple)
    summary = {"layout": layout_of(cfg), "launcher": launcher, "prompt": data["prompt"], "reference_answer": data["reference"]}
    return _Run(cfg, log, data, peft_model, chunks, make_optimizer(chunks, cfg.train), eval_batches, dp, summary)


def _before(r: _Run, meta: dict) -> None:
    """The base model's eval loss and answer (adapters disabled)."""
    cfg, seq = r.cfg, r.cfg.data.seq_length
    if cfg.job.eval_base:
        if "base_eval_loss" in meta:  # measured before the run was interrupted
            r.summary["base_eval_loss"] = meta["base_eval_loss"]
        else:
            with r.peft_model.disable_adapter():
                r.summary["base_eval_loss"] = evaluate(r.chunks, r.eval_batches, seq)
        r.log(f"base model eval loss: {r.summary['base_eval_loss']:.4f}")
    if cfg.job.max_new_tokens > 0:
        with r.peft_model.disable_adapter():
            r.summary["answer_before"] = _answer(r.chunks, r.data, cfg)
        r.log(f"prompt: {r.data['prompt']!r}\n    base model answers: {r.summary['answer_before']!r}")


def _train(r: _Run, start: int) -> bool:
    """The step loop; returns False when ``train.exit_after`` stopped it early."""
    from megatron.core import parallel_state as ps
    from tqdm.auto import tqdm

    from ..data import step_microbatches

    t, seq = r.cfg.train, r.cfg.data.seq_length
    # disable=None: a bar on a terminal, none in a log file (the log_every lines remain).
    r.log.bar = tqdm(total=t.steps, initial=start, disable=None if r.log.enabled else True, desc="train",
                     dynamic_ncols=True)
    t_train = time.time()
    finished = True
    for step in range(start, t.steps):
        batches, tokens = step_microbatches(r.data["train"], step, t.global_batch_size, t.micro_batch_size,
                                            ps.get_data_parallel_rank(), r.dp, r.cfg.data.seed)
        result: StepResult = train_step(r.chunks, r.optimizer, batches, tokens, step, t, seq)
        r.history.append([step + 1, result.loss])
        r.grad_norms.append([step + 1, result.grad_norm])
        r.log.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", gnorm=f"{result.grad_norm:.3f}")
        r.log.bar.update(1)
        done = step + 1
        if t.log_every and done % t.log_every == 0:
            r.log(f"step {done}/{t.steps} loss {result.loss:.4f} lr {result.lr:.2e} grad_norm {result.grad_norm:.3f}")
        if t.eval_every and done % t.eval_every == 0 and done < t.steps:
            r.evals.append([done, evaluate(r.chunks, r.eval_batches, seq)])
            r.log(f"step {done}: eval loss {r.evals[-1][1]:.4f}")
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
    r.summary["train_seconds"] = time.time() - t_train
    r.summary["seconds_per_step"] = r.summary["train_seconds"] / max(len(r.history) - start, 1)
    r.summary["history"], r.summary["grad_norms"], r.summary["evals"] = r.history, r.grad_norms, r.evals
    return finished


def _after(r: _Run) -> None:
    """Final eval and answer, save, HF PEFT export, merge check."""
    cfg, seq, log, summary = r.cfg, r.cfg.data.seq_length, r.log, r.summary
    final = evaluate(r.chunks, r.eval_batches, seq)
    r.evals.append([cfg.train.steps, final])
    summary["final_eval_loss"] = final
    log(f"fine-tuned eval loss: {final:.4f}" + (f" (base {summary['base_eval_loss']:.4f})"
                                                if "base_eval_loss" in summary else ""))
    if cfg.job.max_new_tokens > 0:
        summary["answer_after"] = _answer(r.chunks, r.data, cfg)
        log(f"prompt: {r.data['prompt']!r}\n    fine-tuned model answers: {summary['answer_after']!r}"
            + (f" (reference {r.data['reference']!r})" if r.data["reference"] else ""))

    adapter_dir = os.path.join(cfg.job.output_dir, "adapter")
    r.peft_model.save_pretrained(adapter_dir)
    summary["adapter_dir"] = adapter_dir
    log(f"adapter saved: {adapter_dir}")
    hf_config = hf_config_of(r.chunks)
    if cfg.job.export_hf_peft and hf_config is not None:
        from .tools import export_peft_with_base

        hf_dir = os.path.join(cfg.job.output_dir, "hf_peft_adapter")
        export_peft_with_base(cfg, r.peft_model, hf_dir)
        summary["hf_peft_adapter_dir"] = hf_dir
        log(f"HF PEFT adapter exported: {hf_dir} (peft.AutoPeftModelForCausalLM.from_pretrained(that folder))")
    if cfg.job.merge_check:
        merged = r.peft_model.merge_and_unload()
        summary["merged_eval_loss"] = evaluate(merged if isinstance(merged, list) else [merged], r.eval_batches, seq)
        log(f"merged model eval loss: {summary['merged_eval_loss']:.4f} (with the adapter unmerged {final:.4f}, "
            f"difference {abs(summary['merged_eval_loss'] - final):.2e})")


def run(cfg: JobConfig) -> dict:
    """Runs the whole job on this rank; returns the summary (the same dict on every rank).

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
        meta = ckpt.load(resume_from, r.peft_model, r.optimizer, r.summary["layout"])
        start, r.history, r.evals = meta["step"], meta.get("history", []), meta.get("evals", [])
        r.grad_norms = meta.get("grad_norms", [])
        r.log(f"resumed from {resume_from} at step {start}")
    r.summary["steps"] = cfg.train.steps
    finished = _train(r, start)
    r.summary["finished"] = finished
    if finished:
        _after(r)
    r.summary["wall_seconds"] = time.time() - t0
    out = cfg.job.output_dir
    if dist.get_rank() == 0:
        if cfg.job.plot and finished:
            r.summary["plot"] = plot_losses(os.path.join(out, "loss_curve.png"), r.history, r.evals,
                                            r.summary.get("base_eval_loss"), r.summary.get("merged_eval_loss"))
            if r.summary["plot"]:
                r.log(f"loss curve: {r.summary['plot']}")
        _write_json(os.path.join(out, "summary.json"), r.summary)
    r.log(f"done in {r.summary['wall_seconds']:.1f}s; summary: {os.path.join(out, 'summary.json')}")
    return broadcast_object(r.summary)
