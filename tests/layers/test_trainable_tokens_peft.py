"""Trainable tokens on a plain model against HF PEFT 0.21's ``TrainableTokensLayer``: outputs, gradients, files."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import megalora  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
VOCAB, DIM = 40, 12


class TinyLM(nn.Module):
    """An embedding, one MLP block and an untied head, as PEFT sees a causal LM."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, 2 * DIM)
        self.fc2 = nn.Linear(2 * DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, ids):
        h = self.embed_tokens(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.lm_head(h)


CONFIGS = {
    "list": dict(trainable_token_indices=[3, 0, 39, 17]),
    "dict": dict(trainable_token_indices={"embed_tokens": [5, 1], "lm_head": [2, 38, 7]}),
}


def _pair(spec: dict):
    torch.manual_seed(0)
    base = TinyLM()
    kwargs = dict(r=2, lora_alpha=4, target_modules=["fc1"], **spec)
    ours = megalora.get_peft_model(copy.deepcopy(base), megalora.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    # Move every adapter tensor (token rows, LoRA B from zero) and copy it across by its (shared) name.
    gen = torch.Generator().manual_seed(1)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                assert name in mine, f"{name} missing in megalora (have {sorted(mine)})"
                mine[name].add_(0.3 * torch.randn(param.shape, generator=gen))
                param.copy_(mine[name])
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    return ours, theirs, base


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trainable_tokens_match_peft(tmp_path, name):
    ours, theirs, base = _pair(CONFIGS[name])
    ids = torch.tensor([[3, 0, 39, 17, 5, 1, 2, 38, 7, 4, 3, 3]])
    out, ref = ours(ids), theirs(ids)
    # Same rows, same ops: the embedding side is exact; the head's replaced logits are
    # one small matmul instead of a column of the big one (float32 rounding).
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-5, msg=f"gradient of {n}")
    # Files: the same keys and values.
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = load_file(os.path.join(tmp_path, "ours", "adapter_model.safetensors"))
    b = load_file(os.path.join(tmp_path, "theirs", "adapter_model.safetensors"))
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    assert any(k.endswith("token_adapter.trainable_tokens_delta") for k in a), sorted(a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Each loads the other's file; merging writes the rows into the table.
    with torch.no_grad():
        loaded = megalora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
        torch.testing.assert_close(loaded(ids), ref, rtol=0, atol=1e-6)
        merged = ours.merge_and_unload()
        assert type(merged.embed_tokens) is nn.Embedding
        torch.testing.assert_close(merged(ids), ref, rtol=0, atol=1e-5)


def test_unknown_module_name_is_one_line_error():
    with pytest.raises(ValueError, match=r"trainable_token_indices: \['embed'\] matched no module"):
        megalora.get_peft_model(TinyLM(), megalora.LoraConfig(target_modules=["fc1"],
                                                               trainable_token_indices={"embed": [1]}))


def test_out_of_vocabulary_id_is_one_line_error():
    with pytest.raises(ValueError, match=r"ids \[40\] are outside the vocabulary \[0, 40\) of embed_tokens"):
        megalora.get_peft_model(TinyLM(), megalora.LoraConfig(target_modules=["fc1"],
                                                               trainable_token_indices=[1, 40]))
