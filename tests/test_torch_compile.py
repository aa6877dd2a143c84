"""`torch.compile` of code that calls a DP model (`bkfx._runtime.dynamo_op`): the DP model is one operator
in dynamo's graph, so `fullgraph=True` works and one graph serves every batch size; against the
vmap reference in float64 and against the eager BK step.

The outer graphs compile with backend="aot_eager" and the DP model's own step with
`dp.compile(backend="aot_eager")` (the programs inductor would get, without its C++ compile
time on a 2-core CPU); one test compiles both with inductor."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import bkfx
from bkfx._runtime import dynamo_op as operator
from bkfx.errors import BkfxError
from bkfx.testing.strategies import architectures, compile_options
from test_compiled import AOT, assert_same_grads, data, eager_and_compiled, mlp

pytestmark = pytest.mark.compiled

FULLGRAPH = {"backend": "aot_eager", "fullgraph": True, "dynamic": True}


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def kept(dp) -> dict:
    """The calls whose autograd graph the operator keeps for a backward to come."""
    return operator._models[dp._anchor._bkfx_model].kept


@pytest.mark.slow
# half the profile's examples (10 in CI, 500 thorough): each compiles; the eager
# properties (tests/test_architectures.py, one per family) draw the full count
@settings(max_examples=max(1, settings().max_examples // 2))
@given(arch=architectures(), options=compile_options())
def test_every_family_under_torch_compile_fullgraph_matches_the_reference(arch, options):
    torch._dynamo.reset()  # every example a new model: dynamo's recompile limit would run later ones eagerly
    before = graphs()
    dp, errors = arch.check(step=AOT, torch_compile=FULLGRAPH, **options)
    assert max(errors.values()) <= 1e-6
    assert graphs() == before + 1  # forward and loss were one dynamo graph, not run eagerly
    assert not kept(dp)  # the backward consumed the call's graph


def test_one_graph_for_every_batch_size_and_the_same_gradients_as_eager():
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled(mlp(), max_grad_norm=0.1)
    step = torch.compile(lambda x, y: F.cross_entropy(compiled(x), y), **FULLGRAPH)
    before = graphs()
    for B in (3, 7, 2, 12):
        x, y = data(B, seed=B)
        for dp in (eager, compiled):
            dp.module.zero_grad(set_to_none=True)
        step(x, y).backward()
        F.cross_entropy(eager(x), y).backward()
        assert_same_grads(eager.module, compiled.module)
        assert torch.allclose(eager.per_sample_norms, compiled.per_sample_norms, rtol=1e-12)
    assert graphs() == before + 1
    assert sum(len(t) for t in compiled._last.programs.values()) == 1  # bkfx's own step: one trace too


def test_batch_sizes_zero_and_one_and_gradient_accumulation():
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled(mlp(1), max_grad_norm=0.05)
    step = torch.compile(lambda x, y: F.cross_entropy(compiled(x), y, reduction="sum"), **FULLGRAPH)
    for B in (4, 1, 0, 5):  # accumulated: four separately clipped steps
        x, y = data(B, seed=B)
        step(x, y).backward()
        F.cross_entropy(eager(x), y, reduction="sum").backward()
    assert_same_grads(eager.module, compiled.module)


def test_inference_under_no_grad_keeps_no_graph():
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled(mlp(2))
    forward = torch.compile(compiled, **FULLGRAPH)
    x, _ = data(6)
    with torch.no_grad():
        out = forward(x)
    assert not out.requires_grad and not kept(compiled)
    assert torch.allclose(out, eager(x).detach(), rtol=1e-12)
    assert all(p.grad is None for p in compiled.module.parameters())


def test_two_forward_calls_before_a_backward_are_refused_and_the_first_graph_dropped():
    torch._dynamo.reset()
    _, compiled = eager_and_compiled(mlp(3))
    forward = torch.compile(compiled, **FULLGRAPH)
    x, y = data(4)
    first = F.cross_entropy(forward(x), y)
    assert len(kept(compiled)) == 1
    second = F.cross_entropy(forward(x), y)
    assert len(kept(compiled)) == 1  # the first call's graph dropped
    with pytest.raises(BkfxError, match="another forward call of the model came before"):
        first.backward()
    with pytest.raises(BkfxError, match="forward calls made before one backward"):  # as with dp.compile()
        second.backward()
    assert all(p.grad is None for p in compiled.module.parameters())


def test_retain_graph_runs_the_backward_twice():
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled(mlp(4), max_grad_norm=0.2)
    forward = torch.compile(compiled, **FULLGRAPH)
    x, y = data(5)
    loss = F.cross_entropy(forward(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    expected = F.cross_entropy(eager(x), y)
    expected.backward(retain_graph=True)
    expected.backward()
    assert_same_grads(eager.module, compiled.module)
    assert not kept(compiled)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):  # torch's own
        loss.backward()


def test_input_gradients_reach_the_outer_graph():
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled(mlp(5))
    embed = nn.Linear(4, 5).double()  # a non-private layer before the DP model: its gradient is the input's
    step = torch.compile(lambda z, y: F.cross_entropy(compiled(embed(z)), y), **FULLGRAPH)
    z = torch.randn(6, 4, dtype=torch.float64)
    _, y = data(6)
    step(z, y).backward()
    compiled_grad = embed.weight.grad.clone()
    embed.zero_grad()
    F.cross_entropy(eager(embed(z)), y).backward()
    assert torch.allclose(embed.weight.grad, compiled_grad, rtol=1e-12)
    assert_same_grads(eager.module, compiled.module)


class SeveralOutputs(nn.Module):
    """A dict with the same tensor twice, an integer tensor and a nested tuple."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x, scale=2.0, mask=None):
        h = torch.tanh(self.a(x)) * scale
        if mask is not None:
            h = h * mask
        logits = self.b(h)
        return {"logits": logits, "again": logits, "label": logits.argmax(-1), "parts": (h, x)}


def test_several_outputs_keyword_arguments_and_constants():
    torch._dynamo.reset()
    torch.manual_seed(6)
    eager, compiled = eager_and_compiled(SeveralOutputs().double(), max_grad_norm=0.3)
    x, y = data(4)
    mask = (torch.rand(4, 6) > 0.3).double()

    def loss(dp, x, y):
        out = dp(x, 0.5, mask=mask)
        return F.cross_entropy(out["logits"], y) + out["again"].pow(2).mean() + out["parts"][0].sum() * 1e-2, out

    got, out = torch.compile(lambda x, y: loss(compiled, x, y), **FULLGRAPH)(x, y)
    want, ref = loss(eager, x, y)
    got.backward()
    want.backward()
    assert torch.equal(out["label"], ref["label"]) and torch.equal(out["parts"][1], x)
    assert_same_grads(eager.module, compiled.module)


def test_outputs_that_are_not_tensors_are_refused():
    class WithCount(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x), 3

    torch._dynamo.reset()
    dp = bkfx.compile(WithCount().double())
    with pytest.raises(Exception, match="outputs hold values that are not tensors"):
        torch.compile(dp, **FULLGRAPH)(data(4)[0])


@pytest.mark.slow
def test_hf_gpt2_with_padding_fullgraph_matches_eager():
    import transformers
    torch._dynamo.reset()
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16, use_cache=False,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(7)
    eager, compiled = eager_and_compiled(transformers.GPT2LMHeadModel(config).double(), max_grad_norm=0.1)

    def loss(dp, ids, mask):
        logits = dp(input_ids=ids, attention_mask=mask).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")

    step = torch.compile(lambda ids, mask: loss(compiled, ids, mask), **FULLGRAPH)
    before = graphs()
    for B in (3, 5):
        ids = torch.randint(0, 50, (B, 8))
        mask = torch.ones(B, 8, dtype=torch.long)
        mask[0, :3] = 0  # left padding
        for dp in (eager, compiled):
            dp.module.zero_grad(set_to_none=True)
        step(ids, mask).backward()
        loss(eager, ids, mask).backward()
        assert_same_grads(eager.module, compiled.module, tol=1e-10)
    assert graphs() == before + 1


@pytest.mark.slow
def test_autocast_reaches_the_dp_step():
    """Under autocast the operator runs the DP step in the autocast state the call was traced in:
    the same bf16 step as `dp.compile()` called directly (the operator's own implementation runs
    with autocast off)."""
    torch._dynamo.reset()
    direct, compiled = eager_and_compiled(mlp(8).float())
    direct.compile(**AOT)
    step = torch.compile(lambda x, y: F.cross_entropy(compiled(x), y), **FULLGRAPH)
    x, y = data(6)
    x = x.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_direct = direct(x)
        F.cross_entropy(out_direct, y).backward()
        step(x, y).backward()
        out = torch.compile(compiled, **FULLGRAPH)(x)
    assert out.dtype == out_direct.dtype == torch.bfloat16
    assert torch.equal(out, out_direct)
    assert_same_grads(direct.module, compiled.module, tol=1e-6)  # float32 gradients; the loss compiled or not


@pytest.mark.slow
def test_inductor_and_reduce_overhead_reach_bkfx_step():
    """The user's torch.compile mode reaches bkfx's compiled step (CUDA graphs on a GPU); the
    outer graph and bkfx's step both compiled by inductor."""
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled(mlp(9), step=None, max_grad_norm=0.1)
    step = torch.compile(lambda x, y: F.cross_entropy(compiled(x), y), mode="reduce-overhead", dynamic=True,
                         fullgraph=True)
    for B in (4, 6):
        x, y = data(B, seed=B)
        step(x, y).backward()
        F.cross_entropy(eager(x), y).backward()
    assert_same_grads(eager.module, compiled.module, tol=1e-10)
    (options,) = {key[0] for key in compiled._last.programs}
    assert options.backend == "inductor" and options.mode == "reduce-overhead"


def test_dp_optimizer_training_matches_eager():
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled(mlp(10))
    optimizers = [bkfx.DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.3), noise_multiplier=0.0,
                                   expected_batch_size=4, model=dp) for dp in (eager, compiled)]
    step = torch.compile(lambda x, y: F.cross_entropy(compiled(x), y), **FULLGRAPH)
    for k in range(3):
        x, y = data(4 + k, seed=k)
        step(x, y).backward()
        F.cross_entropy(eager(x), y).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    for p, q in zip(eager.module.parameters(), compiled.module.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_dp_models_of_one_architecture_share_one_graph():
    """Every DP model of one architecture runs through the same compiled graph (the operator finds
    its model by the anchor it is passed); another architecture gets a graph of its own."""
    torch._dynamo.reset()
    step = torch.compile(lambda dp, x, y: F.cross_entropy(dp(x), y), **FULLGRAPH)
    x, y = data(6)
    before = graphs()
    for seed in range(10):  # more than dynamo's recompile limit (8)
        eager, compiled = eager_and_compiled(mlp(seed), max_grad_norm=0.1)
        step(compiled, x, y).backward()
        F.cross_entropy(eager(x), y).backward()
        assert_same_grads(eager.module, compiled.module)
    assert graphs() == before + 1
    eager, compiled = eager_and_compiled(mlp(0, width=7), max_grad_norm=0.1)
    step(compiled, x, y).backward()
    F.cross_entropy(eager(x), y).backward()
    assert_same_grads(eager.module, compiled.module)
    assert graphs() == before + 2


@pytest.mark.slow
def test_outputs_that_differ_from_the_trace_are_refused_then_traced_anew():
    """A change to the model between dynamo's guard and the DP step (here `.double()`: bkfx
    recaptures inside the call) gives outputs the compiled graph was not traced for: refused;
    the next call sees the new architecture and traces anew."""

    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x.to(self.fc.weight.dtype))

    torch._dynamo.reset()
    torch.manual_seed(13)
    dp = bkfx.compile(Casting())
    forward = torch.compile(dp, **FULLGRAPH)
    x, _ = data(4)
    assert forward(x).dtype == torch.float32
    dp.module.double()
    with pytest.raises(BkfxError, match=r"output 0 is \(4, 3\) torch.float64.*traced \(4, 3\) torch.float32"):
        forward(x)
    assert forward(x).dtype == torch.float64


class _Dropped(nn.Module):
    """Dropout between two layers; returns the dropped activations too, which show the mask drawn."""

    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(5, 16), nn.Dropout(0.5), nn.Linear(16, 3)

    def forward(self, x):
        h = self.drop(torch.tanh(self.a(x)))
        return self.b(h), h


class _Masked(nn.Module):
    """`_Dropped` with a given mask for each sample: the reference's model."""

    def __init__(self, dropped: _Dropped):
        super().__init__()
        self.a, self.b = dropped.a, dropped.b

    def forward(self, x, mask):
        return self.b(torch.tanh(self.a(x)) * mask)


@pytest.mark.parametrize("how", ["dp.compile aot_eager", pytest.param("dp.compile inductor", marks=pytest.mark.slow),
                                 "torch.compile"])
def test_dropout_clipped_sums_match_the_reference_for_the_mask_drawn(how):
    """A random op in the compiled step (inductor draws with its own generator): the backward uses
    the forward's mask. Checked per call against the vmap reference of the same model with the
    mask the forward drew (read off its dropped activations), in float64."""
    torch._dynamo.reset()
    torch.manual_seed(17)
    module = _Dropped().double()
    dp = bkfx.compile(module, max_grad_norm=0.1)
    if how.startswith("dp.compile"):
        dp.compile(backend=how.split()[1])
        forward = dp
    else:
        forward = torch.compile(dp, **FULLGRAPH)
    x, y = data(8)
    masks = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out, h = forward(x)
        F.cross_entropy(out, y).backward()
        mask = (h != 0).double() * 2  # 1 / (1 - p) where kept
        torch.testing.assert_close(h, torch.tanh(module.a(x)).detach() * mask)
        masks.append(mask)
        grads = bkfx.testing.per_sample_gradients(_Masked(module), F.cross_entropy, (x, mask), y)
        want, _ = bkfx.testing.clipped_sum_reference(grads, max_grad_norm=0.1)
        for name, p in module.named_parameters():
            torch.testing.assert_close(p.grad, want[name], rtol=1e-10, atol=1e-12)
        dp.zero_grad(set_to_none=True)
    assert not torch.equal(masks[0], masks[1])
    assert getattr(dp, "compiled_step_failure", None) is None
