"""Crashes and wrong refusals found by the second soundness pass, each fixed: DeBERTa-v2's relative
attention (a parameter operand repeated to the batch) matches the reference; a complex trainable
parameter is refused at capture (its real and imaginary parts as real parameters work); an HF model
computing its loss inside (called with labels=) is refused for that reason, and works without."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import bkfx
from bkfx.testing import assert_matches_reference

from test_hf_zoo import B, L, V, _text  # the tiny vocabulary and the padded text batch the zoo uses

f64 = torch.float64


class Logits(nn.Module):
    """An HF model called with keyword inputs, its logits (or last hidden state) pooled to `[B, k]`."""

    def __init__(self, model, head: int | None = None):
        super().__init__()
        self.model = model
        self.out = nn.Linear(16, head) if head else None

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        h = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return self.out(h.mean(1)) if self.out is not None else h


def test_deberta_v2_relative_attention_matches_the_reference():
    torch.manual_seed(0)
    config = transformers.DebertaV2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=V,
        relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=8, position_buckets=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = Logits(transformers.DebertaV2Model(config), head=3).double()
    y = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(4))
    dp, errors = assert_matches_reference(model, F.cross_entropy, _text(), y, method="loop", max_grad_norm=0.3)
    rel = "model.encoder.layer.0.attention.self.pos_key_proj.weight"
    assert model.get_parameter(rel).grad.abs().sum() > 0 and errors[rel] < 1e-6


class ComplexScale(nn.Module):
    def __init__(self, split: bool):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        z = torch.randn(4, dtype=torch.complex128)
        if split:
            self.re, self.im = nn.Parameter(z.real.clone()), nn.Parameter(z.imag.clone())
        else:
            self.z = nn.Parameter(z)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        z = self.z if hasattr(self, "z") else torch.complex(self.re, self.im)
        h = self.fc(x).to(torch.complex128) * z  # complex scale
        return self.head(h.abs())


def test_a_complex_trainable_parameter_is_refused_at_capture():
    with pytest.raises(bkfx.UnsupportedOperationError) as info:
        bkfx.compile(ComplexScale(split=False).double())(torch.randn(3, 4, dtype=f64))
    message = str(info.value)
    assert "'z'" in message and "complex128" in message and "test_capture_crashes.py" in message, message
    assert "torch.complex(re, im)" in message


def test_a_frozen_complex_parameter_and_real_and_imaginary_parts_match_the_reference():
    torch.manual_seed(1)
    x, y = torch.randn(4, 4, dtype=f64), torch.randint(0, 3, (4,))
    frozen = ComplexScale(split=False).double()
    frozen.z.requires_grad_(False)
    assert_matches_reference(frozen, F.cross_entropy, x, y, method="loop", max_grad_norm=0.3)
    assert_matches_reference(ComplexScale(split=True).double(), F.cross_entropy, x, y, method="loop", max_grad_norm=0.3)


def _electra(cls):
    config = transformers.ElectraConfig(
        vocab_size=V, embedding_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    torch.manual_seed(2)
    return cls(config).double()


@pytest.mark.parametrize("cls,labels", [
    ("ElectraForSequenceClassification", torch.tensor([0, 1, 2])),
    ("ElectraForPreTraining", torch.randint(0, 2, (B, L), generator=torch.Generator().manual_seed(3))),
])
def test_an_hf_model_called_with_labels_is_refused_for_its_loss_inside(cls, labels):
    ids, mask = _text()
    with pytest.raises(bkfx.SampleMixingError) as info:
        bkfx.compile(_electra(getattr(transformers, cls)))(input_ids=ids, attention_mask=mask, labels=labels)
    message = str(info.value)
    assert "a loss computed inside the model" in message and "without labels=" in message, message
    assert "modeling_electra.py" in message, message  # the line computing the loss


def test_the_same_model_with_its_loss_outside_matches_the_reference():
    model = Logits(_electra(transformers.ElectraForSequenceClassification))
    y = torch.tensor([0, 1, 2])
    assert_matches_reference(model, F.cross_entropy, _text(), y, method="loop", max_grad_norm=0.3)
