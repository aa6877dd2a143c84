"""The optimizer steps only on clipped sums bkfx wrote (`bkfx._runtime.receipts`): backward through the
original model, an extra backward on top, `.grad` replaced or modified, a step with no backward
since the last one, all refused with parameters, optimizer state and accountant untouched; the
explicit empty batch, gradient accumulation, the compiled step, torch.compile, GradScaler and
zero_grad(set_to_none=False) accepted, with values checked against the vmap reference. And
make_private's warning that a loader's own batching is replaced by Poisson sampling."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bkfx
from bkfx.training.data import PhysicalBatches, split_physical_batches
from bkfx.errors import PoissonSamplingWarning, UnclippedGradientError
from bkfx.testing import clipped_sum_reference, per_sample_gradients

R, SIGMA, LR = 0.5, 0.7, 0.3


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def private(model, noise_multiplier=SIGMA, momentum=0.9, **compile_options):
    """A compiled model, and a DPOptimizer (SGD with momentum: it has state) with an accountant."""
    dp = bkfx.compile(model, max_grad_norm=R, **compile_options)
    accountant = bkfx.Accountant()
    opt = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum),
                           noise_multiplier=noise_multiplier, expected_batch_size=4, model=dp, seed=3,
                           accountant=accountant, sample_rate=0.25)
    return dp, opt, accountant


def snapshot(model, opt):
    """Everything a refused step must leave as it was."""
    return ({n: p.detach().clone() for n, p in model.named_parameters()}, copy.deepcopy(opt.optimizer.state_dict()),
            opt.steps, list(opt.accountant.history), opt.generator.get_state().clone())


def assert_unchanged(model, opt, before):
    params, state, steps, history, generator = before
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
    after = opt.optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for k, s in state["state"].items():
        assert torch.equal(after["state"][k]["momentum_buffer"], s["momentum_buffer"])
    assert opt.steps == steps and opt.accountant.history == history
    assert torch.equal(opt.generator.get_state(), generator)  # no noise drawn


def history(opt) -> list[tuple]:
    return [(r.noise_multiplier, r.sample_rate, r.count) for r in opt.accountant.history]


def trained_once(seed=0):
    """A model, its DP model and optimizer after one ordinary step (so the optimizer has state)."""
    model = mlp(seed)
    dp, opt, accountant = private(model)
    x, y = data(4)
    F.cross_entropy(dp(x), y).backward()
    opt.step()
    opt.zero_grad()
    return model, dp, opt


def refused(model, opt, match):
    before = snapshot(model, opt)
    with pytest.raises(UnclippedGradientError, match=match):
        opt.step()
    assert_unchanged(model, opt, before)


def reference_sum(model, dp, batches):
    """Σ over the batches of Σ_i C_i G_i, from the vmap reference (model's parameters as they are)."""
    total = None
    for x, y in batches:
        grads = per_sample_gradients(model, F.cross_entropy, x, y)
        s, _ = clipped_sum_reference(grads, max_grad_norm=dp.max_grad_norms, loss_reduction="sum",
                                     groups=dp.clip_groups)
        total = s if total is None else {n: total[n] + s[n] for n in s}
    return total


def assert_one_sgd_step(model, reference, expected):
    """`model`'s parameters are `reference`'s after one SGD step (no momentum, σ = 0) on the clipped
    sums `expected`, divided by the expected batch size 4."""
    before = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n].detach() - LR * expected[n] / 4, rtol=1e-10, atol=1e-12)


# -- refused -------------------------------------------------------------------------------


def test_backward_through_the_original_model_is_refused():
    model, dp, opt = trained_once()
    x, y = data(4, seed=2)
    F.cross_entropy(model(x), y).backward()  # the one-word slip: model, not dp
    refused(model, opt, "not written by the compiled model's backward")


def test_extra_backward_through_the_original_model_after_the_dp_one_is_refused():
    model, dp, opt = trained_once()
    x, y = data(4, seed=2)
    F.cross_entropy(dp(x), y).backward()
    F.cross_entropy(model(x), y).backward()  # accumulates in place into the receipted .grad
    refused(model, opt, "modified in place")


def test_original_backward_before_the_dp_one_is_refused():
    model, dp, opt = trained_once()
    x, y = data(4, seed=2)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(dp(x), y).backward()  # the clipped sum lands on unclipped gradients
    refused(model, opt, "onto gradients it did not write")


def test_both_in_one_backward_is_refused():
    model, dp, opt = trained_once()
    x, y = data(4, seed=2)
    (F.cross_entropy(dp(x), y) + F.cross_entropy(model(x), y)).backward()
    refused(model, opt, "not .only. the clipped sums")


def test_replaced_or_modified_grad_is_refused():
    model, dp, opt = trained_once()
    x, y = data(4, seed=2)
    F.cross_entropy(dp(x), y).backward()
    model[0].weight.grad = torch.randn_like(model[0].weight)
    refused(model, opt, r"0\.weight: .grad was replaced")
    opt.zero_grad()
    F.cross_entropy(dp(x), y).backward()
    model[2].bias.grad.mul_(2.0)
    refused(model, opt, r"2\.bias: .grad was modified in place")


def test_step_without_backward_is_refused():
    model, dp, opt = trained_once()
    refused(model, opt, "no backward through the compiled model")  # after zero_grad: no .grad at all
    x, y = data(4, seed=2)
    F.cross_entropy(dp(x), y).backward()
    opt.step()
    refused(model, opt, "not written by")  # the stepped (noised) .grad, not zeroed: not a clipped sum
    opt.zero_grad(set_to_none=False)
    refused(model, opt, "no backward through the compiled model")  # zeros are no backward either


def test_zero_grad_then_step_is_refused():
    model, dp, opt = trained_once()
    x, y = data(4, seed=2)
    F.cross_entropy(dp(x), y).backward()
    opt.zero_grad()
    refused(model, opt, "no backward through the compiled model")


# -- accepted --------------------------------------------------------------------------------


def test_explicit_empty_batch_is_accepted_and_counted():
    model, dp, opt = trained_once()
    x, y = data(4, seed=2)
    # without a forward call: step(empty_batch=True), a noise-only step counted by the accountant
    replay = torch.Generator()
    replay.set_state(opt.generator.get_state())
    opt.step(empty_batch=True)
    assert opt.steps == 2 and history(opt) == [(SIGMA, 0.25, 2)]
    noise = [p.grad.clone() for p in model.parameters()]
    assert all((g != 0).all() for g in noise)  # σR N(0, 1) / 4 on every parameter
    opt.zero_grad()
    # the 0-row batch poisson_loader yields: forward and backward run and write zero clipped sums
    F.cross_entropy(dp(x[:0]), y[:0], reduction="sum").backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.step()
    assert opt.steps == 3 and history(opt) == [(SIGMA, 0.25, 3)]
    opt.zero_grad()
    # empty_batch does not excuse gradients bkfx did not write
    F.cross_entropy(model(x), y).backward()
    before = snapshot(model, opt)
    with pytest.raises(UnclippedGradientError, match="not written by"):
        opt.step(empty_batch=True)
    assert_unchanged(model, opt, before)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_an_empty_first_batch_steps_as_an_explicit_empty_step_then_the_next_captures(reduction):
    """A Poisson batch at a small rate can be empty on the first call, before any capture: the
    model runs on it, its backward writes receipted zeros, and the step is exactly
    step(empty_batch=True)'s (the same noise, counted); the next batch captures and is clipped."""
    runs = {}
    for how in ("forward", "explicit"):
        model = mlp()
        dp, opt, accountant = private(model)
        x, y = data(6)
        if how == "forward":
            out = dp(x[:0])
            assert out.shape == (0, 3) and out.requires_grad and not dp._captures  # nothing captured from 0 rows
            F.cross_entropy(out, y[:0], reduction=reduction).backward()
            assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
            opt.step()
        else:
            opt.step(empty_batch=True)
        assert opt.steps == 1 and history(opt) == [(SIGMA, 0.25, 1)]
        opt.zero_grad()
        after_empty = {n: p.detach().clone() for n, p in model.named_parameters()}
        expected = reference_sum(copy.deepcopy(model), dp, [(x, y)])
        F.cross_entropy(dp(x), y).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-12)
        runs[how] = after_empty
    for n in runs["forward"]:
        assert torch.equal(runs["forward"][n], runs["explicit"][n]), n


def test_an_empty_first_batch_through_the_original_model_is_still_refused():
    model = mlp()
    dp, opt, _ = private(model)
    x, y = data(3)
    F.cross_entropy(dp(x[:0]), y[:0], reduction="sum").backward()
    F.cross_entropy(model(x), y).backward()  # unclipped gradients added after the zero sums
    before = snapshot(model, opt)
    with pytest.raises(UnclippedGradientError, match="modified in place"):
        opt.step()
    assert_unchanged(model, opt, before)


def test_accumulation_over_three_backward_calls_is_the_reference():
    model = mlp()
    reference = copy.deepcopy(model)
    dp, opt, _ = private(model, noise_multiplier=0.0, momentum=0.0)
    x, y = data(9)
    parts = list(split_physical_batches((x, y), 3))
    assert len(parts) == 3
    expected = reference_sum(reference, dp, parts)
    for xb, yb in parts:
        F.cross_entropy(dp(xb), yb).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-12)
    opt.step()
    assert_one_sgd_step(model, reference, expected)


def test_physical_batches_accumulate_and_step_once_per_logical_batch():
    model = mlp()
    reference = copy.deepcopy(model)
    dp, opt, accountant = private(model, noise_multiplier=0.0, momentum=0.0)
    x, y = data(7)
    expected = reference_sum(reference, dp, [(x, y)])
    for xb, yb in PhysicalBatches([(x, y)], 3, opt):  # 3 + 3 + 1: step() and zero_grad() wait for the last
        F.cross_entropy(dp(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    assert opt.steps == 1 and history(opt) == [(0.0, 0.25, 1)]
    assert_one_sgd_step(model, reference, expected)


def test_zero_grad_keeping_tensors_then_backward_is_accepted():
    model = mlp()
    reference = copy.deepcopy(model)
    dp, opt, _ = private(model, noise_multiplier=0.0, momentum=0.0)
    x, y = data(4)
    F.cross_entropy(dp(x), y).backward()
    opt.zero_grad(set_to_none=False)  # zeros in the same tensors
    model.zero_grad(set_to_none=False)  # zeros again, by a zero_grad bkfx does not know: still zeros
    F.cross_entropy(dp(x), y).backward()
    expected = reference_sum(reference, dp, [(x, y)])
    opt.step()
    assert_one_sgd_step(model, reference, expected)


def _compiled_run(compile_step):
    """One step of a compiled run (with `compile_step(dp)` the callable that runs the model), the
    reference update, and an original-model backward on the compiled path afterwards."""
    model = mlp()
    reference = copy.deepcopy(model)
    dp, opt, _ = private(model, noise_multiplier=0.0, momentum=0.0)
    run = compile_step(dp)
    x, y = data(8)
    expected = reference_sum(reference, dp, [(x[:4], y[:4]), (x[4:], y[4:])])
    F.cross_entropy(run(x[:4]), y[:4]).backward()
    F.cross_entropy(run(x[4:]), y[4:]).backward()  # a second call accumulates
    opt.step()
    opt.zero_grad()
    assert_one_sgd_step(model, reference, expected)
    F.cross_entropy(run(x[:4]), y[:4]).backward()
    F.cross_entropy(model(x[:4]), y[:4]).backward()
    refused(model, opt, "modified in place")
    return dp


def test_compiled_step_receipts_are_accepted():
    def compiled(dp):
        dp.compile(backend="aot_eager")
        return dp

    dp = _compiled_run(compiled)
    assert sum(len(t) for t in dp._last.programs.values()) >= 1  # the steps ran compiled, not eagerly


def test_torch_compile_receipts_are_accepted():
    torch._dynamo.reset()
    _compiled_run(lambda dp: torch.compile(dp, backend="aot_eager", fullgraph=True, dynamic=True))


def test_grad_scaler_unscale_keeps_the_receipts():
    """`scaler.step(dp_optimizer)` unscales .grad in place: its receipts stay valid (the unscale
    kernel leaves the version as it is), and the step is the reference's."""
    model = mlp()
    reference = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    dp, opt, _ = private(model, noise_multiplier=0.0, momentum=0.0, grad_scaler=scaler)
    x, y = data(4)
    expected = reference_sum(reference, dp, [(x, y)])
    scaler.scale(F.cross_entropy(dp(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert opt.steps == 1
    assert_one_sgd_step(model, reference, expected)
    scaler.scale(F.cross_entropy(dp(x), y)).backward()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    before = snapshot(model, opt)
    with pytest.raises(UnclippedGradientError, match="modified in place"):
        scaler.step(opt)
    assert_unchanged(model, opt, before)


def test_optimizer_without_a_compiled_model_is_not_checked():
    """Parameters of no compiled model: whoever writes .grad vouches for it (no receipts exist)."""
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = bkfx.DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                           expected_batch_size=1)
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), -torch.ones(3, dtype=torch.float64))


# -- make_private and the loader's sampling ------------------------------------------------


@pytest.mark.parametrize("shuffle, sampler", [(True, "RandomSampler"), (False, "SequentialSampler")])
def test_make_private_warns_that_a_loaders_batching_is_replaced(shuffle, sampler):
    x, y = data(20)
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=5, shuffle=shuffle)
    model = mlp()
    with pytest.warns(PoissonSamplingWarning, match=sampler):
        result = bkfx.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, noise_multiplier=1.0,
                                   max_grad_norm=1.0)
    assert result.loader.batch_sampler.sample_rate == 5 / 20  # the loader's batch size is the expected one
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dataset, or a Poisson loader, is not replaced: no warning
        bkfx.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), dataset, noise_multiplier=1.0,
                          max_grad_norm=1.0, batch_size=5)
        model = mlp()
        bkfx.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), bkfx.poisson_loader(dataset, 0.25),
                          noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25)
