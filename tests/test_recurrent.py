"""nn.LSTM, nn.GRU and nn.RNN in PyTorch's configurations, against the per-sample reference (float64).

An RNN is one ATen op with several outputs (output, h_n[, c_n]) and a flat list of weights; no
rule knows it, so the generic fallback pulls every weight back in one per-sample vjp, from the
gradients of the outputs that received one. The reference runs one backward per sample
(`method="loop"`): `vmap` of nn.LSTM's own forward fails in PyTorch (its initial state is an
unbatched zeros tensor written in place).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bkfx
from bkfx.errors import BkfxError, UnsupportedOperationError
from bkfx.testing import assert_matches_reference

# nn.RNNBase keeps its weights in a list attribute, which torch.export warns about
pytestmark = pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights")

KINDS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}


def _loss(reduction):
    return lambda out, y: F.cross_entropy(out, y, reduction=reduction)


class RecurrentNet(nn.Module):
    """An RNN between an optional input projection (inputs that need gradients) and a head reading
    its output, its last layer's final state, or both; the initial state optionally computed from
    the sample (per-sample hx)."""

    def __init__(self, kind, d_in, hidden, layers, bidirectional, batch_first, proj, use, project, h0):
        super().__init__()
        options = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        if kind == "lstm" and proj:
            options["proj_size"] = proj
        if kind.startswith("rnn"):
            options["nonlinearity"] = kind[4:]
        self.kind, self.use, self.batch_first = kind, use, batch_first
        self.inp = nn.Linear(d_in, d_in) if project else None
        self.rnn = KINDS[kind](d_in, hidden, **options)
        states = layers * (2 if bidirectional else 1)
        h_out = proj if kind == "lstm" and proj else hidden
        self.h0 = nn.Linear(d_in, states * h_out) if h0 else None
        self.c0 = nn.Linear(d_in, states * hidden) if h0 and kind == "lstm" else None
        width = {"output": h_out * (2 if bidirectional else 1), "final": h_out, "both": h_out * (3 if bidirectional else 2)}
        self.head = nn.Linear(width[use] + (hidden if kind == "lstm" and use == "both" else 0), 3)

    def forward(self, x):
        time = 1 if self.batch_first else 0
        if self.inp is not None:
            x = torch.tanh(self.inp(x))
        if self.h0 is not None:
            first = x.select(time, 0)  # [B, d_in]

            def state(proj):
                s = proj(first)
                return torch.tanh(s.reshape(s.shape[0], self.rnn.num_layers * (2 if self.rnn.bidirectional else 1), -1)
                                  .transpose(0, 1).contiguous())

            hx = (state(self.h0), state(self.c0)) if self.kind == "lstm" else state(self.h0)
            out, hn = self.rnn(x, hx)
        else:
            out, hn = self.rnn(x)
        h, c = hn if self.kind == "lstm" else (hn, None)
        if self.use == "output":
            return self.head(out.mean(time))
        if self.use == "final":
            return self.head(h[-1])
        parts = [out.mean(time), h[-1]] + ([c[-1]] if c is not None else [])
        return self.head(torch.cat(parts, -1))


def _check(model, batch, T, d_in, batch_first, reduction="mean", **options):
    x = torch.randn(batch, T, d_in) if batch_first else torch.randn(T, batch, d_in)
    y = torch.randint(0, 3, (batch,))
    dp, _ = assert_matches_reference(
        model.double(), _loss(reduction), x.double(), y, method="loop", batch_dim=0 if batch_first else 1,
        loss_reduction=reduction, **options,
    )
    rnn = [r for r in dp.plan() if r["op"].startswith(("aten.lstm", "aten.gru", "aten.rnn"))]
    assert rnn and {r["rule"] for r in rnn} == {"Fallback"}
    assert {p for r in rnn for p in r["params"]} == {f"rnn.{n}" for n, _ in model.rnn.named_parameters()}
    return dp


@settings(deadline=None, max_examples=8)
@given(
    st.sampled_from(sorted(KINDS)), st.booleans(), st.booleans(), st.sampled_from([1, 2]), st.booleans(),
    st.integers(2, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
    st.sampled_from(["output", "final", "both"]), st.booleans(), st.booleans(), st.sampled_from(["mean", "sum"]),
    st.sampled_from(["abadi", "automatic"]), st.sampled_from([0.1, 1.0, 100.0]), st.integers(0, 2**16),
)
def test_recurrent(kind, batch_first, bidirectional, layers, proj, hidden, d_in, T, batch, use, project, h0,
                   reduction, clipping, R, seed):
    torch.manual_seed(seed)
    model = RecurrentNet(kind, d_in, hidden, layers, bidirectional, batch_first, hidden - 1 if proj else 0, use,
                         project, h0)
    _check(model, batch, T, d_in, batch_first, reduction, clipping=clipping, max_grad_norm=R)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_option_at_once(kind):
    """Two bidirectional layers, sequence-first input (batch_dim=1), a per-sample initial state, every
    output read, inputs that need gradients (LSTM: with proj_size)."""
    torch.manual_seed(1)
    model = RecurrentNet(kind, 3, 4, 2, True, False, 2, "both", True, True)
    _check(model, 3, 4, 3, False, clipping="abadi", max_grad_norm=0.5)


class InPlaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(2, 3)
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.rnn(self.inp(x))  # h_n and c_n unused: their gradients never arrive
        F.relu(out, inplace=True)
        return self.head(out.sum(1))


def test_in_place_op_on_an_output_and_unused_outputs():
    torch.manual_seed(2)
    assert_matches_reference(InPlaceAfter().double(), _loss("sum"), torch.randn(3, 4, 2).double(),
                             torch.tensor([0, 1, 1]), method="loop", loss_reduction="sum", max_grad_norm=0.1)


class TwoStacked(nn.Module):
    """Two single-layer GRUs with dropout between them (how RNN dropout works with bkfx), in eval mode
    here so that the reference draws the same masks; the second reads the first's output."""

    def __init__(self):
        super().__init__()
        self.a = nn.GRU(2, 3, batch_first=True)
        self.drop = nn.Dropout(0.5)
        self.b = nn.GRU(3, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        out, _ = self.a(x)
        _, h = self.b(self.drop(out))
        return self.head(h[-1])


def test_stacked_recurrent_modules():
    torch.manual_seed(3)
    assert_matches_reference(TwoStacked().double().eval(), _loss("mean"), torch.randn(4, 3, 2).double(),
                             torch.tensor([0, 1, 1, 0]), method="loop")


def test_dropout_between_layers_is_refused_in_training_and_allowed_in_eval():
    x = torch.randn(3, 4, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(2, 3, num_layers=2, dropout=0.5, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0].sum(1)

    with pytest.raises(UnsupportedOperationError, match="draws random numbers") as e:
        bkfx.compile(Net())(x)
    assert "node: lstm" in str(e.value) and "test_recurrent.py" in str(e.value) and "dropout=0" in str(e.value)
    torch.manual_seed(4)
    net = Net().double().eval()
    assert_matches_reference(net, lambda out, y: (out.sum(1) * y).sum(), x.double(), torch.randn(3).double(),
                             method="loop", loss_reduction="sum")


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(2, 3, batch_first=True)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.rnn(packed)[1][-1]


def test_packed_sequences_are_refused_with_a_bkfx_error():
    with pytest.raises(BkfxError, match="test_recurrent.py"):
        bkfx.compile(Packed(), batch_dim={"lengths": 0, "x": 0})(torch.randn(3, 4, 2), torch.tensor([4, 2, 3]))
