"""Megatron-LM's own ``pretrain_gpt.py``, with megalora's LoRA plugged in.

Megatron-LM's training package is not on PyPI: point ``MEGATRON_LM_PATH`` at a
checkout (tag ``core_v0.16.1`` matches megatron-core 0.16.1). This script then
runs that checkout's ``pretrain_gpt.py`` unchanged, after swapping
``megatron.training.pretrain`` for a wrapper that

* adds the ``--lora-*`` options to Megatron-LM's parser (after any the script
  adds itself),
* wraps the model provider so that LoRA is injected and the base frozen inside
  it, for every virtual pipeline chunk, before ``get_model`` wraps the model in
  Float16Module and DDP,
* installs the adapter-save hook (every checkpoint Megatron-LM saves also
  writes the adapter to ``--lora-save/iter_XXXXXXX``), and writes
  ``--lora-save/final`` when training ends.

Every other argument is Megatron-LM's. Example (one node, 8 GPUs, Llama-3-8B
converted to a Megatron distributed checkpoint in $BASE_CKPT)::

    MEGATRON_LM_PATH=$HOME/Megatron-LM torchrun --nproc_per_node 8 launch/pretrain_gpt_lora.py \\
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 \\
        --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 \\
        --group-query-attention --num-query-groups 8 --seq-length 4096 --max-position-embeddings 8192 \\
        --position-embedding-type rope --rotary-base 500000 --normalization RMSNorm --swiglu \\
        --untie-embeddings-and-output-weights --disable-bias-linear --bf16 \\
        --micro-batch-size 1 --global-batch-size 128 --train-iters 1000 --lr 1e-4 --min-lr 1e-5 \\
        --lr-decay-style cosine --lr-warmup-iters 50 --clip-grad 1.0 \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model meta-llama/Meta-Llama-3-8B \\
        --data-path $DATA --split 99,1,0 \\
        --load $BASE_CKPT --finetune --no-load-optim --no-load-rng --dist-ckpt-strictness log_all \\
        --save $RUN/ckpt --save-interval 200 \\
        --lora-r 16 --lora-alpha 32 --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 \\
        --lora-save $RUN/adapters

See launch/README.md for the Slurm form.
"""

from __future__ import annotations

import inspect
import os
import runpy
import sys


def _megatron_lm_path() -> str:
    path = os.environ.get("MEGATRON_LM_PATH")
    if not path or not os.path.isfile(os.path.join(path, "pretrain_gpt.py")):
        sys.exit("launch/pretrain_gpt_lora.py: set MEGATRON_LM_PATH to a Megatron-LM checkout (it must hold "
                 f"pretrain_gpt.py; got {path!r}), e.g. git clone -b core_v0.16.1 "
                 "https://github.com/NVIDIA/Megatron-LM")
    return os.path.abspath(path)


def plug_in(training_module) -> None:
    """Replaces ``training_module.pretrain`` by the LoRA wrapper (``megatron.training`` in practice)."""
    from megalora.integrations import megatron_lm as lora

    original = training_module.pretrain
    signature = inspect.signature(original)

    def pretrain(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        user_extra = bound.arguments.get("extra_args_provider")

        def extra_args_provider(parser):
            if user_extra is not None:
                parser = user_extra(parser)
            return lora.add_lora_args(parser)

        bound.arguments["extra_args_provider"] = extra_args_provider
        bound.arguments["model_provider"] = lora.lora_model_provider(bound.arguments["model_provider"])
        lora.install_save_hook()
        out = original(*bound.args, **bound.kwargs)
        from megatron.training import get_args

        if get_args().lora_save:
            lora.save_adapter(os.path.join(get_args().lora_save, "final"))
        return out

    training_module.pretrain = pretrain


def main() -> None:
    path = _megatron_lm_path()
    # pretrain_gpt.py imports gpt_builders and model_provider from its own folder.
    sys.path.insert(0, path)
    import megatron.training

    plug_in(megatron.training)
    sys.argv[0] = os.path.join(path, "pretrain_gpt.py")
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
