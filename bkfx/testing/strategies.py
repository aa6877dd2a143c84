"""Hypothesis strategies for property-testing bkfx on random architectures, with their data.

Each strategy draws a small printable *spec* (a frozen dataclass: widths, kernel sizes,
which layers are tied or residual, batch size, a seed) and builds from it an
`Architecture`: a float64 model, matching inputs and targets, and a loss whose value on a
batch of one sample is that sample's loss. A failing example therefore prints as an
architecture, and `spec.build()` builds the same model and data again, anywhere (the
seed is part of the spec, and torch's global RNG is left untouched).

    from hypothesis import given
    from bkfx.testing.strategies import architectures, compile_options

    @given(arch=architectures(), options=compile_options())
    def test_my_bkfx_setup(arch, options):
        arch.check(**options)        # bkfx.testing.assert_matches_reference on this architecture

Families: `mlps` (depth, widths, activations, residuals, frozen layers, [B, d] or
[B, T, d] inputs), `cnns` (Conv2d with stride, padding and groups, GroupNorm,
residuals, global average pooling, a linear head), `sequence_models` (token embedding
with padding index, learned positions, pre-LayerNorm blocks with causal self-attention
and an MLP, a final LayerNorm, an output head tied to the embedding or not; options:
frozen parts, position tables of rank 2 or 3, a minimum width), `functional_models` (raw
parameters used in plain functional code: `F.linear`, `x @ W`, `x @ Wᵀ`, `addmm` over
merged `[B·T, d]` rows with alpha and beta, `einsum`, a vector product, elementwise
scales and shifts of any broadcasting shape, an RMS-norm written by hand) and
`tied_models` (one layer applied several times, one parameter used in several ways).
`architectures()` draws from any of them. Every strategy takes `dtype` (float64 by
default; `torch.float32` is checked at `bkfx.testing`'s float32 tolerance). `Architecture.loss_fn` is cross entropy for classifiers and
language models and mean squared error otherwise, with the architecture's
`loss_reduction`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from bkfx.testing import assert_matches_reference

__all__ = ["ACTIVATIONS", "FAMILIES", "Architecture", "cross_entropy", "mse", "MLPSpec", "MLP", "mlps",
    "ConvLayer", "CNNSpec", "CNN", "cnns", "SequenceSpec", "SelfAttention", "Block", "SequenceModel",
    "sequence_models", "FUNCTIONAL_OPS", "FunctionalOp", "FunctionalSpec", "Functional", "broadcast_shapes",
    "functional_models", "TIED_USES", "TiedSpec", "Tied", "tied_models", "architectures", "compile_options"]

ACTIVATIONS: dict[str, Callable] = {
    "relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu, "sigmoid": torch.sigmoid, "identity": lambda x: x,
}
FAMILIES = ("mlp", "cnn", "sequence", "functional", "tied")
_SEEDS = st.integers(0, 2**31 - 1)
_ACTIVATION = st.sampled_from(sorted(ACTIVATIONS))


class Architecture:
    """A model with data for one backward pass: what `assert_matches_reference` takes.

    `spec` is the drawn spec (a frozen dataclass that prints the architecture; `spec.build()`
    makes this again), `loss_fn(output, targets)` reduces with `loss_reduction`.
    """

    def __init__(self, spec, model: nn.Module, inputs: tuple, targets: torch.Tensor, loss_fn: Callable,
                 loss_reduction: str):
        self.spec, self.model, self.inputs, self.targets = spec, model, inputs, targets
        self.loss_fn, self.loss_reduction = loss_fn, loss_reduction

    def __repr__(self) -> str:
        shapes = [tuple(x.shape) for x in self.inputs]
        return f"Architecture({self.spec!r}, inputs={shapes}, loss_reduction={self.loss_reduction!r})"

    def check(self, **compile_options):
        """`assert_matches_reference` on this architecture: compile with `compile_options` (and
        this architecture's loss reduction), one backward, `.grad` and per-sample norms compared
        with the vmap reference. Returns the compiled model and the worst relative error per parameter."""
        return assert_matches_reference(
            self.model, self.loss_fn, self.inputs, self.targets, loss_reduction=self.loss_reduction, **compile_options
        )


def cross_entropy(out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross entropy over every position: `[B, K]` against `[B]`, `[B, T, K]` against `[B, T]`
    ('mean' over B·T tokens is the mean of the per-sample means, T being fixed)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


def mse(out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.mse_loss(out, y, reduction=reduction)


def _built(spec, make_model, make_inputs, loss: str, reduction: str, dtype) -> Architecture:
    """Build spec's model and data with torch's RNG seeded by `spec.seed`, then restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = make_model().to(dtype)
        inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in make_inputs())
        with torch.no_grad():
            out = model(*inputs)
        if loss == "ce":
            targets = torch.randint(0, out.shape[-1], out.shape[:-1])
        else:
            targets = torch.randn_like(out)
    fn = partial(cross_entropy if loss == "ce" else mse, reduction=reduction)
    return Architecture(spec, model, inputs, targets, fn, reduction)


# -- MLPs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MLPSpec:
    d_in: int
    widths: tuple[int, ...]
    activations: tuple[str, ...]
    bias: bool
    residual: tuple[bool, ...]  # x + act(fc(x)) where the widths match
    frozen: tuple[bool, ...]  # requires_grad_(False) on that layer
    batch: int
    seq: int | None  # None: inputs [B, d]; else [B, T, d]
    loss: str  # "ce" or "mse"
    seed: int

    def build(self, loss_reduction: str = "mean", dtype=torch.float64) -> Architecture:
        shape = (self.batch, self.d_in) if self.seq is None else (self.batch, self.seq, self.d_in)
        return _built(self, lambda: MLP(self), lambda: (torch.randn(shape),), self.loss, loss_reduction, dtype)


class MLP(nn.Module):
    def __init__(self, spec: MLPSpec):
        super().__init__()
        dims = (spec.d_in, *spec.widths)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=spec.bias) for a, b in zip(dims, dims[1:]))
        for layer, frozen in zip(self.layers, spec.frozen):
            layer.requires_grad_(not frozen)
        self.spec = spec

    def forward(self, x):
        for layer, act, residual in zip(self.layers, self.spec.activations, self.spec.residual):
            h = ACTIVATIONS[act](layer(x))
            x = x + h if residual else h
        return x


@st.composite
def mlps(draw, batch=st.integers(1, 6), loss_reduction: str = "mean", dtype=torch.float64) -> Architecture:
    """Multi-layer perceptrons of depth 1-4 on `[B, d]` or `[B, T, d]` inputs."""
    depth = draw(st.integers(1, 4))
    d_in = draw(st.integers(1, 12))
    widths, residual, prev = [], [], d_in
    for _ in range(depth):
        width = draw(st.sampled_from([prev]) | st.integers(1, 12))  # often equal, so residuals happen
        residual.append(width == prev and draw(st.booleans()))
        widths.append(width)
        prev = width
    frozen = [draw(st.booleans()) for _ in range(depth)]
    frozen[draw(st.integers(0, depth - 1))] = False  # something to train
    spec = MLPSpec(
        d_in=d_in, widths=tuple(widths), activations=tuple(draw(_ACTIVATION) for _ in range(depth)),
        bias=draw(st.booleans()), residual=tuple(residual), frozen=tuple(frozen), batch=draw(batch),
        seq=draw(st.none() | st.integers(1, 8)), loss="ce" if widths[-1] >= 2 and draw(st.booleans()) else "mse",
        seed=draw(_SEEDS),
    )
    return spec.build(loss_reduction, dtype)


# -- CNNs with GroupNorm ----------------------------------------------------------------------
@dataclass(frozen=True)
class ConvLayer:
    channels: int
    kernel: int
    stride: int
    padding: object  # int, or "same"
    groups: int
    bias: bool
    norm_groups: int  # GroupNorm groups (0: no GroupNorm)
    norm_affine: bool
    activation: str
    residual: bool  # x + layer(x); needs equal shapes


@dataclass(frozen=True)
class CNNSpec:
    in_channels: int
    size: tuple[int, int]  # input height, width
    layers: tuple[ConvLayer, ...]
    classes: int
    batch: int
    seed: int

    def build(self, loss_reduction: str = "mean", dtype=torch.float64) -> Architecture:
        x = lambda: (torch.randn(self.batch, self.in_channels, *self.size),)  # noqa: E731
        return _built(self, lambda: CNN(self), x, "ce", loss_reduction, dtype)


class CNN(nn.Module):
    """conv → GroupNorm → activation per layer (residual where shapes allow), mean pool, linear head."""

    def __init__(self, spec: CNNSpec):
        super().__init__()
        self.spec = spec
        self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
        c = spec.in_channels
        for layer in spec.layers:
            self.convs.append(nn.Conv2d(c, layer.channels, layer.kernel, stride=layer.stride, padding=layer.padding,
                                        groups=layer.groups, bias=layer.bias))
            self.norms.append(nn.GroupNorm(layer.norm_groups, layer.channels, affine=layer.norm_affine)
                              if layer.norm_groups else nn.Identity())
            c = layer.channels
        self.head = nn.Linear(c, spec.classes)

    def forward(self, x):
        for layer, conv, norm in zip(self.spec.layers, self.convs, self.norms):
            h = ACTIVATIONS[layer.activation](norm(conv(x)))
            x = x + h if layer.residual else h
        return self.head(x.mean(dim=(2, 3)))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@st.composite
def cnns(draw, batch=st.integers(1, 4), loss_reduction: str = "mean", dtype=torch.float64) -> Architecture:
    """Small image classifiers on `[B, C, H, W]`: 1-3 conv layers with GroupNorm."""
    c = in_channels = draw(st.integers(1, 3))
    h, w = draw(st.integers(3, 8)), draw(st.integers(3, 8))
    size, layers = (h, w), []
    for _ in range(draw(st.integers(1, 3))):
        kernel = draw(st.sampled_from([k for k in (1, 2, 3) if k <= min(h, w)]))
        stride = draw(st.sampled_from([1, 2]))
        padding = draw(st.sampled_from(["same", 0, 1])) if stride == 1 else draw(st.sampled_from([0, 1]))
        channels = draw(st.sampled_from([c]) | st.integers(1, 8))
        groups = draw(st.sampled_from([g for g in _divisors(math.gcd(c, channels)) if g <= 4]))
        pad = (kernel - 1) // 2 if padding == "same" else padding
        out = (h if padding == "same" else (h + 2 * pad - kernel) // stride + 1,
               w if padding == "same" else (w + 2 * pad - kernel) // stride + 1)
        # GroupNorm over fewer than 4 values is ill-conditioned (its backward amplifies rounding by
        # up to 1/sqrt(eps)), which would test float64 noise, not bkfx
        groups_ok = [g for g in _divisors(channels)[:3] if channels // g * out[0] * out[1] >= 4]
        norm_groups = draw(st.sampled_from([0, *groups_ok]))
        layers.append(ConvLayer(  # no bias before a GroupNorm: it cancels, its gradient is rounding noise
            channels=channels, kernel=kernel, stride=stride, padding=padding, groups=groups,
            bias=norm_groups == 0 and draw(st.booleans()),
            norm_groups=norm_groups, norm_affine=draw(st.booleans()), activation=draw(_ACTIVATION),
            residual=channels == c and out == (h, w) and draw(st.booleans()),
        ))
        c, (h, w) = channels, out
        if min(h, w) < 2:
            break
    spec = CNNSpec(in_channels=in_channels, size=size, layers=tuple(layers), classes=draw(st.integers(2, 5)),
                   batch=draw(batch), seed=draw(_SEEDS))
    return spec.build(loss_reduction, dtype)


# -- sequence models: embedding, positions, LayerNorm, attention, tied head -----------------------
@dataclass(frozen=True)
class SequenceSpec:
    vocab: int
    d: int
    heads: int
    hidden: int
    blocks: int
    attention: bool
    activation: str
    padding_idx: int | None
    tied: bool  # output head F.linear(h, embedding.weight)
    final_norm: bool
    max_len: int
    batch: int
    seq: int
    seed: int
    position_rank: int = 2  # 2: position [max_len, d] sliced [:T]; 3: [1, max_len, d] sliced [:, :T]
    frozen: tuple[str, ...] = ()  # of "embedding", "position", "norms", "head": requires_grad_(False)

    def build(self, loss_reduction: str = "mean", dtype=torch.float64) -> Architecture:
        return _built(self, lambda: SequenceModel(self), self._tokens, "ce", loss_reduction, dtype)

    def _tokens(self) -> tuple[torch.Tensor]:
        idx = torch.randint(0, self.vocab, (self.batch, self.seq))
        if self.padding_idx is not None:  # some padding tokens, one at least
            idx[torch.rand(idx.shape) < 0.3] = self.padding_idx
            idx[0, 0] = self.padding_idx
        return (idx,)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention written out: qkv projection, masked softmax, out projection."""

    def __init__(self, d: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.register_buffer("mask", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(d, dim=-1))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~self.mask[:T, :T], float("-inf"))
        return self.out((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    """Pre-norm residual block: h + attn(ln1(h)), then h + fc2(act(fc1(ln2(h))))."""

    def __init__(self, spec: SequenceSpec):
        super().__init__()
        self.spec = spec
        self.ln1 = nn.LayerNorm(spec.d) if spec.attention else None
        self.attn = SelfAttention(spec.d, spec.heads, spec.max_len) if spec.attention else None
        self.ln2 = nn.LayerNorm(spec.d)
        self.fc1 = nn.Linear(spec.d, spec.hidden)
        self.fc2 = nn.Linear(spec.hidden, spec.d)

    def forward(self, h):
        if self.attn is not None:
            h = h + self.attn(self.ln1(h))
        return h + self.fc2(ACTIVATIONS[self.spec.activation](self.fc1(self.ln2(h))))


class SequenceModel(nn.Module):
    def __init__(self, spec: SequenceSpec):
        super().__init__()
        self.spec = spec
        self.embedding = nn.Embedding(spec.vocab, spec.d, padding_idx=spec.padding_idx)
        shape = (spec.max_len, spec.d) if spec.position_rank == 2 else (1, spec.max_len, spec.d)
        self.position = nn.Parameter(0.1 * torch.randn(shape))
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.blocks))
        self.ln_f = nn.LayerNorm(spec.d) if spec.final_norm else nn.Identity()
        self.head = None if spec.tied else nn.Linear(spec.d, spec.vocab)
        parts = {"embedding": [self.embedding], "position": [self.position], "head": [self.head],
                 "norms": [m for m in self.modules() if isinstance(m, nn.LayerNorm)]}
        for part in spec.frozen:
            for p in parts[part]:
                if p is not None:
                    p.requires_grad_(False)

    def forward(self, idx):
        T = idx.shape[1]
        position = self.position[:T] if self.spec.position_rank == 2 else self.position[:, :T]
        h = self.embedding(idx) + position
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        return F.linear(h, self.embedding.weight) if self.head is None else self.head(h)


@st.composite
def sequence_models(draw, batch=st.integers(1, 4), loss_reduction: str = "mean", dtype=torch.float64,
                    frozen: bool = False, position_ranks=(2,), min_width: int = 1) -> Architecture:
    """Language models on token ids `[B, T]` with a token-level cross-entropy loss.

    `frozen`: also draw which parts are frozen (embedding, position, norms, head);
    `position_ranks`: the position table's ranks to draw from (2: `[L, d]`, 3: `[1, L, d]`);
    `min_width`: the smallest model width (LayerNorm over 1 or 2 features is rounding noise
    in float32).
    """
    heads = draw(st.integers(1, 2))
    vocab = draw(st.integers(2, 12))
    seq = draw(st.integers(1, 8))
    d = heads * draw(st.integers(max(1, -(-min_width // heads)), max(4, -(-min_width // heads))))
    spec = SequenceSpec(
        vocab=vocab, d=d, heads=heads, hidden=draw(st.integers(1, 12)),
        blocks=draw(st.integers(1, 2)), attention=draw(st.booleans()), activation=draw(_ACTIVATION),
        padding_idx=draw(st.none() | st.integers(0, vocab - 1)), tied=draw(st.booleans()),
        final_norm=draw(st.booleans()), max_len=seq + draw(st.integers(0, 4)), batch=draw(batch), seq=seq,
        seed=draw(_SEEDS), position_rank=draw(st.sampled_from(list(position_ranks))),
        frozen=tuple(sorted(draw(st.sets(st.sampled_from(["embedding", "position", "norms", "head"]))))) if frozen else (),
    )
    return spec.build(loss_reduction, dtype)


# -- custom functional code on raw parameters -------------------------------------------------------
FUNCTIONAL_OPS = ("linear", "matmul", "matmul_t", "addmm", "einsum", "vector", "scale", "shift", "rms_norm")
_DENSE = {"linear": "pd", "matmul_t": "pd", "matmul": "dp", "addmm": "dp", "einsum": "dp"}  # weight [p, d] or [d, p]
_PRODUCTS: dict[str, Callable] = {  # x times a weight matrix, three ways
    "linear": lambda x, w: F.linear(x, w), "matmul": lambda x, w: x @ w, "matmul_t": lambda x, w: torch.matmul(x, w.t()),
}


class FunctionalOp(NamedTuple):
    kind: str  # one of FUNCTIONAL_OPS
    width: int  # output width
    activation: str
    shape: tuple[int, ...] | None = None  # scale, shift: the parameter's shape, broadcast against a sample
    bias: bool = False  # linear, addmm
    alpha: float = 1.0  # addmm: beta * b + alpha * x @ W
    beta: float = 1.0


@dataclass(frozen=True)
class FunctionalSpec:
    d_in: int
    ops: tuple[FunctionalOp, ...]
    batch: int
    seq: int | None
    seed: int

    def build(self, loss_reduction: str = "mean", dtype=torch.float64) -> Architecture:
        shape = (self.batch, self.d_in) if self.seq is None else (self.batch, self.seq, self.d_in)
        return _built(self, lambda: Functional(self), lambda: (torch.randn(shape),), "mse", loss_reduction, dtype)


class Functional(nn.Module):
    """Parameters `w0, w1, ...` (and biases `b0, ...`) used by plain functional code, one op each."""

    def __init__(self, spec: FunctionalSpec):
        super().__init__()
        self.spec = spec
        d = spec.d_in
        for i, op in enumerate(spec.ops):
            if op.kind in _DENSE:
                shape = (op.width, d) if _DENSE[op.kind] == "pd" else (d, op.width)
                init = torch.randn(shape) / math.sqrt(d)
            elif op.kind == "vector":
                init = torch.randn(d) / math.sqrt(d)
            else:
                init = 1 + 0.3 * torch.randn(op.shape if op.shape is not None else (d,))
            self.register_parameter(f"w{i}", nn.Parameter(init))
            if op.bias:
                self.register_parameter(f"b{i}", nn.Parameter(0.1 * torch.randn(op.width)))
            d = op.width

    def forward(self, x):
        for i, op in enumerate(self.spec.ops):
            w, b = getattr(self, f"w{i}"), getattr(self, f"b{i}", None)
            if op.kind == "linear":
                x = F.linear(x, w, b)
            elif op.kind in _PRODUCTS:
                x = _PRODUCTS[op.kind](x, w)
            elif op.kind == "addmm":  # [B·T, d] rows for [B, T, d]: a merged sample dimension
                flat = x.reshape(-1, w.shape[0])
                out = torch.addmm(b, flat, w, beta=op.beta, alpha=op.alpha) if b is not None else op.alpha * (flat @ w)
                x = out.reshape(*x.shape[:-1], w.shape[1])
            elif op.kind == "einsum":
                x = torch.einsum("btd,de->bte" if x.dim() == 3 else "bd,de->be", x, w)
            elif op.kind == "vector":
                x = (x @ w).unsqueeze(-1)
            elif op.kind == "scale":
                x = x * w
            elif op.kind == "shift":
                x = x + w
            elif op.kind == "rms_norm":
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
            x = ACTIVATIONS[op.activation](x)
        return x


def broadcast_shapes(seq: int | None, d: int) -> list[tuple[int, ...]]:
    """Parameter shapes that broadcast against one sample's `[d]` or `[T, d]` without growing it."""
    shapes = [(), (1,), (d,), (1, d)]
    if seq is not None:
        shapes += [(seq, d), (seq, 1), (1, seq, d), (1, 1, d)]
    return shapes


@st.composite
def functional_models(draw, batch=st.integers(1, 6), loss_reduction: str = "mean", dtype=torch.float64,
                      ops=FUNCTIONAL_OPS) -> Architecture:
    """Functional code on raw parameters (`ops`: kinds to draw from), on `[B, d]` or `[B, T, d]`
    inputs, with an MSE loss."""
    seq = draw(st.none() | st.integers(1, 6))
    d = d_in = draw(st.integers(1, 8))
    drawn = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(list(ops)))
        op = FunctionalOp(kind, draw(st.integers(1, 8)) if kind in _DENSE else (1 if kind == "vector" else d),
                          draw(_ACTIVATION))
        if kind in ("scale", "shift"):
            op = op._replace(shape=draw(st.sampled_from(broadcast_shapes(seq, d))))
        elif kind in ("linear", "addmm"):
            op = op._replace(bias=draw(st.booleans()))
            if kind == "addmm":
                op = op._replace(**dict(zip(("alpha", "beta"), draw(st.sampled_from([(1.0, 1.0), (2.0, 0.5)])))))
        drawn.append(op)
        d = op.width
    spec = FunctionalSpec(d_in=d_in, ops=tuple(drawn), batch=draw(batch), seq=seq, seed=draw(_SEEDS))
    return spec.build(loss_reduction, dtype)


# -- tied sites: one layer applied several times, one parameter used in several ways --------------
TIED_USES = ("linear", "matmul", "matmul_t", "scale_row", "shift_diagonal", "fc_weight_matmul", "fc_bias_scale")


@dataclass(frozen=True)
class TiedSpec:
    d: int
    repeats: int  # the same nn.Linear(d, d) applied this many times in sequence
    bias: bool
    activation: str
    uses: tuple[str, ...]  # then further uses of W [d, d] and of the layer's own parameters (TIED_USES)
    batch: int
    seq: int | None
    seed: int

    def build(self, loss_reduction: str = "mean", dtype=torch.float64) -> Architecture:
        shape = (self.batch, self.d) if self.seq is None else (self.batch, self.seq, self.d)
        return _built(self, lambda: Tied(self), lambda: (torch.randn(shape),), "mse", loss_reduction, dtype)


class Tied(nn.Module):
    def __init__(self, spec: TiedSpec):
        super().__init__()
        self.spec = spec
        self.fc = nn.Linear(spec.d, spec.d, bias=spec.bias)
        self.W = nn.Parameter(torch.randn(spec.d, spec.d) / math.sqrt(spec.d))

    def forward(self, x):
        act = ACTIVATIONS[self.spec.activation]
        h = x
        for _ in range(self.spec.repeats):
            h = act(self.fc(h))
        for use in self.spec.uses:
            if use in _PRODUCTS:
                h = _PRODUCTS[use](h, self.W)
            elif use == "scale_row":
                h = h * self.W[0]
            elif use == "shift_diagonal":
                h = h + torch.diagonal(self.W)
            elif use == "fc_weight_matmul":
                h = h @ self.fc.weight
            elif use == "fc_bias_scale":
                h = h * self.fc.bias
            h = act(h)
        return h


@st.composite
def tied_models(draw, batch=st.integers(1, 6), loss_reduction: str = "mean", dtype=torch.float64) -> Architecture:
    """Parameters shared between sites: a layer applied 2-3 times, then a matrix W used as a
    linear map, transposed, by row and by diagonal, and the layer's own weight and bias reused."""
    bias = draw(st.booleans())
    uses = [u for u in TIED_USES if bias or u != "fc_bias_scale"]
    spec = TiedSpec(
        d=draw(st.integers(1, 12)), repeats=draw(st.integers(2, 3)), bias=bias, activation=draw(_ACTIVATION),
        uses=tuple(draw(st.lists(st.sampled_from(uses), max_size=4))), batch=draw(batch),
        seq=draw(st.none() | st.integers(1, 8)), seed=draw(_SEEDS),
    )
    return spec.build(loss_reduction, dtype)


_FAMILY_STRATEGIES = {"mlp": mlps, "cnn": cnns, "sequence": sequence_models, "functional": functional_models,
                      "tied": tied_models}


def architectures(families=FAMILIES, loss_reduction: str = "mean", dtype=torch.float64) -> st.SearchStrategy:
    """Any of the families (`"mlp"`, `"cnn"`, `"sequence"`, `"functional"`, `"tied"`), float64 by default."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown architecture families {sorted(unknown)}; choose from {FAMILIES}")
    return st.one_of(*(_FAMILY_STRATEGIES[f](loss_reduction=loss_reduction, dtype=dtype) for f in families))


@st.composite
def compile_options(draw, styles=("all-layer", "layer-wise", "param-wise")) -> dict:
    """`bkfx.compile` options to test under: threshold, clip function, norm mode, clipping style
    (the loss reduction belongs to the architecture)."""
    return dict(
        max_grad_norm=draw(st.sampled_from([0.01, 0.1, 1.0, 10.0])),
        clipping=draw(st.sampled_from(["abadi", "automatic"])),
        norm_mode=draw(st.sampled_from(["auto", "ghost", "explicit"])),
        style=draw(st.sampled_from(list(styles))),
    )
