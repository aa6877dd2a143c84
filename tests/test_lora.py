"""LoRA: only the adapters train, and frozen weights cost no norm work — the plan's sites hold adapter
parameters only — with `.grad` and the per-sample norms exact against the vmap reference in float64.
A tiny LoRA module, and peft's LoRA on Hugging Face GPT-2."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bkfx
from bkfx.testing import assert_matches_reference


class LoRALinear(nn.Module):
    """`y = x Wᵀ + b + (α/r) x Aᵀ Bᵀ`, W and b frozen, A: [r, d] and B: [p, r] trained."""

    def __init__(self, base: nn.Linear, r: int = 2, alpha: float = 4.0):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) * 0.1)  # nonzero: B = 0 would zero A's gradient

    def forward(self, x):
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


class TinyTransformerBlock(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 8, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q, self.v = LoRALinear(nn.Linear(d, d)), LoRALinear(nn.Linear(d, d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        for module in (self.emb, self.norm, self.head):
            module.requires_grad_(False)

    def forward(self, ids):
        h = self.emb(ids)
        attn = torch.softmax(self.q(h) @ h.transpose(1, 2) / math.sqrt(h.shape[-1]), dim=-1)
        return self.head(self.norm(h + attn @ self.v(h)).mean(1))


@pytest.mark.parametrize("norm_mode", ["auto", "ghost", "explicit"])
def test_tiny_lora_trains_only_adapters_exactly(norm_mode):
    torch.manual_seed(0)
    model = TinyTransformerBlock().double()
    adapters = {n for n, p in model.named_parameters() if "lora_" in n}
    assert adapters == {n for n, p in model.named_parameters() if p.requires_grad}
    ids, y = torch.randint(0, 16, (5, 7)), torch.randint(0, 3, (5,))
    dp, errors = assert_matches_reference(model, nn.CrossEntropyLoss(), ids, y, max_grad_norm=0.05, norm_mode=norm_mode)
    assert set(errors) == adapters
    site_params = {name for row in dp.plan() for name in row["params"]}
    assert site_params == adapters  # the frozen embedding, base weights, norm and head are no site
    explained = dp.explain()
    assert "q.lora_A" in explained and "q.base.weight" not in explained and "head.weight" not in explained
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in adapters), n


def test_peft_lora_on_gpt2_trains_only_adapters_exactly():
    import peft
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    V = 20
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=V, n_positions=8, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        use_cache=False))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], lora_dropout=0.0,
                             fan_in_fan_out=True, init_lora_weights=False)  # random B: adapters get gradients
    model = peft.get_peft_model(gpt2, config).double()
    base = model.get_base_model()  # peft injects the adapters here; compile it (bkfx.integrations.transformers does)
    adapters = {n for n, p in base.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)

    def loss_fn(out, y):
        return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())

    class Logits(nn.Module):  # passes use_cache=False (HF's cache is not a tensor output)
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False)

    ids, y = torch.randint(0, V, (4, 6)), torch.randint(0, V, (4, 6))
    dp, errors = assert_matches_reference(Logits(base), loss_fn, ids, y, max_grad_norm=0.1)
    assert set(errors) == {"lm." + n for n in adapters}
    assert {name for row in dp.plan() for name in row["params"]} == {"lm." + n for n in adapters}
    for n, p in base.named_parameters():
        assert (p.grad is not None) == (n in adapters), n
