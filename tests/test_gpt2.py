"""Hugging Face GPT-2 (Conv1D on [B*T, d], causal attention, tied wte/lm_head) against the
vmap reference, in float64, for every norm mode and both clippings and reductions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import bkfx
from bkfx.testing import assert_matches_reference

transformers.logging.set_verbosity_error()

VOCAB = 50


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, use_cache=False,
    )
    return GPT2LMHeadModel(config).double()


def lm_loss(reduction: str):
    def loss_fn(out, y):
        return F.cross_entropy(out.logits.reshape(-1, VOCAB), y.reshape(-1), reduction=reduction)

    return loss_fn


@pytest.mark.parametrize(
    "norm_mode, clipping, loss_reduction, max_grad_norm, batch, seq",
    [
        ("auto", "abadi", "mean", 0.1, 3, 10),
        ("ghost", "automatic", "sum", 1.0, 2, 7),
        ("explicit", "abadi", "sum", 100.0, 4, 5),  # no sample is clipped
        ("auto", "automatic", "mean", 0.5, 1, 12),
        ("ghost", "abadi", "mean", 0.05, 5, 3),
        ("explicit", "automatic", "mean", 0.1, 3, 16),
    ],
)
def test_gpt2_matches_reference(norm_mode, clipping, loss_reduction, max_grad_norm, batch, seq):
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    g = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    targets = torch.randint(0, VOCAB, (batch, seq), generator=g)
    dp, errors = assert_matches_reference(
        model, lm_loss(loss_reduction), ids, targets, max_grad_norm=max_grad_norm, clipping=clipping,
        loss_reduction=loss_reduction, norm_mode=norm_mode,
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(errors) == trainable and "transformer.wte.weight" in errors
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(dp(ids).logits, model(ids).logits)
    # the tied weight is used at two sites: the embedding gather and the output head
    tied = [r for r in dp.plan() if "transformer.wte.weight" in r["params"]]
    assert len({r["site"] for r in tied}) == 2


def test_gpt2_one_capture_for_several_batch_sizes():
    model = gpt2()
    dp = bkfx.compile(model, max_grad_norm=0.2, loss_reduction="sum")
    g = torch.Generator().manual_seed(0)
    for b in (3, 1, 6):
        ids = torch.randint(0, VOCAB, (b, 8), generator=g)
        with torch.no_grad():
            assert torch.equal(dp(ids).logits, model(ids).logits)
    assert dp.capture_count == 1
