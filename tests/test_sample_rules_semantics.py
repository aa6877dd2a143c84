"""Every registered sample rule, checked against its op's semantics.

A rule is a claim: "this op keeps samples apart, and sample i of the output lies at this
layout". For every op name in the sample-rule registry (`bkfx.rules.sample`: the dimension
maps and layout rules that the family modules of `bkfx/rules/` register), a generator draws
shapes and arguments; the op is put in a one-node graph whose batched inputs share a symbolic
batch size B (as a capture makes them), and the analysis runs on it. A refusal is always allowed. An accepted op must equal, at the claimed output
layout, the op run on each sample alone (a batch of one):
`batch_first(op(x), layout)[i] == batch_first(op(x[i:i+1]), layout)[0]` for every i.
A registered name without a generator fails the test, so a new rule comes with its check.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: F401 - kept for readers comparing with the functional API
import torch._dynamo.config
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, GraphModule
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import bkfx.rules.sample as sample
import passes.sample_dim as sd
from bkfx.errors import SampleMixingError
from bkfx._ir.layout import SampleLayout, batch_first
from bkfx._ir.meta import META_BATCH, META_BATCH_DIMS, META_LAYOUT, META_PROBE
from bkfx.rules.sample import LAYOUT, MAP, identity, layout_rule, ndim, sample_rule, sample_rules, works_along

aten = torch.ops.aten
f64 = torch.float64


class Batched:
    """A tensor input whose dim `dim` is the sample dimension."""

    dim = 0

    def __init__(self, t):
        self.t = t

    @property
    def batch(self) -> int:
        return self.t.shape[self.dim]

    def sample(self, i: int) -> torch.Tensor:
        return self.t.narrow(self.dim, i, 1)


class _BatchSize:
    """A size argument equal to the batch size (B batched, 1 per sample, the symbol in the graph)."""


BATCH = _BatchSize()


def _is_leaf(x):
    return isinstance(x, (Batched, _BatchSize, _Offsets))


def _concrete(args, sample: int | None, batch: int):
    def one(a):
        if isinstance(a, Batched):
            return a.t if sample is None else a.sample(sample)
        if isinstance(a, _Offsets):
            return torch.arange(0, (batch if sample is None else 1) * a.per, a.per)
        if a is BATCH:
            return batch if sample is None else 1
        return a

    return pytree.tree_map(one, args, is_leaf=_is_leaf)


def analyse(op, args, kwargs):
    """The call of `op` as a graph node with B symbolic; the node after `sample_dim`."""
    leaves = [a for a in pytree.tree_leaves((args, kwargs), is_leaf=_is_leaf) if isinstance(a, Batched)]
    batch = leaves[0].batch
    with torch._dynamo.config.patch(fake_tensor_cache_enabled=False):  # one call per op: a cache only costs
        return _analyse(op, args, kwargs)


def _analyse(op, args, kwargs):
    leaves = [a for a in pytree.tree_leaves((args, kwargs), is_leaf=_is_leaf) if isinstance(a, Batched)]
    batch = leaves[0].batch
    mode = FakeTensorMode(shape_env=ShapeEnv())
    seed = mode.from_tensor(
        torch.empty(batch), symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC])
    )
    B = seed.shape[0]
    graph = Graph()
    size_node = graph.placeholder("seed")
    size_node.meta["val"] = seed
    counter = iter(range(1000))
    batch_node = graph.call_function(aten.sym_size.int, (size_node, 0))
    batch_node.meta["val"] = B
    fakes, dims = {}, {}

    def node_of(a):
        if isinstance(a, _Flat):  # [B*T] ids: a [B, T] input flattened, as nn.EmbeddingBag does
            rows = node_of(Batched(a.t.reshape(-1, a.per)))
            with mode:
                fake = rows.meta["val"].reshape(-1)
            n = graph.call_function(aten.view.default, (rows, [-1]))
            n.meta["val"] = fake
            return n
        if isinstance(a, _Offsets):
            with mode:
                fake = torch.arange(0, B * a.per, a.per)
            n = graph.call_function(aten.arange.start_step, (0, B * a.per, a.per))
            n.meta["val"] = fake
            return n
        if isinstance(a, Batched):
            with mode:
                fake = torch.empty([*a.t.shape[: a.dim], B, *a.t.shape[a.dim + 1 :]], dtype=a.t.dtype)
            n = graph.placeholder(f"x{next(counter)}")
            n.meta["val"] = fake
            dims[n.name] = a.dim
            return n
        if a is BATCH:
            return batch_node
        if isinstance(a, torch.Tensor):
            n = graph.placeholder(f"c{next(counter)}")
            n.meta["val"] = mode.from_tensor(a)
            fakes[n] = n.meta["val"]
            return n
        return a

    node_args, node_kwargs = pytree.tree_map(node_of, (args, kwargs), is_leaf=_is_leaf)

    def fake_of(a):
        if isinstance(a, torch.fx.Node):
            return a.meta["val"]
        return a

    try:
        with mode:
            val = op(*pytree.tree_map(fake_of, node_args), **pytree.tree_map(fake_of, node_kwargs))
    except Exception:  # noqa: BLE001 - some kernels have no symbolic meta (negative pads, data-dependent sizes)
        val = _measured_val(op, args, kwargs, batch, B, mode)
    call = graph.call_function(op, tuple(node_args), node_kwargs)
    call.meta["val"] = val
    graph.output(call)
    gm = GraphModule(torch.nn.Module(), graph)
    gm.meta[META_BATCH] = B.node.expr
    gm.meta[META_BATCH_DIMS] = dims
    sd.sample_dim(gm)
    return call


def _measured_val(op, args, kwargs, batch: int, B, mode):
    """The output's shapes in B, measured: run the op at batch sizes `batch` and `batch + 1`; a
    dimension of size `a * batch + c` at the one and `a * (batch + 1) + c` at the other is `a*B + c`."""
    def grown(a):
        if isinstance(a, Batched):
            extra = a.sample(a.batch - 1)
            out = type(a).__new__(type(a))
            out.__dict__.update(a.__dict__)
            out.t = torch.cat([a.t, extra], dim=a.dim)
            return out
        return a

    more = pytree.tree_map(grown, (args, kwargs), is_leaf=_is_leaf)
    first = op(*_concrete(args, None, batch), **_concrete(kwargs, None, batch))
    second = op(*_concrete(more[0], None, batch + 1), **_concrete(more[1], None, batch + 1))

    def fake(x, y):
        if not isinstance(x, torch.Tensor):
            return x
        shape = [sx if sx == sy else (sy - sx) * B + (sx - (sy - sx) * batch) for sx, sy in zip(x.shape, y.shape)]
        with mode:
            return torch.empty(shape, dtype=x.dtype)

    if isinstance(first, (list, tuple)):
        return type(first)(fake(x, y) for x, y in zip(first, second))
    return fake(first, second)


# outputs that hold a bag's number, which is the sample's own index (embedding_bag's offset2bag)
BAG_NUMBERS = {("embedding_bag", 1), ("_embedding_bag", 1)}


def check_claim(op, args, kwargs=None):
    """Run the rule on `op(*args)`: a refusal passes; an acceptance must hold on the values."""
    kwargs = kwargs or {}
    batch = next(a.batch for a in pytree.tree_leaves((args, kwargs), is_leaf=_is_leaf) if isinstance(a, Batched))
    try:
        node = analyse(op, args, kwargs)
    except SampleMixingError:
        return "refused"
    assert not node.meta[META_PROBE], f"{op}: a registered rule left the op to the probe"
    layouts = node.meta[META_LAYOUT]
    whole = op(*_concrete(args, None, batch), **_concrete(kwargs, None, batch))
    outs = list(whole) if isinstance(whole, (list, tuple)) else [whole]
    layouts = list(layouts) if isinstance(layouts, tuple) else [layouts]
    for i in range(batch):
        alone = op(*_concrete(args, i, batch), **_concrete(kwargs, i, batch))
        alone = list(alone) if isinstance(alone, (list, tuple)) else [alone]
        for k, (out, lo) in enumerate(zip(outs, layouts)):
            if not isinstance(lo, SampleLayout) or not isinstance(out, torch.Tensor):
                continue
            got, want = batch_first(out, lo)[i], batch_first(alone[k], lo)[0]
            if (op.__name__.split(".")[0], k) in BAG_NUMBERS:
                got = got - i  # the bag each id belongs to: sample i's bag is i, alone it is 0
            assert got.shape == want.shape, f"{op} output {k} ({lo.describe()}): sample {i} has shape {tuple(want.shape)} alone"
            if got.is_floating_point() or got.is_complex():
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{op} output {k} ({lo.describe()}), sample {i}: {m}")
            else:
                assert torch.equal(got, want), f"{op} output {k} ({lo.describe()}), sample {i} differs from the sample alone"
    return "accepted"


# ---- generators: (draw, B) -> (op overload, args, kwargs) ----------------------------------------

small = st.integers(1, 4)


def _x(draw, B, rank=None, min_rank=1, max_rank=4, dtype=f64):
    rank = rank if rank is not None else draw(st.integers(min_rank, max_rank))
    shape = [B] + [draw(st.integers(2, 4)) for _ in range(rank - 1)]
    return torch.randn(shape, dtype=dtype), shape


def _dim(draw, rank):
    return draw(st.integers(-rank, rank - 1))


def g_permute(draw, B):
    x, s = _x(draw, B)
    return aten.permute.default, (Batched(x), draw(st.permutations(range(len(s))))), {}


def g_transpose(draw, B):
    x, s = _x(draw, B, min_rank=2)
    return aten.transpose.int, (Batched(x), _dim(draw, len(s)), _dim(draw, len(s))), {}


def g_t(draw, B):
    x, _ = _x(draw, B, rank=draw(st.integers(1, 2)))
    return aten.t.default, (Batched(x),), {}


def g_numpy_T(draw, B):
    x, _ = _x(draw, B)
    return aten.numpy_T.default, (Batched(x),), {}


def g_movedim(draw, B):
    x, s = _x(draw, B, min_rank=2)
    return aten.movedim.int, (Batched(x), _dim(draw, len(s)), _dim(draw, len(s))), {}


def g_unsqueeze(draw, B):
    x, s = _x(draw, B)
    return aten.unsqueeze.default, (Batched(x), draw(st.integers(-len(s) - 1, len(s)))), {}


def g_squeeze(draw, B):
    x = torch.randn(B, 1, 3, 1, dtype=f64)
    # squeeze() without dims would also drop a batch of one, which a capture (B >= 2, symbolic) never does
    d = draw(st.sampled_from([1, -1, [1, 3], 2]))
    return aten.squeeze.dims if isinstance(d, list) else aten.squeeze.dim, (Batched(x), d), {}


def g_expand(draw, B):
    x = torch.randn(B, 1, 3, dtype=f64)
    return aten.expand.default, (Batched(x), [draw(st.integers(1, 3)), BATCH, 4, 3]), {}


def g_expand_as(draw, B):
    x, other = torch.randn(B, 1, 3, dtype=f64), torch.randn(B, 4, 3, dtype=f64)
    if draw(st.booleans()):
        return aten.expand_as.default, (Batched(x), Batched(other)), {}
    return aten.expand_as.default, (torch.randn(1, 3, dtype=f64), Batched(other)), {}


def g_broadcast_to(draw, B):
    x = torch.randn(B, 1, dtype=f64)
    return aten.broadcast_to.default, (Batched(x), [BATCH, 3]), {}


def g_type_as(draw, B):
    mask = torch.randint(0, 2, (B, 3))
    return aten.type_as.default, (Batched(mask), Batched(torch.randn(B, 3, 2, dtype=f64))), {}


def g_repeat(draw, B):
    x, s = _x(draw, B, max_rank=3)
    reps = [draw(st.integers(1, 2)) for _ in range(len(s) + draw(st.integers(0, 1)))]
    return aten.repeat.default, (Batched(x), reps), {}


def g_tile(draw, B):
    x, s = _x(draw, B, max_rank=3)
    return aten.tile.default, (Batched(x), [draw(st.integers(1, 2)) for _ in range(len(s))]), {}


def g_slice(draw, B):
    x, s = _x(draw, B)
    d = draw(st.integers(0, len(s) - 1))
    start = draw(st.integers(0, 1))
    return aten.slice.Tensor, (Batched(x), d, start, draw(st.sampled_from([None, 2, -1])), draw(st.integers(1, 2))), {}


def g_narrow(draw, B):
    x, s = _x(draw, B)
    d = draw(st.integers(0, len(s) - 1))
    return aten.narrow.default, (Batched(x), d, draw(st.integers(0, 1)), 1), {}


def _split_family(op, sizes_or_int):
    def gen(draw, B):
        x, s = _x(draw, B, min_rank=2)
        d = draw(st.integers(0, len(s) - 1))
        arg = [1, s[d] - 1] if sizes_or_int == "sizes" else draw(st.integers(1, 2))
        return op, (Batched(x), arg, d), {}

    return gen


def g_chunk(draw, B):
    x, s = _x(draw, B, min_rank=2)
    return aten.chunk.default, (Batched(x), draw(st.integers(1, 3)), draw(st.integers(0, len(s) - 1))), {}


def g_tensor_split(draw, B):
    x, s = _x(draw, B, min_rank=2)
    return aten.tensor_split.sections, (Batched(x), draw(st.integers(1, 3)), draw(st.integers(0, len(s) - 1))), {}


def _pads(draw, rank):
    return [draw(st.integers(-1, 2)) for _ in range(2 * draw(st.integers(1, rank)))]


def g_constant_pad_nd(draw, B):
    x, s = _x(draw, B, min_rank=2)
    return aten.constant_pad_nd.default, (Batched(x), _pads(draw, len(s)), 0.5), {}


def g_pad(draw, B):
    x, s = _x(draw, B, min_rank=2)
    return aten.pad.default, (Batched(x), _pads(draw, len(s)), "constant", 0.5), {}


def g_renorm(draw, B):
    x, s = _x(draw, B, min_rank=2)
    return aten.renorm.default, (Batched(x), 2.0, _dim(draw, len(s)), 0.5), {}


def g_cross(draw, B):
    a, b = torch.randn(B, 2, 3, dtype=f64), torch.randn(B, 2, 3, dtype=f64)
    return aten.cross.default, (Batched(a), Batched(b), draw(st.sampled_from([-1, 2, 0]))), {}


def g_linalg_cross(draw, B):
    a, b = torch.randn(B, 3, dtype=f64), torch.randn(B, 3, dtype=f64)
    return aten.linalg_cross.default, (Batched(a), Batched(b)), {"dim": draw(st.sampled_from([-1, 0]))}


def _unique_gen(op, extra):
    def gen(draw, B):
        x = torch.randint(0, 3, (B, 4))
        return op, (Batched(x), *extra), {}

    return gen


def g_view_as_real(draw, B):
    x = torch.randn(B, 3, dtype=torch.complex128)
    return aten.view_as_real.default, (Batched(x),), {}


def g_view_as_complex(draw, B):
    x = torch.randn(B, 3, 2, dtype=f64)
    return aten.view_as_complex.default, (Batched(x),), {}


def g_select(draw, B):
    x, s = _x(draw, B, min_rank=2)
    d = draw(st.integers(0, len(s) - 1))
    return aten.select.int, (Batched(x), d, 1), {}


def g_unbind(draw, B):
    x, s = _x(draw, B, min_rank=2)
    return aten.unbind.int, (Batched(x), draw(st.integers(0, len(s) - 1))), {}


def _cat_gen(op):
    def gen(draw, B):
        x, s = _x(draw, B)
        y = torch.randn(s, dtype=f64)
        d = draw(st.integers(0, len(s) - 1))
        return op, ([Batched(x), Batched(y) if draw(st.booleans()) else y[:1].expand(s).clone()], d), {}

    return gen


def g_stack(draw, B):
    x, s = _x(draw, B)
    return aten.stack.default, ([Batched(x), Batched(torch.randn(s, dtype=f64))], draw(st.integers(0, len(s)))), {}


_REDUCTION_OPS = {
    "sum": aten.sum.dim_IntList, "mean": aten.mean.dim, "amax": aten.amax.default, "amin": aten.amin.default,
    "prod": aten.prod.dim_int, "logsumexp": aten.logsumexp.default, "nansum": aten.nansum.default,
    "nanmean": aten.nanmean.default, "var": aten.var.correction, "std": aten.std.correction,
    "var_mean": aten.var_mean.correction, "std_mean": aten.std_mean.correction, "argmax": aten.argmax.default,
    "argmin": aten.argmin.default, "any": aten.any.dim, "all": aten.all.dim, "count_nonzero": aten.count_nonzero.dim_IntList,
    "norm": aten.norm.ScalarOpt_dim, "linalg_vector_norm": aten.linalg_vector_norm.default, "aminmax": aten.aminmax.default,
    "max": aten.max.dim, "min": aten.min.dim,
}
_ONE_DIM = {"prod", "argmax", "argmin", "any", "all", "aminmax", "max", "min"}


def _reduction_gen(name):
    op = _REDUCTION_OPS[name]

    def gen(draw, B):
        x, s = _x(draw, B, min_rank=2)
        if name in ("any", "all"):
            x = x > 0
        keep = draw(st.booleans())
        if name in ("max", "min") and draw(st.booleans()):
            return getattr(aten, name).other, (Batched(x), Batched(torch.randn(s, dtype=f64))), {}
        if name in _ONE_DIM:
            d = _dim(draw, len(s))
            return op, (Batched(x),), {"dim": d, "keepdim": keep}
        dims = draw(st.lists(st.integers(0, len(s) - 1), min_size=1, max_size=len(s), unique=True))
        if name in ("count_nonzero",):
            return op, (Batched(x), dims), {}
        if name == "norm":
            return op, (Batched(x), 2.0, dims, keep), {}
        if name == "linalg_vector_norm":
            return op, (Batched(x), 2.0, dims, keep), {}
        if name in ("var", "std", "var_mean", "std_mean"):
            return op, (Batched(x), dims), {"correction": 0, "keepdim": keep}
        return op, (Batched(x), dims, keep), {}

    return gen


def _along_gen(op, make):
    def gen(draw, B):
        x, s = _x(draw, B, min_rank=2)
        return op, make(draw, x, s), {}

    return gen


def _d(draw, s):
    return _dim(draw, len(s))


_ALONG_OPS = {
    "softmax": (aten.softmax.int, lambda d, x, s: (Batched(x), _d(d, s))),
    "_softmax": (aten._softmax.default, lambda d, x, s: (Batched(x), _d(d, s), False)),
    "log_softmax": (aten.log_softmax.int, lambda d, x, s: (Batched(x), _d(d, s))),
    "_log_softmax": (aten._log_softmax.default, lambda d, x, s: (Batched(x), _d(d, s), False)),
    "special_softmax": (aten.special_softmax.default, lambda d, x, s: (Batched(x), _d(d, s))),
    "special_log_softmax": (aten.special_log_softmax.default, lambda d, x, s: (Batched(x), _d(d, s))),
    "_safe_softmax": (aten._safe_softmax.default, lambda d, x, s: (Batched(x), _d(d, s))),
    "cumsum": (aten.cumsum.default, lambda d, x, s: (Batched(x), _d(d, s))),
    "cumprod": (aten.cumprod.default, lambda d, x, s: (Batched(x), _d(d, s))),
    "logcumsumexp": (aten.logcumsumexp.default, lambda d, x, s: (Batched(x), _d(d, s))),
    "cummax": (aten.cummax.default, lambda d, x, s: (Batched(x), _d(d, s))),
    "cummin": (aten.cummin.default, lambda d, x, s: (Batched(x), _d(d, s))),
    "sort": (aten.sort.default, lambda d, x, s: (Batched(x), _d(d, s))),
    "argsort": (aten.argsort.default, lambda d, x, s: (Batched(x), _d(d, s))),
    "topk": (aten.topk.default, lambda d, x, s: (Batched(x), 1, _d(d, s))),
    "kthvalue": (aten.kthvalue.default, lambda d, x, s: (Batched(x), 1, _d(d, s))),
    "median": (aten.median.dim, lambda d, x, s: (Batched(x), _d(d, s))),
    "nanmedian": (aten.nanmedian.dim, lambda d, x, s: (Batched(x), _d(d, s))),
    "mode": (aten.mode.default, lambda d, x, s: (Batched(x), _d(d, s))),
    "glu": (aten.glu.default, lambda d, x, s: (Batched(x.repeat_interleave(2, -1)), -1 if s[0] % 2 or d(st.booleans()) else 0)),
    "flip": (aten.flip.default, lambda d, x, s: (Batched(x), [_d(d, s)])),
    "roll": (aten.roll.default, lambda d, x, s: (Batched(x), [1], [_d(d, s)])),
    "unfold": (aten.unfold.default, lambda d, x, s: (Batched(x), _d(d, s), 2, 1)),
    "diff": (aten.diff.default, lambda d, x, s: (Batched(x), 1, _d(d, s))),
    "_weight_norm_interface": (aten._weight_norm_interface.default,
                               lambda d, x, s: (Batched(x), Batched(torch.rand(s[0], *[1] * (len(s) - 1), dtype=f64) + 1), 0)),
}
_FFT_OPS = {
    "_fft_r2c": (aten._fft_r2c.default, lambda d, x, s: (Batched(x), [len(s) - 1 if d(st.booleans()) else 0], 0, True)),
    "_fft_c2r": (aten._fft_c2r.default, lambda d, x, s: (Batched(x.to(torch.complex128)), [len(s) - 1 if d(st.booleans()) else 0], 0, 4)),
    "_fft_c2c": (aten._fft_c2c.default, lambda d, x, s: (Batched(x.to(torch.complex128)), [len(s) - 1 if d(st.booleans()) else 0], 0, True)),
    "fft_fft": (aten.fft_fft.default, lambda d, x, s: (Batched(x), None, _d(d, s))),
    "fft_ifft": (aten.fft_ifft.default, lambda d, x, s: (Batched(x), None, _d(d, s))),
    "fft_rfft": (aten.fft_rfft.default, lambda d, x, s: (Batched(x), None, _d(d, s))),
    "fft_irfft": (aten.fft_irfft.default, lambda d, x, s: (Batched(x), None, _d(d, s))),
    "fft_hfft": (aten.fft_hfft.default, lambda d, x, s: (Batched(x), None, _d(d, s))),
    "fft_ihfft": (aten.fft_ihfft.default, lambda d, x, s: (Batched(x), None, _d(d, s))),
    "fft_fftn": (aten.fft_fftn.default, lambda d, x, s: (Batched(x), None, [_d(d, s)])),
    "fft_rfftn": (aten.fft_rfftn.default, lambda d, x, s: (Batched(x), None, [_d(d, s)])),
    "fft_fft2": (aten.fft_fft2.default, lambda d, x, s: (Batched(x), None, [-1, _d(d, s) if d(st.booleans()) else 0])),
    "fft_rfft2": (aten.fft_rfft2.default, lambda d, x, s: (Batched(x), None, [0, -1] if d(st.booleans()) else [-2, -1])),
}


def _table_gen(table, name):
    op, make = table[name]

    def gen(draw, B):
        x, s = _x(draw, B, min_rank=2)
        return op, make(draw, x, s), {}

    return gen


def g_gather(draw, B):
    x, s = _x(draw, B, rank=2)
    d = draw(st.integers(0, 1))
    index = torch.randint(0, s[d], (B, s[1]))  # per sample: an index row per sample
    return aten.gather.default, (Batched(x), d, Batched(index)), {}


def g_index_select(draw, B):
    x, s = _x(draw, B, rank=2)
    d = draw(st.integers(0, 1))
    return aten.index_select.default, (Batched(x), d, torch.randint(0, s[d], (3,))), {}


def _scatter_gen(op):
    def gen(draw, B):
        x = torch.randn(B, 4, dtype=f64)
        d = draw(st.integers(0, 1))
        index = torch.randint(0, (B, 4)[d], (B, 3))
        src = torch.randn(B, 3, dtype=f64)
        extra = ("sum",) if op is aten.scatter_reduce.two else ()
        return op, (Batched(x), d, Batched(index), Batched(src), *extra), {}

    return gen


def g_mm(draw, B):
    a, b = torch.randn(B, 3, dtype=f64), torch.randn(3, 4, dtype=f64)
    if draw(st.booleans()):  # the batch contracted: (3 x B) @ (B x 2)
        return aten.mm.default, (torch.randn(3, B, dtype=f64), Batched(torch.randn(B, 2, dtype=f64))), {}
    return aten.mm.default, (Batched(a), b), {}


def g_addmm(draw, B):
    return aten.addmm.default, (torch.randn(4, dtype=f64), Batched(torch.randn(B, 3, dtype=f64)), torch.randn(3, 4, dtype=f64)), {}


def g_bmm(draw, B):
    return aten.bmm.default, (Batched(torch.randn(B, 2, 3, dtype=f64)), Batched(torch.randn(B, 3, 4, dtype=f64))), {}


def g_baddbmm(draw, B):
    return aten.baddbmm.default, (torch.randn(2, 4, dtype=f64), Batched(torch.randn(B, 2, 3, dtype=f64)),
                                  Batched(torch.randn(B, 3, 4, dtype=f64))), {}


def g_mv(draw, B):
    return aten.mv.default, (Batched(torch.randn(B, 3, dtype=f64)), torch.randn(3, dtype=f64)), {}


def g_addmv(draw, B):
    return aten.addmv.default, (torch.randn(1, dtype=f64), Batched(torch.randn(B, 3, dtype=f64)), torch.randn(3, dtype=f64)), {}


def g_dot(draw, B):
    return aten.dot.default, (Batched(torch.randn(B, dtype=f64)), torch.randn(B, dtype=f64)), {}


def g_vdot(draw, B):
    return aten.vdot.default, (Batched(torch.randn(B, dtype=f64)), torch.randn(B, dtype=f64)), {}


def g_outer(draw, B):
    return aten.outer.default, (Batched(torch.randn(B, dtype=f64)), torch.randn(3, dtype=f64)), {}


def g_ger(draw, B):
    return aten.ger.default, (torch.randn(3, dtype=f64), Batched(torch.randn(B, dtype=f64))), {}


def g_matmul(draw, B):
    ra = draw(st.integers(1, 3))
    a = torch.randn([B] + [3] * (ra - 1), dtype=f64) if ra > 1 else torch.randn(B, dtype=f64)
    if ra == 1:
        return aten.matmul.default, (torch.randn(2, B, dtype=f64), Batched(a)), {}
    b = torch.randn([3, 2] if draw(st.booleans()) else [3], dtype=f64)
    return aten.matmul.default, (Batched(a), b), {}


def g_linear(draw, B):
    x, s = _x(draw, B, min_rank=1, max_rank=3)
    return aten.linear.default, (Batched(x), torch.randn(2, s[-1], dtype=f64), torch.randn(2, dtype=f64)), {}


def g_einsum(draw, B):
    eq, shapes = draw(st.sampled_from([
        ("bi,ij->bj", [(None, 3), (3, 2)]), ("bij,bjk->bik", [(None, 2, 3), (None, 3, 2)]),
        ("bi,ci->bc", [(None, 3), (None, 3)]), ("...i,i", [(None, 3), (3,)]), ("bi->ib", [(None, 3)]),
        ("bi,bi->i", [(None, 3), (None, 3)]),
    ]))
    ops = [Batched(torch.randn([B, *s[1:]], dtype=f64)) if s[0] is None else torch.randn(s, dtype=f64) for s in shapes]
    return aten.einsum.default, (eq, ops), {}


def _conv_gen(op, k, transposed=False, style="conv"):
    def gen(draw, B):
        x = torch.randn([B, 2] + [5] * k, dtype=f64)
        w = torch.randn(([2, 3] if transposed else [3, 2]) + [2] * k, dtype=f64)
        bias = torch.randn(3, dtype=f64)
        if style == "conv":
            return op, (Batched(x), w, bias), {}
        if style == "convolution":
            return op, (Batched(x), w, bias, [1] * k, [0] * k, [1] * k, transposed, [0] * k, 1), {}
        if style == "_convolution":
            return op, (Batched(x), w, bias, [1] * k, [0] * k, [1] * k, transposed, [0] * k, 1, False, False, True, True), {}
        return op, (Batched(x), w, bias), {}

    return gen


_POOL_ARGS = {
    "max_pool1d": (1, lambda: ([2],)), "max_pool2d": (2, lambda: ([2, 2],)), "max_pool3d": (3, lambda: ([2, 2, 2],)),
    "max_pool1d_with_indices": (1, lambda: ([2],)), "max_pool2d_with_indices": (2, lambda: ([2, 2],)),
    "max_pool3d_with_indices": (3, lambda: ([2, 2, 2],)), "avg_pool1d": (1, lambda: ([2],)),
    "avg_pool2d": (2, lambda: ([2, 2],)), "avg_pool3d": (3, lambda: ([2, 2, 2],)),
    "adaptive_avg_pool1d": (1, lambda: ([2],)), "adaptive_avg_pool2d": (2, lambda: ([2, 2],)),
    "adaptive_avg_pool3d": (3, lambda: ([2, 2, 2],)), "_adaptive_avg_pool2d": (2, lambda: ([2, 2],)),
    "_adaptive_avg_pool3d": (3, lambda: ([2, 2, 2],)), "adaptive_max_pool1d": (1, lambda: ([2],)),
    "adaptive_max_pool2d": (2, lambda: ([2, 2],)), "adaptive_max_pool3d": (3, lambda: ([2, 2, 2],)),
    "upsample_nearest1d": (1, lambda: ([8],)), "upsample_nearest2d": (2, lambda: ([8, 8],)),
    "upsample_nearest3d": (3, lambda: ([8, 8, 8],)), "upsample_linear1d": (1, lambda: ([8], False)),
    "upsample_bilinear2d": (2, lambda: ([8, 8], False)), "upsample_bicubic2d": (2, lambda: ([8, 8], False)),
    "upsample_trilinear3d": (3, lambda: ([8, 8, 8], False)), "_upsample_nearest_exact1d": (1, lambda: ([8],)),
    "_upsample_nearest_exact2d": (2, lambda: ([8, 8],)), "_upsample_nearest_exact3d": (3, lambda: ([8, 8, 8],)),
    "_upsample_bilinear2d_aa": (2, lambda: ([8, 8], False)), "reflection_pad1d": (1, lambda: ([1, 2],)),
    "reflection_pad2d": (2, lambda: ([1, 2, 0, 1],)), "reflection_pad3d": (3, lambda: ([1, 0, 1, 1, 0, 1],)),
    "replication_pad1d": (1, lambda: ([1, 2],)), "replication_pad2d": (2, lambda: ([1, 2, 0, 1],)),
    "replication_pad3d": (3, lambda: ([1, 0, 1, 1, 0, 1],)),
    "pixel_shuffle": (3, lambda: (2,)), "pixel_unshuffle": (3, lambda: (2,)), "channel_shuffle": (3, lambda: (2,)),
    "im2col": (3, lambda: ([2, 2], [1, 1], [0, 0], [1, 1])),
}
_POOL_OVERLOAD = {
    "upsample_nearest1d": "vec", "upsample_nearest2d": "vec", "upsample_nearest3d": "vec", "upsample_linear1d": "vec",
    "upsample_bilinear2d": "vec", "upsample_bicubic2d": "vec", "upsample_trilinear3d": "vec",
    "_upsample_nearest_exact1d": "vec", "_upsample_nearest_exact2d": "vec", "_upsample_nearest_exact3d": "vec",
    "_upsample_bilinear2d_aa": "vec",
}


def _pool_gen(name):
    k, extra = _POOL_ARGS[name]
    packet = getattr(aten, name)
    overload = _POOL_OVERLOAD.get(name, "default")
    op = getattr(packet, overload)

    def gen(draw, B):
        channels = 8 if name in ("pixel_shuffle", "channel_shuffle") else 2
        x = torch.randn([B, channels] + [4] * (2 if k == 3 and name in ("pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "im2col") else k), dtype=f64)
        args = extra()
        if overload == "vec":
            size = args[0]
            args = (size, *args[1:], None) if len(args) > 1 else (size, None)
        return op, (Batched(x), *args), {}

    return gen


def g_fractional_max_pool2d(draw, B):
    x = torch.randn(B, 2, 6, 6, dtype=f64)
    samples = torch.rand(B, 2, 2, dtype=f64)
    return aten.fractional_max_pool2d.default, (Batched(x), [2, 2], [3, 3], Batched(samples)), {}


def g_col2im(draw, B):
    x = torch.randn(B, 8, 9, dtype=f64)
    return aten.col2im.default, (Batched(x), [4, 4], [2, 2], [1, 1], [0, 0], [1, 1]), {}


def g_grid_sampler_2d(draw, B):
    x, grid = torch.randn(B, 2, 4, 4, dtype=f64), torch.rand(B, 3, 3, 2, dtype=f64) * 2 - 1
    return aten.grid_sampler_2d.default, (Batched(x), Batched(grid), 0, 0, False), {}


def g_layer_norm(draw, B):
    x, s = _x(draw, B, min_rank=2)
    k = draw(st.integers(1, len(s)))
    return aten.layer_norm.default, (Batched(x), s[len(s) - k:]), {}


def g_native_layer_norm(draw, B):
    x, s = _x(draw, B, min_rank=2)
    return aten.native_layer_norm.default, (Batched(x), s[-1:], torch.randn(s[-1], dtype=f64), None, 1e-5), {}


def g_rms_norm(draw, B):
    x, s = _x(draw, B, min_rank=2)
    return aten.rms_norm.default, (Batched(x), s[-1:], torch.randn(s[-1], dtype=f64)), {}


def g__fused_rms_norm(draw, B):
    x, s = _x(draw, B, min_rank=2)
    return aten._fused_rms_norm.default, (Batched(x), s[-1:], torch.randn(s[-1], dtype=f64), 1e-5), {}


def g_group_norm(draw, B):
    return aten.group_norm.default, (Batched(torch.randn(B, 4, 3, dtype=f64)), 2), {}


def g_native_group_norm(draw, B):
    return aten.native_group_norm.default, (Batched(torch.randn(B, 4, 3, dtype=f64)), None, None, BATCH, 4, 3, 2, 1e-5), {}


def g_instance_norm(draw, B):
    return aten.instance_norm.default, (Batched(torch.randn(B, 4, 3, dtype=f64)), None, None, None, None, True, 0.1, 1e-5, False), {}


def _batch_norm_gen(op, make):
    def gen(draw, B):
        x = torch.randn(B, 3, 4, dtype=f64)
        mean, var = torch.randn(3, dtype=f64), torch.rand(3, dtype=f64) + 0.5
        args = list(make(draw, Batched(x), mean, var))
        args[1:3] = [torch.randn(3, dtype=f64), torch.randn(3, dtype=f64)]  # weight, bias
        return op, tuple(args), {}

    return gen


_BATCH_NORM_CALLS = {
    "batch_norm": lambda d, x, m, v: (x, None, None, m, v, d(st.booleans()), 0.1, 1e-5, False),
    "native_batch_norm": lambda d, x, m, v: (x, None, None, m, v, d(st.booleans()), 0.1, 1e-5),
    "_native_batch_norm_legit": lambda d, x, m, v: (x, None, None, m, v, d(st.booleans()), 0.1, 1e-5),
    "_native_batch_norm_legit_functional": lambda d, x, m, v: (x, None, None, m, v, d(st.booleans()), 0.1, 1e-5),
    "_batch_norm_with_update": lambda d, x, m, v: (x, None, None, m, v, 0.1, 1e-5),
    "_batch_norm_impl_index": lambda d, x, m, v: (x, None, None, m, v, d(st.booleans()), 0.1, 1e-5, False),
}


def _attention_gen(op, style):
    def gen(draw, B):
        q, k, v = (torch.randn(B, 2, 3, 4, dtype=f64) for _ in range(3))
        if style == "sdpa":
            mask = torch.randn(B, 1, 3, 3, dtype=f64)
            return op, (Batched(q), Batched(k), Batched(v), Batched(mask) if draw(st.booleans()) else None), {}
        return op, (Batched(q), Batched(k), Batched(v)), {}

    return gen


def g_embedding(draw, B):
    return aten.embedding.default, (torch.randn(5, 3, dtype=f64), Batched(torch.randint(0, 5, (B, 2)))), {}


def g_embedding_renorm(draw, B):
    return aten.embedding_renorm.default, (torch.randn(5, 3, dtype=f64), Batched(torch.randint(0, 5, (B, 2))), 1.0, 2.0), {}


def _index_gen(op):
    def gen(draw, B):
        x = torch.randn(B, 4, 3, dtype=f64)
        kind = draw(st.integers(0, 2))
        if kind == 0:
            return op, (Batched(x), [None, torch.tensor([0, 2, 2])]), {}
        if kind == 1:
            return op, (Batched(x), [None, Batched(torch.randint(0, 4, (B,)))]), {}
        return op, (Batched(x), [torch.randint(0, B, (B,))]), {}

    return gen


def _recurrent_gen(name):
    def gen(draw, B):
        first = draw(st.booleans())
        x = torch.randn(B, 3, 2, dtype=f64)
        if not first:
            x = x.transpose(0, 1).contiguous()
        gates = {"lstm": 4, "gru": 3}.get(name, 1)
        params = [torch.randn(gates * 3, 2, dtype=f64), torch.randn(gates * 3, 3, dtype=f64),
                  torch.randn(gates * 3, dtype=f64), torch.randn(gates * 3, dtype=f64)]
        h = torch.randn(1, B, 3, dtype=f64)
        hx = [_Moved(h), _Moved(torch.randn(1, B, 3, dtype=f64))] if name == "lstm" else _Moved(h)
        inp = Batched(x) if first else _Moved(x)
        return getattr(aten, name).input, (inp, hx, params, True, 1, 0.0, False, False, first), {}

    return gen


class _Moved(Batched):
    """A tensor input whose sample dimension is dim 1 (sequence-first RNN inputs, hidden states)."""

    dim = 1


def g_embedding_bag(draw, B):
    ids = torch.randint(0, 5, (B * 2,))
    return aten.embedding_bag.default, (torch.randn(5, 3, dtype=f64), _Flat(ids, 2), _Offsets(2)), {}


class _Flat(Batched):
    """Flat ids, T per sample, contiguous ([B*T])."""

    def __init__(self, t, per):
        super().__init__(t)
        self.per = per

    @property
    def batch(self) -> int:
        return self.t.shape[0] // self.per

    def sample(self, i: int) -> torch.Tensor:
        return self.t[i * self.per : (i + 1) * self.per]


class _Offsets:
    """`arange(0, B*T, T)`."""

    def __init__(self, per):
        self.per = per


GENERATORS = {
    "permute": g_permute, "transpose": g_transpose, "t": g_t, "numpy_T": g_numpy_T, "movedim": g_movedim,
    "unsqueeze": g_unsqueeze, "squeeze": g_squeeze, "expand": g_expand, "expand_as": g_expand_as,
    "broadcast_to": g_broadcast_to, "type_as": g_type_as, "repeat": g_repeat, "tile": g_tile, "slice": g_slice,
    "narrow": g_narrow, "split": _split_family(aten.split.Tensor, "int"),
    "split_with_sizes": _split_family(aten.split_with_sizes.default, "sizes"), "chunk": g_chunk,
    "tensor_split": g_tensor_split, "unsafe_split": _split_family(aten.unsafe_split.Tensor, "int"),
    "unsafe_split_with_sizes": _split_family(aten.unsafe_split_with_sizes.default, "sizes"),
    "constant_pad_nd": g_constant_pad_nd, "pad": g_pad, "renorm": g_renorm, "cross": g_cross,
    "linalg_cross": g_linalg_cross,
    "_unique": _unique_gen(aten._unique.default, ()), "_unique2": _unique_gen(aten._unique2.default, ()),
    "unique_dim": _unique_gen(aten.unique_dim.default, (0,)), "unique_consecutive": _unique_gen(aten.unique_consecutive.default, ()),
    "unique_dim_consecutive": _unique_gen(aten.unique_dim_consecutive.default, (1,)),
    "view_as_real": g_view_as_real, "view_as_complex": g_view_as_complex, "select": g_select, "unbind": g_unbind,
    "cat": _cat_gen(aten.cat.default), "concat": _cat_gen(aten.concat.default),
    "concatenate": _cat_gen(aten.concatenate.default), "stack": g_stack,
    **{name: _reduction_gen(name) for name in _REDUCTION_OPS},
    **{name: _table_gen(_ALONG_OPS, name) for name in _ALONG_OPS},
    **{name: _table_gen(_FFT_OPS, name) for name in _FFT_OPS},
    "gather": g_gather, "index_select": g_index_select, "scatter": _scatter_gen(aten.scatter.src),
    "scatter_add": _scatter_gen(aten.scatter_add.default), "scatter_reduce": _scatter_gen(aten.scatter_reduce.two),
    "mm": g_mm, "addmm": g_addmm, "bmm": g_bmm, "baddbmm": g_baddbmm, "mv": g_mv, "addmv": g_addmv, "dot": g_dot,
    "vdot": g_vdot, "outer": g_outer, "ger": g_ger, "matmul": g_matmul, "linear": g_linear, "einsum": g_einsum,
    "conv1d": _conv_gen(aten.conv1d.default, 1), "conv2d": _conv_gen(aten.conv2d.default, 2),
    "conv3d": _conv_gen(aten.conv3d.default, 3), "conv_transpose1d": _conv_gen(aten.conv_transpose1d.default, 1, True),
    "conv_transpose2d": _conv_gen(aten.conv_transpose2d.input, 2, True),
    "conv_transpose3d": _conv_gen(aten.conv_transpose3d.input, 3, True),
    "convolution": _conv_gen(aten.convolution.default, 2, style="convolution"),
    "_convolution": _conv_gen(aten._convolution.default, 2, style="_convolution"),
    **{name: _pool_gen(name) for name in _POOL_ARGS},
    "fractional_max_pool2d": g_fractional_max_pool2d, "col2im": g_col2im, "grid_sampler_2d": g_grid_sampler_2d,
    "layer_norm": g_layer_norm, "native_layer_norm": g_native_layer_norm, "rms_norm": g_rms_norm,
    "_fused_rms_norm": g__fused_rms_norm, "group_norm": g_group_norm, "native_group_norm": g_native_group_norm,
    "instance_norm": g_instance_norm,
    **{name: _batch_norm_gen(getattr(aten, name).default, make) for name, make in _BATCH_NORM_CALLS.items()},
    "scaled_dot_product_attention": _attention_gen(aten.scaled_dot_product_attention.default, "sdpa"),
    "_scaled_dot_product_flash_attention_for_cpu": _attention_gen(aten._scaled_dot_product_flash_attention_for_cpu.default, "plain"),
    "embedding": g_embedding, "embedding_renorm": g_embedding_renorm, "index": _index_gen(aten.index.Tensor),
    "_unsafe_index": _index_gen(aten._unsafe_index.Tensor),
    **{name: _recurrent_gen(name) for name in ("lstm", "gru", "rnn_tanh", "rnn_relu")},
    "embedding_bag": g_embedding_bag, "_embedding_bag": g_embedding_bag,
}

# kernels that exist only on an accelerator: their rule is the very function of the CPU op named,
# whose semantics they share (the CPU op's generator checks it)
DEVICE_ONLY = {
    "mkldnn_convolution": "convolution",  # on CPU, but without a fake-tensor kernel for this harness
    "cudnn_convolution": "convolution", "miopen_batch_norm": "batch_norm", "cudnn_batch_norm": "batch_norm",
    "_scaled_dot_product_efficient_attention": "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention": "scaled_dot_product_attention",
    "_scaled_dot_product_cudnn_attention": "scaled_dot_product_attention",
}


# names registered for a torch function that is no ATen op (F.lp_pool*d and torch.unique decompose
# before a capture sees them): no graph holds them, so their rule is never applied
NOT_ATEN = {"lp_pool1d", "lp_pool2d", "lp_pool3d", "unique"}


def registered() -> list[str]:
    """The ops whose sample rule makes a claim to check: dimension maps and layout rules."""
    return sorted(op for op, r in sample_rules().items() if r.kind in (MAP, LAYOUT))


def missing_generators() -> list[str]:
    return [name for name in registered() if name not in GENERATORS and name not in DEVICE_ONLY and name not in NOT_ATEN]


def test_every_registered_rule_has_a_generator():
    assert not any(hasattr(aten, name) for name in NOT_ATEN), "an op of NOT_ATEN is an ATen op now: give it a generator"
    missing = missing_generators()
    assert not missing, f"sample rules without a semantics generator in this file: {missing}"
    rules = sample_rules()
    for name, twin in DEVICE_ONLY.items():
        assert rules[name].fn is rules[twin].fn, f"{name} has its own rule; give it a generator"


@pytest.fixture
def registry(monkeypatch):
    """A copy of the sample-rule registry, for rules registered or replaced by a test, dropped after it."""
    copy = dict(sample._SAMPLE_RULES)
    monkeypatch.setattr(sample, "_SAMPLE_RULES", copy)
    return copy


def test_a_rule_without_a_generator_fails_the_check(registry):
    @sample_rule("bkfx_op_without_generator")
    def _new(node):
        return [(node.args[0], identity)]

    @layout_rule("bkfx_layout_op_without_generator")
    def _new_layout(node, shapes, batch):
        return [None for _ in shapes]

    assert missing_generators() == ["bkfx_layout_op_without_generator", "bkfx_op_without_generator"]


@pytest.mark.parametrize("name", [n for n in registered() if n in GENERATORS])
@settings(max_examples=2, deadline=None, derandomize=True)
@given(data=st.data(), batch=st.integers(2, 4))
def test_each_rule_holds_on_its_op(name, data, batch):
    torch.manual_seed(batch)
    op, args, kwargs = GENERATORS[name](data.draw, batch)
    check_claim(op, args, kwargs)


def test_the_semantics_check_catches_the_old_renorm_and_pad_rules(registry):
    renorm = (aten.renorm.default, (Batched(torch.randn(4, 3, dtype=f64)), 2.0, 1, 0.5))
    pad = (aten.pad.default, (Batched(torch.randn(4, 3, dtype=f64)), [0, 0, -1, 1], "constant", 0.0))
    # the old claims: renorm "works along dim"; pad "keeps every sample in place"
    old_renorm, old_pad = registry.pop("renorm"), registry.pop("pad")
    sample_rule("renorm")(lambda node: [(node.args[0], works_along(node.args[2], rank=ndim(node.args[0])))])
    sample_rule("pad")(lambda node: [(node.args[0], identity)])
    with pytest.raises(AssertionError):
        check_claim(*renorm)
    with pytest.raises(AssertionError):
        check_claim(*pad)
    registry["renorm"], registry["pad"] = old_renorm, old_pad
    assert check_claim(*renorm) == "refused"
    assert check_claim(aten.renorm.default, (Batched(torch.randn(4, 3, dtype=f64)), 2.0, 0, 0.5)) == "accepted"
    assert check_claim(*pad) == "refused"
