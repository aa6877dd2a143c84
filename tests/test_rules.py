"""Every rule against the vmap reference, on hypothesis-drawn shapes and options (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bkfx.testing import assert_matches_reference

MODES = st.sampled_from(["auto", "ghost", "explicit"])
CLIPPING = st.sampled_from(["abadi", "automatic"])
REDUCTION = st.sampled_from(["mean", "sum"])
THRESHOLD = st.sampled_from([0.01, 0.3, 1.0, 100.0])


def _loss(reduction):
    return lambda out, y: F.cross_entropy(out, y, reduction=reduction)


class ConvNet(nn.Module):
    def __init__(self, conv: nn.Module, classes: int):
        super().__init__()
        self.conv = conv
        self.head = nn.LazyLinear(classes)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@st.composite
def convolutions(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 2))
    padding = draw(st.sampled_from(["same", "valid", 0, 1, 2])) if stride == 1 else draw(st.sampled_from([0, 1, "valid"]))
    bias = draw(st.booleans())
    span = dilation * (kernel - 1) + 1
    size = draw(st.integers(span, span + 3 if dims < 3 else span + 1))
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1](
        c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias
    )
    return conv, (c_in,) + (size,) * dims


@settings(deadline=None)
@given(convolutions(), st.integers(1, 4), MODES, CLIPPING, REDUCTION, THRESHOLD, st.integers(0, 2**16))
def test_convolution(conv_shape, batch, mode, clipping, reduction, R, seed):
    torch.manual_seed(seed)
    conv, shape = conv_shape
    model = ConvNet(conv, 3)
    x = torch.randn(batch, *shape)
    model(x)  # materialise the lazy head
    model = model.double()
    y = torch.randint(0, 3, (batch,))
    assert_matches_reference(
        model, _loss(reduction), x.double(), y, norm_mode=mode, clipping=clipping, loss_reduction=reduction, max_grad_norm=R
    )


class NormNet(nn.Module):
    def __init__(self, kind: str, channels: int, groups: int, affine_mask):
        super().__init__()
        self.kind = kind
        self.proj = nn.Conv2d(2, channels, 1)
        if kind == "group":
            self.norm = nn.GroupNorm(groups, channels)
        elif kind == "instance":
            self.norm = nn.InstanceNorm2d(channels, affine=True)
        elif kind == "layer":
            self.norm = nn.LayerNorm([channels, 3, 3], elementwise_affine=True, bias=affine_mask)
        elif kind == "layer-no-weight":
            self.norm = nn.LayerNorm(3, elementwise_affine=False)
            self.shift = nn.Parameter(torch.randn(3))
        elif kind == "rms":
            self.norm = nn.RMSNorm([3, 3])
        elif kind == "batch-eval":
            self.norm = nn.BatchNorm2d(channels)
            self.norm.running_mean.normal_()
            self.norm.running_var.uniform_(0.5, 2.0)
            self.norm.eval()
        self.scale = nn.Parameter(torch.randn(channels, 1, 1))
        self.head = nn.Linear(channels * 9, 3)

    def forward(self, x):
        h = self.norm(self.proj(x))
        if self.kind == "layer-no-weight":
            h = h + self.shift
        return self.head((h * self.scale).flatten(1))


@settings(deadline=None)
@given(
    st.sampled_from(["group", "instance", "layer", "layer-no-weight", "rms", "batch-eval"]), st.sampled_from([2, 4]),
    st.booleans(), st.integers(1, 5), CLIPPING, REDUCTION, THRESHOLD, st.integers(0, 2**16),
)
def test_normalisation(kind, channels, flag, batch, clipping, reduction, R, seed):
    torch.manual_seed(seed)
    model = NormNet(kind, channels, 2, flag).double()
    model.proj.train(), model.head.train()
    x = torch.randn(batch, 2, 3, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,))
    assert_matches_reference(model, _loss(reduction), x, y, clipping=clipping, loss_reduction=reduction, max_grad_norm=R)


class Attention(nn.Module):
    def __init__(self, d, heads, batch_first, packed, bias, sdpa):
        super().__init__()
        self.batch_first, self.sdpa = batch_first, sdpa
        if sdpa:
            self.q, self.k, self.v = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)
            self.heads = heads
        else:
            kdim = None if packed else d + 1
            self.mha = nn.MultiheadAttention(d, heads, bias=bias, batch_first=batch_first, kdim=kdim, vdim=kdim)
            self.kv = nn.Linear(d, d if packed else d + 1)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        if self.sdpa:
            B, T, d = x.shape
            split = lambda t: t.view(B, T, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
            a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
            return self.head(a.transpose(1, 2).reshape(B, T, d).mean(1))
        kv = self.kv(x)
        if not self.batch_first:
            x, kv = x.transpose(0, 1), kv.transpose(0, 1)
        a, _ = self.mha(x, kv, kv, need_weights=False)
        a = a if self.batch_first else a.transpose(0, 1)
        return self.head(a.mean(1))


@settings(deadline=None)
@given(
    st.sampled_from([(4, 1), (4, 2), (6, 3)]), st.booleans(), st.booleans(), st.booleans(), st.booleans(),
    st.integers(1, 4), st.integers(1, 6), MODES, CLIPPING, st.integers(0, 2**16),
)
def test_attention(dims, batch_first, packed, bias, sdpa, batch, seq, mode, clipping, seed):
    torch.manual_seed(seed)
    d, heads = dims
    model = Attention(d, heads, batch_first, packed, bias, sdpa).double()
    x = torch.randn(batch, seq, d, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,))
    assert_matches_reference(model, _loss("mean"), x, y, norm_mode=mode, clipping=clipping, max_grad_norm=0.5)


class Unknown(nn.Module):
    """Parameters in operations no rule knows: transposed conv, pow, atan2, division, einsum, cls token."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.up = nn.ConvTranspose1d(2, 2, 2, stride=2)
        self.p = nn.Parameter(torch.rand(2, 1) + 0.5)
        self.e = nn.Parameter(torch.randn(4, 3))
        self.cls = nn.Parameter(torch.randn(1, 2, 1))
        self.head = nn.LazyLinear(3)

    def forward(self, x):  # x: [B, 2, 4]
        if self.op == "conv_transpose":
            h = self.up(x)
        elif self.op == "pow":
            h = x.abs().pow(self.p)
        elif self.op == "atan2":
            h = torch.atan2(x, self.p)
        elif self.op == "div":
            h = x / self.p + self.p / (x.abs() + 1)
        elif self.op == "einsum":
            h = torch.einsum("bcl,lk->bck", x, self.e)
        else:
            h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 2)
        return self.head(torch.tanh(h).flatten(1))


@settings(deadline=None)
@given(st.sampled_from(["conv_transpose", "pow", "atan2", "div", "einsum", "cls"]), st.integers(1, 5), REDUCTION,
       st.integers(0, 2**16))
def test_generic_fallback_and_explicit_rules(op, batch, reduction, seed):
    torch.manual_seed(seed)
    model = Unknown(op)
    x = torch.randn(batch, 2, 4)
    model(x)
    model = model.double()
    y = torch.randint(0, 3, (batch,))
    dp, _ = assert_matches_reference(model, _loss(reduction), x.double(), y, loss_reduction=reduction, max_grad_norm=0.5)
    if op in ("conv_transpose", "pow", "atan2"):
        assert any(r["rule"] == "Fallback" and r["mode"] == "fallback" for r in dp.plan())


def test_float32_matches_reference_to_1e4(device):
    torch.manual_seed(0)
    model = ConvNet(nn.Conv2d(3, 4, 3, padding=1, groups=1), 5)
    x = torch.randn(6, 3, 5, 5)
    model(x)
    model, x, y = model.to(device), x.to(device), torch.randint(0, 5, (6,)).to(device)
    with torch.backends.cudnn.flags(allow_tf32=False):  # cuDNN's default TF32 convolutions round to 1e-3
        _, errors = assert_matches_reference(model, _loss("mean"), x, y, max_grad_norm=0.1)
    assert max(errors.values()) <= 1e-4


class LongSequence(nn.Module):
    """Linear layers over long sequences: ghost norms then use blocked symmetric Grams."""

    def __init__(self, d: int, hidden: int, classes: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x))).mean(1)


@settings(deadline=None)
@given(seq=st.integers(1, 300), batch=st.integers(1, 3), reduction=REDUCTION, R=THRESHOLD, seed=st.integers(0, 99))
def test_ghost_norms_over_long_sequences(seq, batch, reduction, R, seed):
    """Sequences of 1 to 300 positions (1 to 4 Gram blocks), ghost mode, against the reference."""
    torch.manual_seed(seed)
    model = LongSequence(3, 4, 2).double()
    x = torch.randn(batch, seq, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (batch,))
    assert_matches_reference(model, _loss(reduction), x, y, loss_reduction=reduction, max_grad_norm=R,
                             norm_mode="ghost")


@pytest.mark.parametrize("seq, mode", [(200, "ghost"), (200, "explicit"), (7, "ghost")])
def test_long_sequences_on_each_device(seq, mode, device):
    """The Gram strategy of the device (blocked on the CPU, one bmm on a GPU) against the reference."""
    torch.manual_seed(seq)
    model = LongSequence(5, 6, 3).double().to(device)
    x = torch.randn(3, seq, 5, dtype=torch.float64, device=device)
    y = torch.randint(0, 3, (3,), device=device)
    assert_matches_reference(model, _loss("sum"), x, y, loss_reduction="sum", max_grad_norm=0.5, norm_mode=mode)


def test_gram_blocks_on_the_cpu_only():
    """Blocked lower-triangle Grams pay on the CPU; on a GPU the tiny block bmms cost more than
    the symmetry saves, so every Gram is one bmm there."""
    from bkfx.rules.factors import gram_block_count

    assert [gram_block_count(T, torch.device("cpu")) for T in (1, 127, 128, 200, 512, 4096)] == [1, 1, 2, 3, 4, 4]
    assert all(gram_block_count(T, torch.device("cuda", 0)) == 1 for T in (1, 128, 512, 4096))


@given(T=st.integers(1, 400), m=st.integers(1, 6), n=st.integers(1, 6), seed=st.integers(0, 99))
def test_blocked_self_inner_is_the_squared_norm(T, m, n, seed):
    """`‖L_iᵀ R_i‖²` from the lower-triangle Gram blocks equals the materialised per-sample norm."""
    from bkfx.rules.factors import Dense, Factored, GramCache, inner

    g = torch.Generator().manual_seed(seed)
    piece = Factored(Dense(torch.randn(2, T, m, generator=g, dtype=torch.float64)),
                     Dense(torch.randn(2, T, n, generator=g, dtype=torch.float64)))
    expected = torch.bmm(piece.L.t.transpose(1, 2), piece.R.t).flatten(1).pow(2).sum(1)
    for grams in (None, GramCache()):
        got = inner(piece, piece, (m, n)) if grams is None else inner(piece, piece, (m, n), grams)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
