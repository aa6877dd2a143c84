"""Property tests over whole architectures: hypothesis draws a model, its shapes and bkfx's
options; after one `loss.backward()` every trainable parameter's `.grad` and the per-sample
norms must match the `torch.func.vmap` reference (`bkfx.testing.assert_matches_reference`)
to 1e-6 relative in float64 and 1e-4 in float32, frozen parameters must keep `.grad is None`,
and the compiled forward must return exactly the model's output.

Each strategy draws a small, printable spec (so a failing example reads as an architecture);
the test seeds torch with a drawn seed and builds the model and data from the spec.
In float32 the tolerance is also absolute, 1e-4 of the largest clipped term (`summand_scale`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bkfx
from bkfx.testing import assert_matches_reference, clipped_sum_reference, per_sample_gradients

ACTIVATIONS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}
ACTIVATION = st.sampled_from(sorted(ACTIVATIONS))
WIDTH = st.integers(1, 16)
BATCH = st.integers(1, 8)
SEQ = st.integers(1, 16)
SEEDS = st.integers(0, 2**16)
T_MAX = 16  # length of learned position tables; sequences are sliced to it


# -- losses: per-sample loss = the loss of sample i alone, with the same reduction ---------
def mse(out, y, reduction):
    return F.mse_loss(out, y, reduction=reduction)


def token_cross_entropy(out, y, reduction):
    """Cross entropy over every position; 'mean' over B*T tokens is the mean of per-sample means."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


LOSSES = {"mse": mse, "ce": token_cross_entropy}


def targets_for(loss: str, out: torch.Tensor) -> torch.Tensor:
    if loss == "ce":
        return torch.randint(0, out.shape[-1], out.shape[:-1])
    return torch.randn_like(out)


@st.composite
def dp_options(draw) -> dict:
    return dict(
        max_grad_norm=draw(st.sampled_from([0.01, 0.1, 0.5, 1.0, 3.0, 10.0])),
        clipping=draw(st.sampled_from(["abadi", "automatic"])),
        loss_reduction=draw(st.sampled_from(["mean", "sum"])),
        norm_mode=draw(st.sampled_from(["auto", "ghost", "explicit"])),
        style=draw(st.sampled_from(["all-layer", "layer-wise", "param-wise"])),
    )


def input_shape(batch: int, seq: int | None, d: int) -> tuple[int, ...]:
    return (batch, d) if seq is None else (batch, seq, d)


# -- MLPs --------------------------------------------------------------------------------
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
    loss: str

    def build(self, dtype):
        model = MLP(self).to(dtype)
        x = torch.randn(input_shape(self.batch, self.seq, self.d_in), dtype=dtype)
        with torch.no_grad():
            y = targets_for(self.loss, model(x))
        return model, (x,), y


class MLP(nn.Module):
    def __init__(self, spec: MLPSpec):
        super().__init__()
        dims = (spec.d_in, *spec.widths)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=spec.bias) for a, b in zip(dims, dims[1:]))
        for layer, frozen in zip(self.layers, spec.frozen):
            layer.requires_grad_(not frozen)
        self.activations = spec.activations
        self.residual = spec.residual

    def forward(self, x):
        for layer, act, residual in zip(self.layers, self.activations, self.residual):
            h = ACTIVATIONS[act](layer(x))
            x = x + h if residual else h
        return x


@st.composite
def mlps(draw) -> MLPSpec:
    depth = draw(st.integers(1, 4))
    d_in = draw(WIDTH)
    widths, residual, prev = [], [], d_in
    for _ in range(depth):
        width = draw(st.sampled_from([prev]) | WIDTH)  # often equal, so residuals happen
        residual.append(width == prev and draw(st.booleans()))
        widths.append(width)
        prev = width
    trainable = draw(st.integers(0, depth - 1))  # at least one layer stays trainable
    frozen = [i != trainable and draw(st.booleans()) for i in range(depth)]
    return MLPSpec(
        d_in=d_in,
        widths=tuple(widths),
        activations=tuple(draw(ACTIVATION) for _ in range(depth)),
        bias=draw(st.booleans()),
        residual=tuple(residual),
        frozen=tuple(frozen),
        batch=draw(BATCH),
        seq=draw(st.none() | SEQ),
        loss=draw(st.sampled_from(["mse", "ce"])) if widths[-1] >= 2 else "mse",
    )


# -- sequence models ---------------------------------------------------------------------
@dataclass(frozen=True)
class SeqSpec:
    vocab: int
    d: int
    hidden: int
    n_blocks: int
    activation: str
    padding_idx: int | None
    pos_rank: int  # 2: pos [T_MAX, d] sliced pos[:T]; 3: pos [1, T_MAX, d] sliced pos[:, :T]
    norm_bias: bool
    final_norm: bool
    tied: bool  # output head F.linear(h, emb.weight)
    head_bias: bool
    frozen: tuple[str, ...]  # of "emb", "pos", "norms", "head"
    batch: int
    seq: int

    def build(self, dtype):
        model = SeqModel(self).to(dtype)
        idx = torch.randint(0, self.vocab, (self.batch, self.seq))
        if self.padding_idx is not None:
            idx[torch.rand(idx.shape) < 0.3] = self.padding_idx
            idx[0, 0] = self.padding_idx  # at least one padding token
        y = torch.randint(0, self.vocab, (self.batch, self.seq))
        return model, (idx,), y


class Block(nn.Module):
    """Pre-norm residual MLP block: h + fc2(act(fc1(ln(h))))."""

    def __init__(self, d, hidden, activation, norm_bias):
        super().__init__()
        self.ln = nn.LayerNorm(d, bias=norm_bias)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.activation = activation

    def forward(self, h):
        return h + self.fc2(ACTIVATIONS[self.activation](self.fc1(self.ln(h))))


class SeqModel(nn.Module):
    def __init__(self, spec: SeqSpec):
        super().__init__()
        self.spec = spec
        self.emb = nn.Embedding(spec.vocab, spec.d, padding_idx=spec.padding_idx)
        shape = (T_MAX, spec.d) if spec.pos_rank == 2 else (1, T_MAX, spec.d)
        self.pos = nn.Parameter(0.1 * torch.randn(shape))
        self.blocks = nn.ModuleList(
            Block(spec.d, spec.hidden, spec.activation, spec.norm_bias) for _ in range(spec.n_blocks)
        )
        self.ln_f = nn.LayerNorm(spec.d, bias=spec.norm_bias) if spec.final_norm else nn.Identity()
        self.head = None if spec.tied else nn.Linear(spec.d, spec.vocab, bias=spec.head_bias)
        if "emb" in spec.frozen:
            self.emb.requires_grad_(False)
        if "pos" in spec.frozen:
            self.pos.requires_grad_(False)
        if "norms" in spec.frozen:
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.requires_grad_(False)
        if "head" in spec.frozen and self.head is not None:
            self.head.requires_grad_(False)

    def forward(self, idx):
        T = idx.shape[1]
        pos = self.pos[:T] if self.spec.pos_rank == 2 else self.pos[:, :T]
        h = self.emb(idx) + pos
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        return F.linear(h, self.emb.weight) if self.head is None else self.head(h)


@st.composite
def sequence_models(draw, min_width: int = 1) -> SeqSpec:
    vocab = draw(st.integers(2, 16))
    return SeqSpec(
        vocab=vocab,
        d=draw(st.integers(min_width, 16)),
        hidden=draw(WIDTH),
        n_blocks=draw(st.integers(1, 3)),
        activation=draw(ACTIVATION),
        padding_idx=draw(st.none() | st.integers(0, vocab - 1)),
        pos_rank=draw(st.sampled_from([2, 3])),
        norm_bias=draw(st.booleans()),
        final_norm=draw(st.booleans()),
        tied=draw(st.booleans()),
        head_bias=draw(st.booleans()),
        frozen=tuple(draw(st.sets(st.sampled_from(["emb", "pos", "norms", "head"])))),
        batch=draw(BATCH),
        seq=draw(SEQ),
    )


# -- functional calls on raw parameters ---------------------------------------------------
@dataclass(frozen=True)
class Op:
    kind: str  # "linear" | "matmul" | "matmul_t" | "addmm" | "scale_shift" | "vector"
    width: int  # output width
    bias: bool = False
    scale_shape: tuple[int, ...] = ()
    shift_shape: tuple[int, ...] = ()
    alpha_beta: tuple[float, float] = (1.0, 1.0)
    activation: str = "identity"


@dataclass(frozen=True)
class FunctionalSpec:
    d_in: int
    ops: tuple[Op, ...]
    batch: int
    seq: int | None

    def build(self, dtype):
        model = Functional(self).to(dtype)
        x = torch.randn(input_shape(self.batch, self.seq, self.d_in), dtype=dtype)
        with torch.no_grad():
            y = torch.randn_like(model(x))
        return model, (x,), y


class Functional(nn.Module):
    """Parameters used through functional calls; parameter k of op i is named `w{i}`, `b{i}`, ..."""

    def __init__(self, spec: FunctionalSpec):
        super().__init__()
        self.ops = spec.ops
        d = spec.d_in
        for i, op in enumerate(spec.ops):
            p = op.width
            if op.kind in ("linear", "matmul_t"):
                self.register_parameter(f"w{i}", nn.Parameter(torch.randn(p, d) / d**0.5))
            elif op.kind in ("matmul", "addmm"):
                self.register_parameter(f"w{i}", nn.Parameter(torch.randn(d, p) / d**0.5))
            elif op.kind == "vector":
                self.register_parameter(f"w{i}", nn.Parameter(torch.randn(d) / d**0.5))
            elif op.kind == "scale_shift":
                self.register_parameter(f"w{i}", nn.Parameter(1 + 0.5 * torch.randn(op.scale_shape)))
                self.register_parameter(f"b{i}", nn.Parameter(0.5 * torch.randn(op.shift_shape)))
            if op.kind in ("linear", "addmm") and op.bias:
                self.register_parameter(f"b{i}", nn.Parameter(0.1 * torch.randn(p)))
            d = p

    def forward(self, x):
        for i, op in enumerate(self.ops):
            w, b = getattr(self, f"w{i}"), getattr(self, f"b{i}", None)
            if op.kind == "linear":
                x = F.linear(x, w, b)
            elif op.kind == "matmul":
                x = x @ w
            elif op.kind == "matmul_t":
                x = torch.matmul(x, w.t())
            elif op.kind == "addmm":
                d, p = w.shape
                flat = x.reshape(-1, d)  # [B*T, d] for rank-3 inputs: merged sample dimension
                beta, alpha = op.alpha_beta
                if b is None:
                    out = torch.mm(flat, w) if alpha == 1.0 else alpha * torch.mm(flat, w)
                else:
                    out = torch.addmm(b, flat, w, beta=beta, alpha=alpha)
                x = out.reshape(*x.shape[:-1], p)
            elif op.kind == "scale_shift":
                x = x * w + b
            elif op.kind == "vector":
                x = (x @ w).unsqueeze(-1)
            x = ACTIVATIONS[op.activation](x)
        return x


def broadcast_shapes(seq: int | None, d: int) -> list[tuple[int, ...]]:
    """Parameter shapes that broadcast against one sample's [d] or [T, d] without growing it."""
    shapes = [(), (1,), (d,), (1, d)]
    if seq is not None:
        shapes += [(seq, d), (seq, 1), (1, seq, d), (1, 1, d)]
    return shapes


@st.composite
def functional_models(draw) -> FunctionalSpec:
    seq = draw(st.none() | SEQ)
    d = d_in = draw(WIDTH)
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["linear", "matmul", "matmul_t", "addmm", "scale_shift", "vector"]))
        activation = draw(ACTIVATION)
        if kind == "scale_shift":
            shapes = broadcast_shapes(seq, d)
            op = Op(kind, d, scale_shape=draw(st.sampled_from(shapes)), shift_shape=draw(st.sampled_from(shapes)),
                    activation=activation)
        elif kind == "vector":
            op = Op(kind, 1, activation=activation)
        else:
            op = Op(
                kind, draw(WIDTH), bias=draw(st.booleans()),
                alpha_beta=draw(st.sampled_from([(1.0, 1.0), (0.5, 2.0)])) if kind == "addmm" else (1.0, 1.0),
                activation=activation,
            )
        ops.append(op)
        d = op.width
    return FunctionalSpec(d_in=d_in, ops=tuple(ops), batch=draw(BATCH), seq=seq)


# -- tied sites: one layer applied several times, one parameter used in several ways -------
@dataclass(frozen=True)
class TiedSpec:
    d: int
    repeats: int  # the same nn.Linear(d, d) applied this many times in sequence
    bias: bool
    activation: str
    uses: tuple[str, ...]  # further uses of self.W [d, d] and of fc's own parameters
    batch: int
    seq: int | None

    def build(self, dtype):
        model = Tied(self).to(dtype)
        x = torch.randn(input_shape(self.batch, self.seq, self.d), dtype=dtype)
        with torch.no_grad():
            y = torch.randn_like(model(x))
        return model, (x,), y


TIED_USES = ["linear", "matmul", "matmul_t", "scale_row", "shift_diagonal", "fc_weight_matmul", "fc_bias_scale"]


class Tied(nn.Module):
    def __init__(self, spec: TiedSpec):
        super().__init__()
        self.spec = spec
        self.fc = nn.Linear(spec.d, spec.d, bias=spec.bias)
        self.W = nn.Parameter(torch.randn(spec.d, spec.d) / spec.d**0.5)

    def forward(self, x):
        act = ACTIVATIONS[self.spec.activation]
        h = x
        for _ in range(self.spec.repeats):
            h = act(self.fc(h))
        for use in self.spec.uses:
            if use == "linear":
                h = F.linear(h, self.W)
            elif use == "matmul":
                h = h @ self.W
            elif use == "matmul_t":
                h = torch.matmul(h, self.W.t())
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
def tied_models(draw) -> TiedSpec:
    bias = draw(st.booleans())
    uses = [u for u in TIED_USES if bias or u != "fc_bias_scale"]
    return TiedSpec(
        d=draw(WIDTH),
        repeats=draw(st.integers(2, 3)),
        bias=bias,
        activation=draw(ACTIVATION),
        uses=tuple(draw(st.lists(st.sampled_from(uses), max_size=4))),
        batch=draw(BATCH),
        seq=draw(st.none() | SEQ),
    )


# -- the check shared by every property ---------------------------------------------------
def summand_scale(model, loss_fn, inputs, targets, options) -> float:
    """The largest entry of any one term `C_i G_i` (over B for 'mean') of the clipped sum.

    In float32 the sum's rounding error is ~1e-7 of its terms, not of its result: when the
    clipped terms cancel (two samples with opposite gradients clipped to the same norm),
    a result-relative 1e-4 would compare rounding noise. 1e-4 of this scale is the float32
    absolute tolerance; the relative one stays 1e-4.
    """
    grads = per_sample_gradients(model, loss_fn, inputs, targets)
    groups = bkfx.compile(model, **options)._clip.groups
    scale = 0.0
    for i in range(targets.shape[0]):
        term, _ = clipped_sum_reference(
            {n: g[i : i + 1] for n, g in grads.items()}, max_grad_norm=options["max_grad_norm"],
            clipping=options["clipping"], loss_reduction="sum", groups=groups,
        )
        scale = max(scale, *(t.abs().max().item() for t in term.values()))
    return scale / targets.shape[0] if options["loss_reduction"] == "mean" else scale


def check(spec, seed: int, options: dict, dtype=torch.float64):
    torch.manual_seed(seed)
    model, inputs, targets = spec.build(dtype)
    loss = "ce" if isinstance(spec, SeqSpec) else getattr(spec, "loss", "mse")
    loss_fn = partial(LOSSES[loss], reduction=options["loss_reduction"])
    # which parameters an ordinary backward reaches: bkfx must leave None exactly where torch does
    loss_fn(model(*inputs), targets).backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None}
    atol = None if dtype == torch.float64 else 1e-4 * summand_scale(model, loss_fn, inputs, targets, options)
    dp, errors = assert_matches_reference(model, loss_fn, inputs, targets, atol=atol, **options)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen parameter {name} received a gradient"
        elif name not in reached:
            assert p.grad is None, f"{name} does not reach the loss but received a gradient"
        else:
            assert name in errors, f"{name} was not compared"
            assert p.grad is not None and p.grad.dtype == dtype and p.grad.shape == p.shape, name
    assert dp.per_sample_norms.shape == (targets.shape[0],)
    with torch.no_grad():
        assert torch.equal(dp(*inputs), model(*inputs)), "the compiled forward differs from the model's"


@given(spec=mlps(), seed=SEEDS, options=dp_options())
def test_mlp(spec, seed, options):
    check(spec, seed, options)


@given(spec=sequence_models(), seed=SEEDS, options=dp_options())
def test_sequence_model(spec, seed, options):
    check(spec, seed, options)


@given(spec=functional_models(), seed=SEEDS, options=dp_options())
def test_functional_calls(spec, seed, options):
    check(spec, seed, options)


@given(spec=tied_models(), seed=SEEDS, options=dp_options())
def test_tied_sites(spec, seed, options):
    check(spec, seed, options)


# LayerNorm over 2 features maps every input to about (-1, 1) or (1, -1); its backward is then
# float32 cancellation noise, as far from the float64 truth in the reference as in bkfx. The
# float64 properties above cover those widths.
@given(
    spec=mlps() | sequence_models(min_width=3) | functional_models() | tied_models(), seed=SEEDS,
    options=dp_options(),
)
def test_float32(spec, seed, options):
    check(spec, seed, options, dtype=torch.float32)
