"""nn.EmbeddingBag (sum, mean, max; per_sample_weights; padding_idx) and index_select of a parameter
table, against the per-sample reference (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bkfx
from bkfx.errors import SampleMixingError, UnsupportedOperationError
from bkfx.testing import assert_matches_reference


def _loss(reduction):
    return lambda out, y: F.cross_entropy(out, y, reduction=reduction)


class BagNet(nn.Module):
    """A bag of ids per sample, as a `[B, T]` tensor (nn.EmbeddingBag flattens it) or as flat ids with
    the offsets written out in the model (`F.embedding_bag`)."""

    def __init__(self, vocab, dim, mode, padding_idx, form, tied):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode=mode, padding_idx=padding_idx)
        self.form = form
        self.tok = nn.Embedding(vocab, dim) if tied else None
        if tied:
            self.tok.weight = self.bag.weight  # one table read by a bag and by an embedding
        self.head = nn.Linear(dim, 3)

    def forward(self, ids, weights=None):
        if self.form == "2d":
            h = self.bag(ids, per_sample_weights=weights)
        else:
            B, T = ids.shape
            offsets = torch.arange(0, B * T, T, device=ids.device)
            h = F.embedding_bag(
                ids.reshape(-1), self.bag.weight, offsets, mode=self.bag.mode, padding_idx=self.bag.padding_idx,
                per_sample_weights=None if weights is None else weights.reshape(-1),
            )
        if self.tok is not None:
            h = h + self.tok(ids[:, 0])
        return self.head(torch.tanh(h))


@settings(deadline=None, max_examples=12)
@given(
    st.sampled_from(["sum", "mean", "max"]), st.booleans(), st.booleans(), st.sampled_from(["2d", "offsets"]),
    st.booleans(), st.integers(1, 4), st.integers(1, 4), st.sampled_from(["auto", "ghost", "explicit"]),
    st.sampled_from(["mean", "sum"]), st.sampled_from(["abadi", "automatic"]), st.sampled_from([0.1, 1.0, 100.0]),
    st.integers(0, 2**16),
)
def test_embedding_bag(mode, padding, weighted, form, tied, batch, T, norm_mode, reduction, clipping, R, seed):
    torch.manual_seed(seed)
    vocab, dim = 7, 3
    model = BagNet(vocab, dim, mode, 0 if padding else None, form, tied).double()
    ids = torch.randint(0, vocab, (batch, T))
    inputs = ids
    if weighted and mode == "sum":  # PyTorch takes per_sample_weights in mode sum only
        inputs = (ids, torch.randn(batch, T, dtype=torch.float64))
    y = torch.randint(0, 3, (batch,))
    dp, _ = assert_matches_reference(
        model, _loss(reduction), inputs, y, norm_mode=norm_mode, loss_reduction=reduction, clipping=clipping,
        max_grad_norm=R,
    )
    assert {r["rule"] for r in dp.plan() if "bag.weight" in r["params"] and r["op"].startswith("aten.embedding_bag")} == {
        "EmbeddingBag"
    }


def test_embedding_bag_of_empty_bags():
    """Bags of padding only: output and gradient zero (mean divides by no count, max has no row)."""
    torch.manual_seed(0)
    for mode in ("sum", "mean", "max"):
        model = BagNet(6, 3, mode, 0, "2d", False).double()
        ids = torch.tensor([[0, 0, 0], [1, 0, 2], [0, 5, 5]])
        assert_matches_reference(model, _loss("sum"), ids, torch.tensor([0, 1, 2]), loss_reduction="sum")


class IndexSelectNet(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.table = nn.Parameter(torch.randn(*shape))
        self.head = nn.Linear(int(torch.tensor(shape[1:]).prod()), 2)

    def forward(self, ids):
        rows = torch.index_select(self.table, 0, ids.reshape(-1))  # [B*T, ...]: W[ids] written with index_select
        return self.head(rows.reshape(ids.shape[0], ids.shape[1], -1).sum(1))


@settings(deadline=None, max_examples=6)
@given(st.sampled_from([(5, 3), (4, 2, 3)]), st.integers(1, 4), st.integers(1, 3),
       st.sampled_from(["ghost", "explicit"]), st.integers(0, 2**16))
def test_index_select_of_a_parameter_is_an_embedding(shape, batch, T, norm_mode, seed):
    torch.manual_seed(seed)
    model = IndexSelectNet(shape).double()
    ids = torch.randint(0, shape[0], (batch, T))
    dp, _ = assert_matches_reference(model, _loss("mean"), ids, torch.randint(0, 2, (batch,)), norm_mode=norm_mode)
    assert [r["rule"] for r in dp.plan() if r["params"] == ["table"]] == ["IndexSelect"]


class FlatBags(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(6, 3, mode="sum")

    def forward(self, ids, offsets):
        return self.bag(ids, offsets)


def test_offsets_from_the_data_are_refused():
    """Flat ids with offsets from the data: the bags' sizes vary, so they cannot be split by shape."""
    dp = bkfx.compile(FlatBags().double(), batch_dim={"ids": None, "offsets": 0})
    with pytest.raises(SampleMixingError, match="not the samples") as e:
        dp(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 3]))
    assert "what to do: pass the ids as a [B, T] tensor" in str(e.value) and "source:" in str(e.value)


@pytest.mark.parametrize("layer, what", [(nn.EmbeddingBag, "embedding bag"), (nn.Embedding, "embedding")])
def test_scale_grad_by_freq_is_refused(layer, what):
    model = nn.Sequential(layer(6, 3, scale_grad_by_freq=True), nn.Linear(3, 2)).double()
    with pytest.raises(UnsupportedOperationError, match="scale_grad_by_freq") as e:
        bkfx.compile(model)(torch.randint(0, 6, (3, 4)))
    assert f"construct the {what} with scale_grad_by_freq=False" in str(e.value)
