"""Real models (random weights, dropout 0, small configs) against the vmap reference, float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from bkfx.testing import assert_matches_reference

transformers.logging.set_verbosity_error()

OPTIONS = [("abadi", "mean"), ("abadi", "sum"), ("automatic", "mean"), ("automatic", "sum")]


def _logits_loss(reduction):
    return lambda out, y: F.cross_entropy(out.logits if hasattr(out, "logits") else out, y, reduction=reduction)


def vit():
    cfg = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(cfg).double(), torch.randn(3, 3, 8, 8, dtype=torch.float64)


def bert():
    cfg = BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).double(), torch.randint(0, 30, (3, 7))


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(2, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(2, c_out)
        self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride), nn.GroupNorm(2, c_out)) if stride > 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        h = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(h)) + self.skip(x))


class ResNet(nn.Module):
    """A ResNet-style CNN with GroupNorm in place of BatchNorm."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU())
        self.layers = nn.Sequential(Block(4, 4, 1), Block(4, 8, 2))
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class Mixed(nn.Module):
    """conv1d over a transposed sequence, MHA with batch_first=False, RMSNorm, einsum with a parameter."""

    def __init__(self, vocab=11, d=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.norm = nn.RMSNorm(d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=False)
        self.mix = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.out = nn.Linear(d, classes)

    def forward(self, idx):
        h = self.emb(idx)  # [B, T, d]
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.norm(h)
        s = h.transpose(0, 1)  # [T, B, d]
        a, _ = self.mha(s, s, s)
        h = h + a.transpose(0, 1)
        h = torch.einsum("btd,de->bte", h, self.mix)
        return self.out(h.mean(1))


@pytest.mark.parametrize("clipping,reduction", OPTIONS)
def test_vit(clipping, reduction):
    torch.manual_seed(0)
    model, x = vit()
    y = torch.randint(0, 3, (3,))
    dp, _ = assert_matches_reference(
        model, _logits_loss(reduction), x, y, clipping=clipping, loss_reduction=reduction, max_grad_norm=0.5
    )
    assert any("cls_token" in p for r in dp.plan() for p in r["params"])


@pytest.mark.parametrize("clipping,reduction", OPTIONS)
def test_bert(clipping, reduction):
    torch.manual_seed(0)
    model, ids = bert()
    y = torch.randint(0, 3, (3,))
    assert_matches_reference(
        model, _logits_loss(reduction), ids, y, clipping=clipping, loss_reduction=reduction, max_grad_norm=0.5
    )


@pytest.mark.parametrize("clipping,reduction", OPTIONS)
def test_resnet_groupnorm(clipping, reduction):
    torch.manual_seed(0)
    model = ResNet().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (4,))
    assert_matches_reference(model, _logits_loss(reduction), x, y, clipping=clipping, loss_reduction=reduction, max_grad_norm=0.5)


@pytest.mark.parametrize("clipping,reduction", OPTIONS)
@pytest.mark.parametrize("norm_mode", ["auto", "ghost", "explicit"])
def test_mixed_sequence_model(clipping, reduction, norm_mode):
    torch.manual_seed(0)
    model = Mixed().double()
    ids = torch.randint(0, 11, (4, 6))
    y = torch.randint(0, 3, (4,))
    dp, _ = assert_matches_reference(
        model, _logits_loss(reduction), ids, y, clipping=clipping, loss_reduction=reduction, norm_mode=norm_mode,
        max_grad_norm=0.5,
    )
    layouts = {r["node"]: r["sample_dim"] for r in dp.plan()}
    assert any("*" in v for v in layouts.values()), "MHA's out projection runs on a merged [T*B, d] sample dimension"
