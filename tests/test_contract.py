"""The public contract of `bkfx.compile`, one deterministic case per promise, each checked
against the `torch.func.vmap` reference of `bkfx.testing` (1e-6 relative, float64). Tests
taking the `device` fixture run on the CPU and, when one is present, on CUDA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bkfx
from bkfx.testing import assert_matches_reference, clipped_sum_reference, per_sample_gradients

TOL = 1e-6
f64 = torch.float64


def reference(model, loss_fn, inputs, targets, *, max_grad_norm=1.0, clipping="abadi", loss_reduction="mean",
              style="all-layer"):
    """What `.grad` must hold after one backward on this batch, and the per-sample norms."""
    grads = per_sample_gradients(model, loss_fn, inputs, targets)
    groups = None
    if style != "all-layer":
        groups = bkfx.compile(model, style=style).clip_groups
    return clipped_sum_reference(
        grads, max_grad_norm=max_grad_norm, clipping=clipping, loss_reduction=loss_reduction, groups=groups
    )


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got is not None, f"{what}: no gradient"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item() or 1.0
    err = (got - want).abs().max().item() / scale
    assert err <= TOL, f"{what}: relative error {err:.3g} > {TOL:g}"


def assert_grads(model, expected: dict, factor: float = 1.0):
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, factor * expected[name], name)


def ce(reduction="mean"):
    return lambda out, y: F.cross_entropy(out, y, reduction=reduction)


def mlp(seed=0, d=4, hidden=8, classes=3, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double().to(device)


def batch(n, d=4, classes=3, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, dtype=f64, generator=g), torch.randint(0, classes, (n,), generator=g)
    return x.to(device), y.to(device)


class TinyLM(nn.Module):
    def __init__(self, vocab=11, d=6, t_max=9):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(0.1 * torch.randn(1, t_max, d))
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, idx):
        h = self.emb(idx) + self.pos[:, : idx.shape[1]]
        h = h + torch.tanh(self.fc(self.ln(h)))
        return F.linear(h, self.emb.weight)


def token_ce(reduction="mean"):
    return lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


# -- forward --------------------------------------------------------------------------------
def test_forward_equals_model_exactly(device):
    model = mlp(device=device)
    x, _ = batch(5, device=device)
    dp = bkfx.compile(model)
    assert torch.equal(dp(x), model(x))
    torch.manual_seed(0)
    lm = TinyLM().double().to(device)
    idx = torch.randint(0, 11, (4, 7), device=device)
    assert torch.equal(bkfx.compile(lm)(idx), lm(idx))


def test_one_capture_serves_every_batch_size(device):
    model = mlp(device=device)
    dp = bkfx.compile(model, max_grad_norm=0.1)
    x3, _ = batch(3, device=device)
    dp(x3)
    for n in (1, 5, 0, 2, 8):
        x, _ = batch(n, seed=n, device=device)
        out = dp(x)
        assert out.shape == (n, 3)
        assert torch.equal(out, model(x))
    assert dp.capture_count == 1
    # a backward on a batch of one, through the capture made on three samples
    x1, y1 = batch(1, seed=11, device=device)
    expected, norms = reference(model, ce(), x1, y1, max_grad_norm=0.1)
    model.zero_grad(set_to_none=True)
    ce()(dp(x1), y1).backward()
    assert dp.capture_count == 1
    assert_grads(model, expected)
    assert_close(dp.per_sample_norms, norms, "per-sample norms")


def test_first_call_on_one_sample_serves_larger_batches():
    model = mlp()
    dp = bkfx.compile(model, max_grad_norm=0.1, loss_reduction="sum")
    x1, y1 = batch(1)
    ce("sum")(dp(x1), y1).backward()
    expected, _ = reference(model, ce("sum"), x1, y1, max_grad_norm=0.1, loss_reduction="sum")
    assert_grads(model, expected)
    model.zero_grad(set_to_none=True)
    x5, y5 = batch(5, seed=5)
    ce("sum")(dp(x5), y5).backward()
    expected, norms = reference(model, ce("sum"), x5, y5, max_grad_norm=0.1, loss_reduction="sum")
    assert dp.capture_count == 1
    assert_grads(model, expected)
    assert_close(dp.per_sample_norms, norms, "per-sample norms")


def test_empty_batch_forward():
    model = mlp()
    dp = bkfx.compile(model)
    dp(batch(3)[0])
    x0 = torch.empty(0, 4, dtype=f64)
    out = dp(x0)
    assert out.shape == (0, 3) and out.dtype == f64
    assert dp.capture_count == 1


def test_empty_batch_backward_with_sum_leaves_zero_gradients():
    """Poisson sampling draws empty batches: Σ over no samples is zero, as in ordinary torch."""
    model = mlp()
    dp = bkfx.compile(model, loss_reduction="sum")
    dp(batch(3)[0])
    x0, y0 = torch.empty(0, 4, dtype=f64), torch.empty(0, dtype=torch.long)
    model.zero_grad(set_to_none=True)
    ce("sum")(dp(x0), y0).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name
    assert dp.per_sample_norms.shape == (0,)


# -- parameters and state ------------------------------------------------------------------
def test_parameters_and_state_dict_are_the_models():
    model = TinyLM().double()
    dp = bkfx.compile(model)
    for when in ("before capture", "after capture"):
        ours, theirs = list(dp.parameters()), list(model.parameters())
        assert len(ours) == len(theirs), when
        assert all(a is b for a, b in zip(ours, theirs)), when
        assert [n for n, _ in dp.named_parameters()] == [n for n, _ in model.named_parameters()], when
        assert dp.state_dict().keys() == model.state_dict().keys(), when
        dp(torch.randint(0, 11, (3, 5)))


# -- gradients ------------------------------------------------------------------------------
def test_two_backwards_accumulate(device):
    model = mlp(device=device)
    dp = bkfx.compile(model, max_grad_norm=0.2)
    (x1, y1), (x2, y2) = batch(4, seed=1, device=device), batch(6, seed=2, device=device)
    e1, _ = reference(model, ce(), x1, y1, max_grad_norm=0.2)
    e2, n2 = reference(model, ce(), x2, y2, max_grad_norm=0.2)
    model.zero_grad(set_to_none=True)
    ce()(dp(x1), y1).backward()
    ce()(dp(x2), y2).backward()
    assert_grads(model, {n: e1[n] + e2[n] for n in e1})
    assert_close(dp.per_sample_norms, n2, "per-sample norms of the last backward")


def test_retain_graph_backward_twice_doubles(device):
    model = mlp(device=device)
    dp = bkfx.compile(model, max_grad_norm=0.2, clipping="automatic")
    x, y = batch(5, device=device)
    expected, norms = reference(model, ce(), x, y, max_grad_norm=0.2, clipping="automatic")
    model.zero_grad(set_to_none=True)
    loss = ce()(dp(x), y)
    loss.backward(retain_graph=True)
    assert_grads(model, expected)
    loss.backward(retain_graph=True)
    assert_grads(model, expected, factor=2.0)
    assert_close(dp.per_sample_norms, norms, "per-sample norms")


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def test_train_eval_switch_recaptures():
    torch.manual_seed(0)
    model = DropoutNet().double()
    dp = bkfx.compile(model, max_grad_norm=0.5)
    x, y = batch(6)
    dp(x)  # training mode: dropout active
    assert dp.capture_count == 1
    model.eval()
    out = dp(x)
    assert dp.capture_count == 2
    assert torch.equal(out, model(x))
    expected, norms = reference(model, ce(), x, y, max_grad_norm=0.5)
    model.zero_grad(set_to_none=True)
    ce()(out, y).backward()
    assert_grads(model, expected)
    assert_close(dp.per_sample_norms, norms, "per-sample norms")
    dp.train()  # switches the model too, back to the first capture
    assert model.training and model.drop.training
    dp(x)
    assert dp.capture_count == 2
    dp.eval()
    assert not model.training and not model.drop.training
    assert torch.equal(dp(x), model(x)) and dp.capture_count == 2


def test_per_sample_norms_are_the_reference_norms(device):
    model = mlp(device=device)
    x, y = batch(7, device=device)
    for clipping in ("abadi", "automatic"):
        _, norms = reference(model, ce("sum"), x, y, loss_reduction="sum")
        dp = bkfx.compile(model, loss_reduction="sum", clipping=clipping)
        assert dp.per_sample_norms is None
        model.zero_grad(set_to_none=True)
        ce("sum")(dp(x), y).backward()
        assert dp.per_sample_norms.shape == (7,)
        assert_close(dp.per_sample_norms, norms, "per-sample norms")


def test_ghost_and_explicit_match_the_reference(device):
    torch.manual_seed(0)
    model = TinyLM().double().to(device)
    idx, y = torch.randint(0, 11, (4, 7), device=device), torch.randint(0, 11, (4, 7), device=device)
    grads = {}
    for mode in ("ghost", "explicit"):
        dp, _ = assert_matches_reference(model, token_ce(), idx, y, max_grad_norm=0.3, norm_mode=mode)
        factored = [r for r in dp.plan() if r["kind"] == "factored"]
        assert factored and all(r["mode"] == mode for r in factored)
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in grads["ghost"]:
        assert_close(grads["ghost"][name], grads["explicit"][name], name)


@pytest.mark.parametrize(
    "style, n_groups",
    [("all-layer", 1), ("layer-wise", 2), ("param-wise", 4), ([["0.weight", "2.weight"], ["0.bias", "2.bias"]], 2)],
)
def test_clipping_styles_match_the_reference(style, n_groups, device):
    model = mlp(device=device)
    x, y = batch(6, device=device)
    dp, _ = assert_matches_reference(model, ce(), x, y, max_grad_norm=0.1, style=style)
    assert len(dp.clip_groups) == n_groups


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)  # never called
        self.branch = nn.Linear(4, 3)  # called, but its output is dropped

    def forward(self, x):
        dead = self.branch(x)  # noqa: F841
        return self.fc(x)


def test_unused_parameters_keep_no_gradient():
    torch.manual_seed(0)
    model = WithUnused().double()
    x, y = batch(5)
    expected, norms = reference(model, ce(), x, y, max_grad_norm=0.1)
    dp = bkfx.compile(model, max_grad_norm=0.1)
    ce()(dp(x), y).backward()
    for name in ("unused.weight", "unused.bias", "branch.weight", "branch.bias"):
        assert model.get_parameter(name).grad is None, name
    assert_close(model.fc.weight.grad, expected["fc.weight"], "fc.weight")
    assert_close(model.fc.bias.grad, expected["fc.bias"], "fc.bias")
    assert_close(dp.per_sample_norms, norms, "per-sample norms")


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.cls = nn.Linear(8, 3)
        self.reg = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.cls(h), self.reg(h)


def test_tuple_output_with_loss_on_both():
    torch.manual_seed(0)
    model = TwoHeads().double()
    x, y = batch(6)

    def loss_fn(out, y):
        logits, value = out
        return F.cross_entropy(logits, y) + 0.5 * value.pow(2).mean()

    dp, _ = assert_matches_reference(model, loss_fn, x, y, max_grad_norm=0.3)
    logits, value = dp(x)
    want_logits, want_value = model(x)
    assert torch.equal(logits, want_logits) and torch.equal(value, want_value)


# -- inspection -----------------------------------------------------------------------------
def test_explain_and_code_name_every_site():
    torch.manual_seed(0)
    model = TinyLM().double()
    dp = bkfx.compile(model)
    dp(torch.randint(0, 11, (3, 5)))
    text = dp.explain()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name in names:
        assert name in text, name
    assert {p for site in dp.sites for p in site.params} == set(names)
    assert "bkfx__runtime_ops_site" in dp.code
    assert {p for r in dp.plan() for p in r["params"]} == set(names)


def test_plan_records_real_sizes_of_a_linear_site():
    torch.manual_seed(0)
    T, d, p = 7, 5, 3
    model = nn.Linear(d, p).double()
    dp = bkfx.compile(model)
    dp(torch.randn(4, T, d, dtype=f64))
    weight = [r for r in dp.plan() if r["params"] == ["weight"] and r["kind"] == "factored"]
    assert len(weight) == 1
    assert (weight[0]["T"], weight[0]["p"], weight[0]["d"]) == (T, p, d)
    dp2 = bkfx.compile(model)
    dp2(torch.randn(4, d, dtype=f64))
    weight = [r for r in dp2.plan() if r["params"] == ["weight"] and r["kind"] == "factored"]
    assert (weight[0]["T"], weight[0]["p"], weight[0]["d"]) == (1, p, d)


def test_batch_norm_in_eval_mode_matches_the_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    model(torch.randn(16, 4, dtype=f64))  # running statistics away from their initial values
    model.eval()
    x, y = batch(6)
    assert_matches_reference(model, ce(), x, y, max_grad_norm=0.1)


class ScalarGain(nn.Module):
    """A 0-dimensional parameter: its per-sample gradients are [B]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.fc(x) * self.gain


def test_zero_dimensional_parameter_matches_the_reference():
    torch.manual_seed(0)
    model = ScalarGain().double()
    x, y = batch(5)
    assert_matches_reference(model, ce(), x, y, max_grad_norm=0.1)


def test_backward_twice_without_retain_graph_is_refused():
    """Without retain_graph the sites release their saved inputs after backward (the memory the
    clipped sums then reuse); a second backward through such a site says so, as PyTorch would."""
    model = nn.Linear(3, 2)
    dp = bkfx.compile(model)
    loss = dp(torch.randn(4, 3)).sum()  # no saved tensor between the loss and the site
    loss.backward()
    with pytest.raises(bkfx.BkfxError, match="retain_graph=True"):
        loss.backward()
