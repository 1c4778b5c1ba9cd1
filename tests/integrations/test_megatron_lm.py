"""The Megatron-LM plug-in (megalora.integrations.megatron_lm) with real megatron-core pieces.

Megatron-LM's training package is not on PyPI, so its ``get_model`` and
``train_step`` are re-enacted here with what they call from megatron-core: the
wrapped provider is called exactly as ``get_model`` calls it (keyword
arguments, once per virtual chunk, around ``pretrain_gpt.py``'s
``model_provider(model_builder, ...)`` and a builder with
``gpt_builders.gpt_builder``'s signature), each chunk is wrapped in
megatron-core's ``DistributedDataParallel``, and steps run through
``get_forward_backward_func`` with ``finalize_model_grads``. The arguments are
a real argparse namespace from a parser extended by ``add_lora_args``.

At PP=2 with 2 virtual chunks, three steps must match a world-size-1 run of the
same wrapped provider, the adapter must save and load back through
``--lora-save``/``--lora-load``, and the save hook must write an adapter next to
each checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import sys
import types

import torch

from tests.multirank import run_on_ranks

VOCAB, SEQ, MBS, MICRO, LAYERS = 128, 16, 2, 4, 4


def _parser() -> argparse.ArgumentParser:
    """A few of Megatron-LM's own options, then the plug-in's (as extra_args_provider adds them)."""
    from megalora.integrations.megatron_lm import add_lora_args

    p = argparse.ArgumentParser(prog="pretrain_gpt.py")
    p.add_argument("--num-layers", type=int, default=LAYERS)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    out = add_lora_args(p)
    assert out is p, "extra_args_provider must return the parser"
    return p


def _full_weight(name: str, shape) -> torch.Tensor:
    """A pretrained checkpoint's tensor, stood in for by a draw keyed on the global name."""
    from megalora.layers.base import init_generator

    if "layernorm" in name:
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    return torch.empty(shape).normal_(0, 0.05, generator=init_generator(7, name, "base"))


def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
    """``gpt_builders.gpt_builder``'s signature: a real megatron-core GPTModel, loaded from 'the checkpoint'."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megalora.sharding import param_shard_spec
    from megalora.hf.build import global_param_names

    config = config or TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        use_cpu_initialization=True, pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False)
    kwargs = {"vp_stage": vp_stage} if vp_stage is not None else {}
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                     pre_process=pre_process, post_process=post_process,
                     share_embeddings_and_output_weights=False, **kwargs)
    rank, world = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    names = global_param_names(model)
    with torch.no_grad():
        for local, param in model.named_parameters():
            spec = param_shard_spec(param)
            shape = list(param.shape)
            if spec.sharded:
                shape[spec.dim] *= world
            param.copy_(spec.local(_full_weight(names[local], shape), rank, world))
    return model


def model_provider(model_builder, pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):
    """pretrain_gpt.py's ``partial(model_provider, gpt_builder)`` shape."""
    return model_builder(model_builder.args, pre_process, post_process, vp_stage, config=config,
                         pg_collection=pg_collection)


def _get_model(provider, vp_size):
    """What Megatron-LM's ``get_model`` does before DDP: one provider call per chunk, keywords only."""
    from megatron.core import parallel_state as ps

    first, last = ps.is_pipeline_first_stage(ignore_virtual=True), ps.is_pipeline_last_stage(ignore_virtual=True)
    if not vp_size:
        return [provider(pre_process=first, post_process=last, config=None, pg_collection=None)]
    return [provider(pre_process=first and i == 0, post_process=last and i == vp_size - 1, vp_stage=i,
                     config=None, pg_collection=None) for i in range(vp_size)]


def _batches():
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(MICRO):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def _step(chunks, params, optimizer, ddp: bool) -> float:
    """Megatron-LM's train_step, reduced: zero, schedule (+ finalize_model_grads), optimizer step."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pos = torch.arange(SEQ).expand(MBS, SEQ)

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        out = model(tokens, pos, None, labels=labels)
        return out, lambda o: (o.float().mean(), {"lm loss": o.float().mean().detach()})

    for chunk in chunks:
        if ddp:
            chunk.zero_grad_buffer()
    optimizer.zero_grad()
    iters = [iter(_batches()) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0], model=chunks,
        num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
    if ddp:
        for p in params:
            p.grad = p.main_grad
    optimizer.step()
    loss = torch.tensor([sum(d["lm loss"].item() for d in losses) / MICRO if ps.is_pipeline_last_stage() else 0.0])
    torch.distributed.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())  # the last stage's, everywhere
    return loss.item()


def _adapter_files(path):
    from megalora.checkpoint import read_adapter_tensors

    return read_adapter_tensors(path)


def _body(root: str) -> dict:
    import megalora
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    from megalora.integrations import megatron_lm as plugin
    from megalora.layers import LoraLayer
    from megalora.parallel_start import destroy_parallel

    argv = ["--lora-r", "4", "--lora-alpha", "8", "--lora-init", "false",
            "--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2",
            "--lora-rank-pattern", "linear_fc2=2", "--lora-save", os.path.join(root, "adapters")]
    out = {}

    # World size 1 (each rank alone, as its own data-parallel replica).
    megalora.init_parallel(1, 1, seed=99)
    args = _parser().parse_args(argv)
    gpt_builder.args = args
    provider = plugin.lora_model_provider(functools.partial(model_provider, gpt_builder), args)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        chunks = _get_model(provider, None)
    out["ref_printed"] = printed.getvalue()
    params = [p for c in chunks for p in c.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    out["ref_losses"] = [_step(chunks, params, opt, ddp=False) for _ in range(3)]
    plugin.save_adapter(os.path.join(root, "ref"))
    destroy_parallel()

    # PP=2 with 2 virtual chunks, DDP + finalize_model_grads, as Megatron-LM trains.
    megalora.init_parallel(1, 2, virtual_pipeline_model_parallel_size=2, seed=5)
    args = _parser().parse_args([*argv, "--virtual-pipeline-model-parallel-size", "2"])
    gpt_builder.args = args
    provider = plugin.lora_model_provider(functools.partial(model_provider, gpt_builder), args)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        chunks = _get_model(provider, 2)
    out["pp_printed"] = printed.getvalue()
    out["lora_layers_per_chunk"] = [sum(isinstance(m, LoraLayer) for m in c.modules()) for c in chunks]
    out["frozen_ok"] = all(p.requires_grad == (".lora_" in n) for c in chunks for n, p in c.named_parameters())
    trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    ddp = [DistributedDataParallel(c.config, DistributedDataParallelConfig(), c) for c in chunks]
    out["ddp_buffer_numel_ok"] = sum(
        buf.numel_unpadded for d in ddp for buf in d.buffers) == trainable
    for d in ddp:
        d.config.finalize_model_grads_func = finalize_model_grads
    params = [p for d in ddp for p in d.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    out["pp_losses"] = [_step(ddp, params, opt, ddp=True) for _ in range(3)]

    # The save hook, on a stand-in for megatron.training (not on PyPI): each save also writes the adapter.
    calls = []
    training = types.ModuleType("megatron.training.training")
    training.save_checkpoint = lambda iteration, *a, **k: calls.append(iteration)
    package = types.ModuleType("megatron.training")
    package.training = training
    package.get_args = lambda: args
    saved = {k: sys.modules.get(k) for k in ("megatron.training", "megatron.training.training")}
    sys.modules.update({"megatron.training": package, "megatron.training.training": training})
    try:
        plugin.install_save_hook()
        training.save_checkpoint(20, ddp, opt, None, 0)
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module
    out["hook_calls"] = calls

    # --lora-load: a fresh build starts from the saved adapter.
    args.lora_load = os.path.join(root, "adapters", "iter_0000020")
    gpt_builder.args = args
    _get_model(plugin.lora_model_provider(functools.partial(model_provider, gpt_builder), args), 2)
    plugin.save_adapter(os.path.join(root, "reloaded"))
    return out


def test_plugin_pp2_vpp2_matches_world_size_one(tmp_path):
    results = run_on_ranks(2, _body, str(tmp_path), timeout_s=600)
    r = results[0]
    assert results[1]["pp_losses"] == r["pp_losses"]
    # 4 targets on each of 1 layer per chunk per stage.
    assert r["lora_layers_per_chunk"] == [4, 4] and results[1]["lora_layers_per_chunk"] == [4, 4]
    assert r["frozen_ok"] and results[1]["frozen_ok"], "a base parameter is trainable, or a LoRA one frozen"
    assert r["ddp_buffer_numel_ok"], "DDP allocated gradient buffers beyond the adapter"
    # The plug-in prints the adapter's trainable count once (rank 0), global: the same at PP=2/VPP=2 as alone.
    assert results[1]["pp_printed"] == "" and r["pp_printed"].count("trainable params:") == 1, r["pp_printed"]
    count = r["ref_printed"].split("trainable params: ")[1].split()[0]
    assert f"trainable params: {count} " in r["pp_printed"], (r["ref_printed"], r["pp_printed"])
    for step, (a, b) in enumerate(zip(r["pp_losses"], r["ref_losses"])):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: PP=2/VPP=2 loss {a} vs world size 1 {b}"
    assert r["ref_losses"][-1] < r["ref_losses"][0]
    assert r["hook_calls"] == [20]
    assert (tmp_path / "adapters" / "latest").read_text() == "iter_0000020"
    ref, pp = _adapter_files(tmp_path / "ref"), _adapter_files(tmp_path / "adapters" / "iter_0000020")
    assert ref.keys() == pp.keys() and len(ref) == 4 * LAYERS * 2
    assert pp["base_model.model.decoder.layers.3.mlp.linear_fc2.lora_A.weight"].shape[0] == 2  # rank_pattern
    for key in ref:
        assert (ref[key] - pp[key]).abs().max() <= 5e-5, key
    reloaded = _adapter_files(tmp_path / "reloaded")
    assert all(torch.equal(reloaded[k], pp[k]) for k in pp), "--lora-load did not restore the adapter"


def test_lora_args_to_config():
    from megalora.integrations.megatron_lm import lora_config_from_args

    args = _parser().parse_args(["--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0.1",
                                 "--lora-target-modules", "linear_qkv", "linear_fc2",
                                 "--lora-rank-pattern", '{"linear_fc2": 4}',
                                 "--lora-alpha-pattern", "linear_fc2=8,linear_qkv=64", "--lora-init", "gaussian",
                                 "--lora-use-rslora", "--lora-layers-to-transform", "0", "2"])
    cfg = lora_config_from_args(args)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.1)
    assert cfg.target_modules == {"linear_qkv", "linear_fc2"}
    assert cfg.rank_pattern == {"linear_fc2": 4} and cfg.alpha_pattern == {"linear_fc2": 8, "linear_qkv": 64}
    assert cfg.init_lora_weights == "gaussian" and cfg.use_rslora and cfg.layers_to_transform == [0, 2]
    defaults = lora_config_from_args(_parser().parse_args([]))
    assert defaults.target_modules == {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
    assert defaults.init_lora_weights is True
    every = lora_config_from_args(_parser().parse_args(["--lora-target-modules", "all-linear"]))
    assert every.target_modules == "all-linear"
