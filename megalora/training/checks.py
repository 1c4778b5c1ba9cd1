"""The job config's checks: every value that can be judged without the model, each error naming the key and the fix.

:func:`check` runs when a config loads (in the CLI's parent and on every
rank alike, before any collective); :func:`check_batch_sizes` once the world
size is known.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .config import JobConfig


def _need(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {problem}; {fix}")


def check(cfg: JobConfig, world_size: Optional[int] = None) -> None:
    """Checks values that do not need the model; with ``world_size``, also the layout.

    Raises:
        ValueError: Naming the key and the fix.
    """
    m, p, t, d = cfg.model, cfg.parallel, cfg.train, cfg.data
    _need(m.source in ("gpt", "hf"), "model.source", f"got {m.source!r}", "use 'gpt' or 'hf'")
    _need(m.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"got {m.dtype!r}",
          "use float32, bfloat16 or float16")
    _need(m.transformer_impl in ("local", "transformer_engine"), "model.transformer_impl",
          f"got {m.transformer_impl!r}", "use 'local' or 'transformer_engine'")
    for key in ("tp", "pp"):
        value = getattr(p, key)
        _need(isinstance(value, int) and value >= 1, f"parallel.{key}", f"got {value!r}", "use an integer >= 1")
    if p.vpp is not None:
        _need(isinstance(p.vpp, int) and p.vpp >= 2 and p.pp >= 2, "parallel.vpp",
              f"got {p.vpp!r} with parallel.pp={p.pp}", "use null, or an integer >= 2 together with parallel.pp >= 2")
    _need(not p.sp or p.tp > 1, "parallel.sp", "sequence parallelism needs tensor parallelism",
          "set parallel.tp >= 2 or parallel.sp=false")
    _check_moe(cfg)
    _need(t.eval_micro_batch_size is None or t.eval_micro_batch_size >= 1, "train.eval_micro_batch_size",
          f"got {t.eval_micro_batch_size!r}", "use null or an integer >= 1")
    for key in ("steps", "micro_batch_size", "global_batch_size"):
        value = getattr(t, key)
        _need(isinstance(value, int) and value >= 1, f"train.{key}", f"got {value!r}", "use an integer >= 1")
    _need(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
          f"{t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}",
          "make it one")
    _need(t.lr > 0 and 0 <= t.min_lr <= t.lr, "train.lr", f"lr={t.lr}, min_lr={t.min_lr}",
          "use lr > 0 and 0 <= min_lr <= lr")
    _need(isinstance(t.warmup_steps, int) and t.warmup_steps >= 0, "train.warmup_steps", f"got {t.warmup_steps!r}",
          "use an integer >= 0")
    _need(t.optimizer in ("adamw", "sgd"), "train.optimizer", f"got {t.optimizer!r}", "use 'adamw' or 'sgd'")
    _need(t.clip_grad >= 0, "train.clip_grad", f"got {t.clip_grad}", "use 0 (off) or a positive norm")
    _need(not t.bf16 or m.dtype in ("float32", "bfloat16"), "train.bf16", f"true with model.dtype={m.dtype}",
          "train.bf16 builds the model in bfloat16; set model.dtype to bfloat16 (or float32), or train.bf16=false")
    _need(not (t.distributed_optimizer and cfg.job.record_grads), "job.record_grads",
          "the distributed optimizer keeps only this rank's shard of the reduced grads",
          "set train.distributed_optimizer=false to record gradients")
    _need(d.task == "instruct", "data.task", f"got {d.task!r}", "the only task is 'instruct'")
    _need(d.seq_length >= 8, "data.seq_length", f"got {d.seq_length}", "use 8 or more")
    if p.sp:
        _need(d.seq_length % p.tp == 0, "data.seq_length", f"{d.seq_length} is not a multiple of parallel.tp={p.tp}",
              "sequence parallelism splits the sequence across TP ranks; round it up")
    if m.source == "gpt":
        _check_gpt_shape(cfg)
    if world_size is not None:
        check_batch_sizes(cfg, world_size)
    cfg.lora_config()  # raises LoraConfig's own named errors


def _check_moe(cfg: JobConfig) -> None:
    """Mixture-of-experts fields against each other and the layout."""
    m, p = cfg.model, cfg.parallel
    for key in ("ep", "etp"):
        value = getattr(p, key)
        _need(value is None and key == "etp" or isinstance(value, int) and value >= 1, f"parallel.{key}",
              f"got {value!r}", "use an integer >= 1" + (" or null" if key == "etp" else ""))
    experts = m.num_moe_experts
    if experts is None:
        _need(p.ep == 1, "parallel.ep", f"{p.ep} with no experts", "set model.num_moe_experts, or parallel.ep=1")
        return
    _need(isinstance(experts, int) and experts >= 1 and experts % p.ep == 0, "model.num_moe_experts",
          f"{experts!r} does not split over parallel.ep={p.ep}", "use a multiple of parallel.ep")
    _need(1 <= m.moe_router_topk <= experts, "model.moe_router_topk", f"{m.moe_router_topk} with {experts} experts",
          "use 1 <= moe_router_topk <= num_moe_experts")
    _need(m.moe_token_dispatcher_type in ("alltoall", "allgather"), "model.moe_token_dispatcher_type",
          f"got {m.moe_token_dispatcher_type!r}", "use 'alltoall' or 'allgather'")
    _need(p.tp == 1 or p.sp, "parallel.sp", "megatron-core needs sequence parallelism for experts under TP > 1",
          "set parallel.sp=true")


def _check_gpt_shape(cfg: JobConfig) -> None:
    """A random GPT's shape against the layout (megatron-core would fail later, on every rank, less clearly)."""
    m, p = cfg.model, cfg.parallel
    groups = m.num_query_groups or m.num_attention_heads
    for key, value in (("num_attention_heads", m.num_attention_heads), ("num_query_groups", groups),
                       ("ffn_hidden_size", m.ffn_hidden_size or 4 * m.hidden_size)):
        _need(value % p.tp == 0, f"model.{key}", f"{value} is not divisible by parallel.tp={p.tp}",
              "choose a tensor-parallel size that divides it")
    _check_qalora_groups(cfg)
    chunks = p.pp * (p.vpp or 1)
    _need(m.num_layers % chunks == 0, "model.num_layers",
          f"{m.num_layers} layers do not split into parallel.pp x parallel.vpp = {chunks} equal chunks",
          "make num_layers a multiple of it")


def _check_qalora_groups(cfg: JobConfig) -> None:
    """QALoRA's groups against a GPT's row-parallel input shards, in the parent, before any rank starts.

    The same rule the layers check (:class:`~megalora.layers.variants.QaLora`);
    only the GPT's ``linear_proj`` and ``linear_fc2`` see a sharded input.
    """
    lora, m, tp = cfg.lora, cfg.model, cfg.parallel.tp
    if not lora.get("use_qalora"):
        return
    g = lora.get("qalora_group_size", 16)
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    targets = lora.get("target_modules")
    for layer, size in (("linear_proj", m.hidden_size), ("linear_fc2", ffn)):
        if targets != "all-linear" and layer not in (targets or ()):
            continue
        fits = [t for t in range(1, size // g + 1) if size % (t * g) == 0]
        _need(size % (tp * g) == 0, "lora.qalora_group_size",
              f"{g} does not divide {layer}'s input shard {size}/parallel.tp={tp}",
              f"use parallel.tp in {fits} or a group size dividing {size // tp}")


def data_parallel_size(cfg: JobConfig, world_size: int) -> int:
    mp = cfg.model_parallel_size()
    if world_size % mp:
        raise ValueError(f"parallel.tp x parallel.pp = {mp} does not divide the world size {world_size}; "
                         f"launch a multiple of {mp} processes (e.g. --nproc {mp})")
    least = cfg.min_world_size()
    if world_size % least:
        raise ValueError(f"parallel.ep x expert-TP x parallel.pp does not fit the world size {world_size}; "
                         f"launch a multiple of {least} processes (e.g. --nproc {least})")
    return world_size // mp


def check_batch_sizes(cfg: JobConfig, world_size: int) -> None:
    """Checks batch sizes against the data-parallel size the world size implies."""
    t = cfg.train
    dp = data_parallel_size(cfg, world_size)
    per_rank = t.micro_batch_size * dp
    _need(t.global_batch_size % per_rank == 0, "train.global_batch_size",
          f"{t.global_batch_size} is not a multiple of micro_batch_size x data-parallel size = "
          f"{t.micro_batch_size} x {dp}", "adjust train.global_batch_size or train.micro_batch_size")
    micro = t.global_batch_size // per_rank
    if cfg.parallel.vpp:
        _need(micro % cfg.parallel.pp == 0, "train.global_batch_size",
              f"the interleaved schedule needs the micro-batches per step ({micro}) to be a multiple of "
              f"parallel.pp={cfg.parallel.pp}", "raise train.global_batch_size or lower train.micro_batch_size")
