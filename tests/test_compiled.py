"""The compiled BK step (`bkfx._runtime.step`): forward and BK backward traced once with a symbolic
batch size, partitioned, compiled; against the vmap reference in float64 and against the eager
BK step (the reference implementation), for every architecture family and clipping option.

Most tests compile with backend="aot_eager" (the traced ATen programs run as they are: the
same programs inductor gets, without its minutes of C++ compilation on a 2-core CPU); the
inductor tests compile a few models for real."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import bkfx
from bkfx.errors import BkfxError
from bkfx.testing import assert_matches_reference
from bkfx.testing.strategies import architectures, compile_options

from helpers import with_simulated_cuda_graphs

pytestmark = pytest.mark.compiled

AOT = {"backend": "aot_eager"}


def mlp(seed=0, width=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 3)).double()


def loss_of(reduction="sum"):
    return lambda out, y: F.cross_entropy(out, y, reduction=reduction)


def data(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)


def eager_and_compiled(model, step=AOT, **options):
    """Two DP models of copies of `model`: eager BK step, compiled BK step (`step=None`: the
    second is not compiled by `dp.compile`, as under `torch.compile` with its own options)."""
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    eager, compiled = bkfx.compile(a, **options), bkfx.compile(b, **options)
    if step is not None:
        compiled.compile(**step)
    return eager, compiled


def assert_same_grads(m1, m2, tol=1e-12):
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=tol, atol=tol * p.grad.abs().max().item()), n


@pytest.mark.slow
# half the profile's examples (10 in CI, 500 thorough): each compiles; the eager
# properties (tests/test_architectures.py, one per family) draw the full count
@settings(max_examples=max(1, settings().max_examples // 2))
@given(arch=architectures(), options=compile_options())
def test_every_family_compiled_matches_the_reference(arch, options):
    dp, errors = arch.check(step=AOT, **options)
    assert max(errors.values()) <= 1e-6
    B = arch.inputs[0].shape[0]
    assert (dp._last_program is not None) == (B >= 2)  # 0 and 1 run the eager step


def test_one_trace_serves_every_batch_size_and_matches_eager():
    eager, compiled = eager_and_compiled(mlp(), loss_reduction="mean", max_grad_norm=0.1)
    for B in (3, 7, 2, 12):
        x, y = data(B, seed=B)
        for dp in (eager, compiled):
            dp.module.zero_grad(set_to_none=True)
            loss_of("mean")(dp(x), y).backward()
        assert_same_grads(eager.module, compiled.module)
        assert torch.allclose(eager.per_sample_norms, compiled.per_sample_norms, rtol=1e-12)
    assert compiled.capture_count == 1 and sum(len(t) for t in compiled._last.programs.values()) == 1


def test_layer_wise_group_norms_and_both_reductions():
    for reduction in ("mean", "sum"):
        eager, compiled = eager_and_compiled(mlp(1), style="layer-wise", max_grad_norm=[0.1, 0.2, 0.3],
                                             loss_reduction=reduction, clipping="automatic")
        x, y = data(6)
        for dp in (eager, compiled):
            loss_of(reduction)(dp(x), y).backward()
        assert_same_grads(eager.module, compiled.module)
        assert len(compiled.per_group_norms) == 3
        for a, b in zip(eager.per_group_norms, compiled.per_group_norms):
            assert torch.allclose(a, b, rtol=1e-12)


def test_gradient_accumulation_sums_separately_clipped_steps():
    eager, compiled = eager_and_compiled(mlp(2), max_grad_norm=0.05)
    for seed in (1, 2, 3):
        x, y = data(4, seed)
        for dp in (eager, compiled):
            loss_of()(dp(x), y).backward()
    assert_same_grads(eager.module, compiled.module)


def test_batch_sizes_zero_and_one_run_eagerly_and_match():
    eager, compiled = eager_and_compiled(mlp(3))
    for B in (1, 0):
        x, y = data(B)
        for dp in (eager, compiled):
            dp.module.zero_grad(set_to_none=True)
            out = dp(x)
            (loss_of()(out, y) if B else out.sum()).backward()
        assert compiled._last_program is None
        assert_same_grads(eager.module, compiled.module)


def test_tied_parameters_and_frozen_ones():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.mix = nn.Linear(6, 6)
            self.frozen = nn.Linear(6, 6)
            self.frozen.requires_grad_(False)

        def forward(self, ids):
            h = torch.tanh(self.mix(self.emb(ids))) + self.frozen(self.emb(ids))
            return h @ self.emb.weight.t()

    torch.manual_seed(4)
    model = TiedLM().double()
    ids = torch.randint(0, 11, (5, 4), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 11, (5, 4), generator=torch.Generator().manual_seed(1))

    def loss(out, y):
        return F.cross_entropy(out.reshape(-1, 11), y.reshape(-1), reduction="sum")

    dp, errors = assert_matches_reference(model, loss, ids, targets, step=AOT, loss_reduction="sum", max_grad_norm=0.3)
    assert dp._last_program is not None and "emb.weight" in errors and model.frozen.weight.grad is None


def test_retain_graph_backward_twice_matches_eager():
    eager, compiled = eager_and_compiled(mlp(5))
    x, y = data(5)
    for dp in (eager, compiled):
        loss = loss_of()(dp(x), y)
        loss.backward(retain_graph=True)
        loss.backward()
    assert_same_grads(eager.module, compiled.module)


def test_inputs_that_need_gradients_get_them():
    eager, compiled = eager_and_compiled(mlp(6))
    x, y = data(4)
    got = []
    for dp in (eager, compiled):
        xx = x.clone().requires_grad_()
        loss_of()(dp(xx), y).backward()
        got.append(xx.grad)
    assert torch.allclose(got[0], got[1], rtol=1e-12)
    assert_same_grads(eager.module, compiled.module)


def test_joined_forward_calls_are_refused_at_backward():
    _, compiled = eager_and_compiled(mlp(7))
    x, y = data(4)
    a, b = compiled(x), compiled(x + 1)
    with pytest.raises(BkfxError, match="compiled forward calls made before one backward"):
        (loss_of()(a, y) + loss_of()(b, y)).backward()
    # a forward whose output is dropped (or run under no_grad) is not joined
    compiled.module.zero_grad(set_to_none=True)
    compiled(x)
    with torch.no_grad():
        compiled(x)
    loss_of()(compiled(x), y).backward()
    assert all(p.grad is not None for p in compiled.module.parameters())


def test_refusals_stay_refusals():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x - x.mean(0, keepdim=True))  # mixes samples: refused

    dp = bkfx.compile(Mixer().double())
    dp.compile(**AOT)
    with pytest.raises(BkfxError, match="mean"):
        dp(data(4)[0])


def test_model_change_after_compile_traces_again():
    eager, compiled = eager_and_compiled(mlp(8))
    x, y = data(5)
    for dp in (eager, compiled):
        loss_of()(dp(x), y).backward()
        dp.module[0].weight.requires_grad_(False)
        dp.module.zero_grad(set_to_none=True)
        loss_of()(dp(x), y).backward()
    assert compiled.module[0].weight.grad is None
    assert_same_grads(eager.module, compiled.module)


def test_torch_compile_of_the_dp_model_runs_the_compiled_step():
    model = mlp(9)
    reference = copy.deepcopy(model)
    eager = bkfx.compile(reference, max_grad_norm=0.2)
    dp = bkfx.compile(model, max_grad_norm=0.2)
    compiled = torch.compile(dp, backend="aot_eager", dynamic=True)

    @torch.compile(backend="aot_eager", dynamic=True)
    def loss_fn(out, y):
        return F.cross_entropy(out, y, reduction="sum")

    for B in (4, 9):
        x, y = data(B, seed=B)
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
        loss_fn(compiled(x), y).backward()
        loss_of()(eager(x), y).backward()
        assert dp._last_program is not None
        assert_same_grads(reference, model)


def test_dp_optimizer_training_matches_eager():
    eager, compiled = eager_and_compiled(mlp(10))
    optimizers = [bkfx.DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.3), noise_multiplier=0.0,
                                   expected_batch_size=4, model=dp) for dp in (eager, compiled)]
    for step in range(3):
        x, y = data(4, seed=step)
        for dp, opt in zip((eager, compiled), optimizers):
            loss_of("mean")(dp(x), y).backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(eager.module.parameters(), compiled.module.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


def test_explain_shows_the_compiled_backward_and_code_is_inspectable():
    _, compiled = eager_and_compiled(mlp(11))
    with pytest.raises(bkfx.errors.NotCapturedError):
        compiled.compiled_code
    x, y = data(4)
    loss_of()(compiled(x), y).backward()
    text = compiled.explain()
    assert "compiled BK step: 1 trace(s)" in text and "compiled backward program" in text
    forward, backward = compiled.compiled_code
    assert "tangents_1" in backward and "sqrt" in backward and "tangents" not in forward


def test_unknown_backend_and_positional_arguments_are_refused():
    dp = bkfx.compile(mlp())
    with pytest.raises(TypeError, match="keyword arguments only"):
        dp.compile("inductor")
    dp.compile(backend="no-such-backend")
    x, y = data(3)
    with pytest.raises(BkfxError, match="backend='inductor'"):
        dp(x)


def test_inductor_compiles_the_step_and_matches_the_reference():
    """One real inductor compilation (C++ on the CPU): an MLP at two batch sizes, one trace."""
    model = mlp(12, width=16)
    x, y = data(6)
    dp, errors = assert_matches_reference(model, loss_of("mean"), x, y, step={"backend": "inductor"},
                                          max_grad_norm=0.1, style="layer-wise")
    x2, y2 = data(9, seed=3)
    model.zero_grad(set_to_none=True)
    loss_of("mean")(dp(x2), y2).backward()
    reference = bkfx.compile(copy.deepcopy(model), max_grad_norm=0.1, style="layer-wise")
    reference.module.zero_grad(set_to_none=True)
    loss_of("mean")(reference(x2), y2).backward()
    assert_same_grads(reference.module, model, tol=1e-10)
    assert sum(len(t) for t in dp._last.programs.values()) == 1


def _hf_models():
    from test_gpt2 import VOCAB, gpt2
    from test_hf_zoo import MODELS

    g = torch.Generator().manual_seed(5)
    out = {name: build for name, build in MODELS.items()}
    out["gpt2-tied"] = lambda: (gpt2(), (torch.randint(0, VOCAB, (3, 6), generator=g),))
    return out


HF = _hf_models()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HF))
def test_hugging_face_models_compiled_match_the_reference(name):
    """Padding masks, an encoder-decoder, audio and vision towers, GPT-2's tied head: compiled
    (their masks and position ids are traced constants and factories) against the reference."""
    torch.manual_seed(0)
    model, inputs = HF[name]()
    model = model.double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    B = inputs[0].shape[0]
    if name == "gpt2-tied":
        targets = torch.randint(0, 50, inputs[0].shape, generator=torch.Generator().manual_seed(4))

        def loss(out, y):
            return F.cross_entropy(out.logits.reshape(-1, 50), y.reshape(-1))
    else:
        targets, loss = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(4)), F.cross_entropy
    dp, _ = assert_matches_reference(model, loss, inputs, targets, method="loop", max_grad_norm=0.3, step=AOT)
    assert dp._last_program is not None


def test_graph_outputs_are_copied_out_into_fresh_memory():
    """`_copy_out` (the CUDA graphs' gradients and norms leave the graph's memory): equal values,
    no aliasing of the graph's outputs, strides kept for a strided view, ints passed through."""
    from bkfx._runtime.step.cudagraphs import _copy_out

    base = torch.randn(4, 6, dtype=torch.float64)
    values = [torch.randn(3, 2), base[:, 0], torch.randn(5, dtype=torch.float64), 7, torch.randn(2, 2)]
    out = _copy_out(values)
    assert out[3] == 7
    for v, o in zip(values, out):
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, o) and o.dtype == v.dtype and o.stride() == v.stride()
            assert o.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()


def test_a_step_torch_cannot_trace_runs_eagerly_with_a_warning(monkeypatch):
    """A failure inside torch's tracing or compilation (not a bkfx refusal) leaves the exact eager
    step, says so once, and keeps the reason."""
    import bkfx._runtime.step

    def broken(*args, **kwargs):
        raise RuntimeError("Cannot call numel() on tensor with symbolic sizes/strides")

    monkeypatch.setattr(bkfx._runtime.step, "build", broken)
    eager, compiled = eager_and_compiled(mlp(13))
    x, y = data(4)
    with pytest.warns(UserWarning, match="could not be built.*eager BK step"):
        loss_of()(compiled(x), y).backward()
    loss_of()(eager(x), y).backward()
    assert_same_grads(eager.module, compiled.module)
    assert "numel" in compiled.compiled_step_failure and compiled._last_program is None
    compiled.module.zero_grad(set_to_none=True)
    loss_of()(compiled(x), y).backward()  # no second attempt, no second warning


def test_several_outputs_some_not_differentiable():
    """A model returning a tuple: a trained output, an integer output and one that needs no
    gradient (made from the input alone): every output as eagerly, the same gradients."""
    class Several(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            logits = self.fc(x)
            return logits, logits.argmax(-1), x.sum(-1)

    torch.manual_seed(14)
    eager, compiled = eager_and_compiled(Several().double())
    x, y = data(4)
    outs = []
    for dp in (eager, compiled):
        logits, classes, total = dp(x)
        outs.append((classes, total))
        loss_of()(logits, y).backward()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.allclose(outs[0][1], outs[1][1])
    assert_same_grads(eager.module, compiled.module)


def test_cuda_graph_memory_protocol_with_simulated_graphs(monkeypatch):
    """bkfx's CUDA graphs (mode="reduce-overhead") on the CPU, with graphs simulated: every replay
    writes the same output memory, as a CUDA graph does. The saved values of a call whose backward
    has not run must be moved out before the forward graph runs again, and an earlier call's saved
    values copied into the forward graph's memory only after the call holding it has moved out:
    sequences that break either rule give wrong gradients, compared here with the eager step."""
    with_simulated_cuda_graphs(monkeypatch)
    eager, compiled = eager_and_compiled(mlp(15), max_grad_norm=0.1)
    x8, y8 = data(8, seed=1)
    x5, y5 = data(5, seed=2)
    for dp in (eager, compiled):
        for x, y in ((x8, y8), (x8, y8), (x5, y5), (x8 * 2, y8)):  # capture, replay, another graph, back
            loss_of()(dp(x), y).backward()
        for _ in range(2):  # accumulation
            loss_of()(dp(x8 * 0.5), y8).backward()
        a = loss_of()(dp(x8), y8)
        a.backward(retain_graph=True)
        b = loss_of()(dp(x8 + 1), y8)  # replays the forward graph that holds a's saved values
        a.backward()  # a's moved-out values are copied back into the graph's memory ...
        b.backward()  # ... after b's were moved out: b must still be exact
    assert_same_grads(eager.module, compiled.module, tol=1e-10)
    graphs = compiled._last_program.graphs
    assert len(graphs._forward) == 2 and len(graphs._backward) == 2
    assert all(g.kept for g in graphs._backward.values())  # the backward graphs read saved values in place
    assert torch.allclose(eager.per_sample_norms, compiled.per_sample_norms, rtol=1e-10)


class IndexedParameters(nn.Module):
    """Parameters that reach their sites through indexing (a general chain the ledger pulls back
    with vmap): a position table sliced to the length, rows picked by index_select, an embedding
    with a padding row and an index_add of a parameter."""

    def __init__(self):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(9, 4))
        self.table = nn.Parameter(torch.randn(7, 4))
        self.embed = nn.Embedding(6, 4, padding_idx=2)
        self.spread = nn.Parameter(torch.randn(5, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x, ids):
        T = x.shape[1]
        h = x + self.positions[1:T + 1] + self.table.index_select(0, torch.tensor([3, 0, 3, 6, 1])[:T])
        h = h + self.embed(torch.tensor([[0, 2, 5, 2, 1]])[:, :T])
        h = h * torch.zeros(T, 4, dtype=h.dtype).index_add(0, torch.tensor([4, 0, 0, 2, 1])[:T], self.spread[:T])
        return self.head(torch.tanh(h + self.embed(ids))).mean(1)


@pytest.mark.parametrize("model_name, backend", [("indexed", "aot_eager"), ("indexed", "inductor"),
                                                pytest.param("gpt2", "aot_eager", marks=pytest.mark.slow)])
def test_parameters_behind_indexing_keep_one_trace_for_every_batch_size(model_name, backend):
    """The pull-back through indexing backward ops (`vmap` in the ledger) keeps the batch size
    symbolic (`bkfx._runtime.step.kernels.symbolic_kernels`): one trace for every batch size, GPT-2's
    position embedding included; the gradients equal the eager step's, with inductor too (its
    in-place accumulation once summed the samples of zeros shared over the batch)."""
    torch.manual_seed(11)
    if model_name == "gpt2":
        from test_gpt2 import VOCAB, gpt2

        model = gpt2().double()
        make = lambda B: (torch.randint(0, VOCAB, (B, 6)),)  # noqa: E731

        def loss(out, y):
            return F.cross_entropy(out.logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum")
        targets = lambda inputs: inputs[0]  # noqa: E731
    else:
        model = IndexedParameters().double()
        make = lambda B: (torch.randn(B, 5, 4, dtype=torch.float64), torch.randint(0, 6, (B, 5)))  # noqa: E731
        loss = loss_of()
        targets = lambda inputs: torch.randint(0, 3, (inputs[0].shape[0],))  # noqa: E731
    eager, compiled = eager_and_compiled(model, step={"backend": backend}, max_grad_norm=0.2)
    for B in (3, 5, 2):
        inputs = make(B)
        y = targets(inputs)
        for dp in (eager, compiled):
            dp.module.zero_grad(set_to_none=True)
            loss(dp(*inputs), y).backward()
        assert_same_grads(eager.module, compiled.module)
    assert sum(len(t) for t in compiled._last.programs.values()) == 1
    (program,) = next(iter(compiled._last.programs.values()))
    assert program.guards == [] or all(program.admits(b) for b in (2, 3, 5, 64))


def test_symbolic_kernels_equal_torchs_own():
    """The batching rules bkfx uses while tracing (`symbolic_kernels`) give exactly what
    torch's own give, on every case of the ops they replace."""
    from torch.func import vjp, vmap

    from bkfx._runtime.step.kernels import symbolic_kernels

    torch.manual_seed(12)
    w = torch.randn(10, 4, dtype=torch.float64)
    chains = [
        lambda w: F.embedding(torch.tensor([[1, 3], [3, 9]]), w),
        lambda w: F.embedding(torch.tensor([[1, 3], [3, 9]]), w, padding_idx=3),
        lambda w: w.index_select(0, torch.tensor([1, 3, 3, 7])),
        lambda w: w.index_select(1, torch.tensor([0, 2, 2])),
        lambda w: w.index_select(0, torch.tensor(4)),
        lambda w: w[2:5], lambda w: w[-4:-1, 1:], lambda w: w[1:9:3], lambda w: w[3:], lambda w: w[:, :0],
        lambda w: w.narrow(1, 1, 2),
        lambda w: torch.zeros(12, 4, dtype=w.dtype).index_add(0, torch.tensor([0, 5, 5, 11, 2, 2, 2, 1, 0, 3]), w, alpha=2.),
        lambda w: torch.zeros(10, 6, dtype=w.dtype).index_add(1, torch.tensor([5, 0, 5, 1]), w),
    ]
    for k, chain in enumerate(chains):
        out, pullback = vjp(chain, w)
        G = torch.randn(3, *out.shape, dtype=torch.float64)
        (want,) = vmap(pullback)(G)
        with symbolic_kernels():
            (got,) = vmap(pullback)(G)
        assert torch.equal(got, want), k
        (again,) = vmap(pullback)(G)  # torch's own rules again after the trace
        assert torch.equal(again, want), k
