"""Tests of megalora.parallel_start on real megatron-core, on CPU through megalora.cpu_compat.

The megatron checks compare every parallel layout against the world-size-1
result for the same seed: with ``use_cpu_initialization=True`` Megatron draws
each full master weight and slices it, so TP=1, TP=2 and TP=2+SP start from
the same weights and must give the same loss.
"""

from __future__ import annotations

import os

import pytest
import torch

from megalora import cpu_compat, lora_seed, parallel_start
from tests import procs
from tests.multirank import run_on_ranks

VOCAB, HIDDEN, HEADS, SEQ, MBS = 128, 64, 4, 16, 2


def _rng_fork_and_seed():
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    parallel_start.init_parallel(tensor_model_parallel_size=2, seed=7)
    assert cpu_compat.is_active() and lora_seed.lora_init_seed() == 7
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # default state restored
    expected = torch.rand(4, generator=torch.Generator().manual_seed(
        7 + 2718 + ps.get_tensor_model_parallel_rank()))
    assert torch.equal(forked, expected)
    with get_cuda_rng_tracker().fork():  # the forked stream continues
        again = torch.rand(4)
    assert not torch.equal(again, forked)
    return forked


def test_rng_tracker_on_cpu():
    a, b = run_on_ranks(2, _rng_fork_and_seed)
    assert not a.equal(b)  # each TP rank has its own model-parallel stream


def _init_errors():
    with pytest.raises(ValueError, match="tensor_model_parallel_size=3"):
        parallel_start.init_parallel(tensor_model_parallel_size=3)
    parallel_start.init_parallel(tensor_model_parallel_size=2)
    parallel_start.init_parallel(tensor_model_parallel_size=1)  # a different layout replaces it
    from megatron.core import parallel_state as ps

    assert ps.get_tensor_model_parallel_world_size() == 1
    parallel_start.destroy_parallel()
    return parallel_start.is_initialized()


def test_init_parallel_checks_and_reinit():
    assert run_on_ranks(2, _init_errors) == [False, False]


def _linear_layers(sequence_parallel):
    import torch.distributed as dist
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    parallel_start.init_parallel(tensor_model_parallel_size=2, seed=3)
    rank = dist.get_rank()
    cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True,
                              sequence_parallel=sequence_parallel)
    def init(w):
        return torch.nn.init.normal_(w, std=0.1)

    col = ColumnParallelLinear(16, 32, config=cfg, init_method=init, bias=True,
                               gather_output=not sequence_parallel)
    row = RowParallelLinear(32, 16, config=cfg, init_method=init, bias=True,
                            input_is_parallel=sequence_parallel, skip_bias_add=False)
    with torch.no_grad():
        col.bias.normal_(std=0.1)
        row.bias.normal_(std=0.1)

    def full(weight, dim):
        parts = [torch.empty_like(weight) for _ in range(2)]
        dist.all_gather(parts, weight.detach().contiguous())
        return torch.cat(parts, dim)

    w1, b1, w2 = full(col.weight, 0), full(col.bias, 0), full(row.weight, 1)
    x = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(0))
    ref_x = x.clone().requires_grad_()
    ref = torch.nn.functional.linear(torch.nn.functional.linear(ref_x, w1, b1), w2, row.bias)
    ref.square().sum().backward()

    local_x = (x.chunk(2, 0)[rank] if sequence_parallel else x).clone().requires_grad_()
    hidden, _ = col(local_x)
    out, _ = row(hidden)
    expected = ref.chunk(2, 0)[rank] if sequence_parallel else ref
    torch.testing.assert_close(out, expected.detach())
    out.square().sum().backward()
    expected_grad = ref_x.grad.chunk(2, 0)[rank] if sequence_parallel else ref_x.grad
    if not sequence_parallel:  # each rank's input grad covers only its own share of the loss
        dist.all_reduce(local_x.grad)
        expected_grad = 2 * expected_grad
    torch.testing.assert_close(local_x.grad, expected_grad)
    return out.shape


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp_linear_layers_on_cpu(sequence_parallel):
    shapes = run_on_ranks(2, _linear_layers, sequence_parallel)
    assert shapes[0][0] == (4 if sequence_parallel else 8)


# ---- tiny GPTModel ---------------------------------------------------------


class _SPLayerNorm(torch.nn.LayerNorm):
    """Torch LayerNorm that accepts SP; the local spec's WrappedTorchNorm refuses it."""

    def __init__(self, config, hidden_size, eps=1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():  # marks the TP-partial grads that need a sum
            p.sequence_parallel = config.sequence_parallel


def _gpt(tp=1, pp=1, vpp=None, layers=2, sp=False, dropout=0.0, vp_stage=None):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules, get_num_layers_to_build)

    cfg = TransformerConfig(
        num_layers=layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
        use_cpu_initialization=True, attention_dropout=dropout, hidden_dropout=dropout,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sp,
        pipeline_dtype=torch.float32, params_dtype=torch.float32)
    spec = get_gpt_layer_local_spec()
    if sp:
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = _SPLayerNorm
        spec = TransformerBlockSubmodules(
            layer_specs=[spec] * get_num_layers_to_build(cfg, vp_stage), layer_norm=_SPLayerNorm)
    first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                    pre_process=first, post_process=last, vp_stage=vp_stage)


def _batch(i=0):

    g = torch.Generator().manual_seed(100 + i)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
    pos = torch.arange(SEQ).expand(MBS, SEQ)
    return tokens[:, :-1].contiguous(), pos, tokens[:, 1:].contiguous()


def _loss_and_grads(model):
    tokens, pos, labels = _batch()
    loss = model(tokens, pos, None, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _gpt_tp(sp):
    from megatron.core import parallel_state as ps

    parallel_start.init_parallel(1, 1, seed=11)
    ref_loss, ref_grads = _loss_and_grads(_gpt())
    parallel_start.init_parallel(2, 1, seed=11)
    model = _gpt(tp=2, sp=sp)
    loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    tp_rank, group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    for name, p in model.named_parameters():
        grad, ref = grads[name], ref_grads[name]
        if getattr(p, "tensor_model_parallel", False):
            ref = ref.chunk(2, p.partition_dim)[tp_rank]
        elif getattr(p, "sequence_parallel", False):  # partial over the sequence shards
            torch.distributed.all_reduce(grad, group=group)
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5, msg=name)

    # Dropout 0.1 exercises the RNG tracker's fork (attention dropout).
    parallel_start.init_parallel(2, 1, seed=11)
    drop = _gpt(tp=2, sp=sp, dropout=0.1)
    first, _ = _loss_and_grads(drop)
    parallel_start.init_parallel(2, 1, seed=11)
    second, _ = _loss_and_grads(_gpt(tp=2, sp=sp, dropout=0.1))
    assert torch.isfinite(first) and torch.equal(first, second) and first != loss
    return loss.item()


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_gpt_tp2_matches_single_rank(sp):
    a, b = run_on_ranks(2, _gpt_tp, sp)
    assert a == b


def _gpt_pipeline(vpp):
    """Runs Megatron's schedule at PP=2 (1F1B, or interleaved with VPP=2)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    layers, n_micro = (4 if vpp else 2), 4
    parallel_start.init_parallel(1, 1, seed=5)
    ref_model = _gpt(layers=layers)
    ref_losses = []
    for i in range(n_micro):
        tokens, pos, labels = _batch(i)
        ref_losses.append(ref_model(tokens, pos, None, labels=labels).mean().item())
    ref_state = ref_model.state_dict()

    parallel_start.init_parallel(1, 2, virtual_pipeline_model_parallel_size=vpp, seed=5)
    chunks = [_gpt(pp=2, vpp=vpp, layers=layers, vp_stage=v if vpp else None)
              for v in range(vpp or 1)]
    for chunk in chunks:  # load the reference weights by global layer number
        state = {}
        for name in chunk.state_dict():
            src = name
            if name.startswith("decoder.layers."):
                idx, rest = name[len("decoder.layers."):].split(".", 1)
                number = chunk.decoder.layers[int(idx)].layer_number
                src = f"decoder.layers.{number - 1}.{rest}"
            elif name == "output_layer.weight" and src not in ref_state:
                src = "embedding.word_embeddings.weight"  # tied copy on the last stage
            state[name] = ref_state[src]
        chunk.load_state_dict(state)

    # One iterator per chunk: each chunk walks the micro-batches in order.
    iters = [iter([_batch(i) for i in range(n_micro)]) for _ in chunks]

    def step(data_iterator, model):
        tokens, pos, labels = next(data_iterator)
        out = model(tokens, pos, None, labels=labels)
        return out, lambda o: (o.mean(), {"loss": o.mean().detach()})

    losses = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iters if vpp else iters[0],
        model=chunks, num_microbatches=n_micro, seq_length=SEQ, micro_batch_size=MBS,
        forward_only=False)
    if ps.is_pipeline_last_stage():
        got = [d["loss"].item() for d in losses]
        assert got == pytest.approx(ref_losses, rel=1e-5), (got, ref_losses)
    grads = [p.grad for c in chunks for p in c.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    return len(losses)


@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved-vpp2"])
def test_pipeline_schedule_pp2(vpp):
    assert run_on_ranks(2, _gpt_pipeline, vpp) == [0, 4]


def _shutdown_keeps_a_world_it_did_not_start():
    import torch.distributed as dist

    parallel_start.init_distributed()  # the pool's group exists: nothing started
    parallel_start.shutdown_distributed()
    return dist.is_initialized()


def test_shutdown_ends_only_the_groups_it_started(tmp_path):
    """A launched job destroys the process groups it started before exit; a harness's group is left alone."""
    import subprocess
    import sys

    assert run_on_ranks(2, _shutdown_keeps_a_world_it_did_not_start) == [True, True]
    code = ("import torch.distributed as dist; from megalora import parallel_start as P; P.init_distributed(); "
            "P.init_parallel(1, 1); assert dist.is_initialized(); P.shutdown_distributed(); "
            "assert not dist.is_initialized(); P.shutdown_distributed(); print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(env, PYTHONPATH=root),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def _threads_over_reinits(cycles: int) -> list[int]:
    """Gloo socket threads after each init/model/forward/destroy cycle, the model dropped each time."""
    from tests.gpt_utils import SEQ, build_gpt, causal_mask, gpt_config, position_ids

    counts = []
    for _ in range(cycles):
        parallel_start.init_parallel(tensor_model_parallel_size=2, seed=1)
        model = build_gpt(gpt_config(tp=2), rope=True)  # rope: megatron's cached RotaryEmbedding.forward
        model(torch.zeros(1, SEQ, dtype=torch.long), position_ids(), causal_mask())
        model.held_by = [model]  # a reference cycle, as a trainer's hooks and optimizer make: freed only by gc
        del model
        parallel_start.destroy_parallel()
        counts.append(procs.gloo_threads())
    return counts


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_reinit_frees_the_destroyed_groups_threads():
    """Each gloo group runs a socket thread that wakes 100 times a second; destroyed groups must not pile up.

    A model's modules (reference cycles) and megatron's ``RotaryEmbedding.forward`` lru_cache keep destroyed
    groups alive: without the release in destroy_parallel each cycle here leaves ~30 more threads.
    """
    for counts in run_on_ranks(2, _threads_over_reinits, 3):
        assert counts[-1] == counts[0], counts
