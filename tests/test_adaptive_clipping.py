"""Adaptive clipping (`bkfx.training.adaptive`, Andrew et al. 2021): R follows a quantile of the per-sample
norms through a privately counted fraction; the accountant charges gradient and count as one
Gaussian; a new R neither recaptures nor recompiles; checkpoints keep R."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import bkfx
from bkfx.training.adaptive import combined_noise_multiplier, gradient_noise_multiplier

AOT = {"backend": "aot_eager"}


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batch(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 5, generator=g, dtype=torch.float64) * 3, torch.randint(0, 3, (B,), generator=g)


def private(model, *, noise=0.0, sigma_b=0.0, quantile=0.5, lr=0.0, expected=None, compiled=False, **options):
    dp = bkfx.compile(model, max_grad_norm=options.pop("max_grad_norm", 10.0), **options)
    if compiled:
        dp.compile(**AOT)
    adaptive = bkfx.AdaptiveClipping(target_unclipped_quantile=quantile, learning_rate=0.2, count_noise_multiplier=sigma_b)
    optimizer = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=noise, model=dp,
                                 expected_batch_size=expected, seed=0, adaptive_clipping=adaptive,
                                 accountant=bkfx.Accountant(), sample_rate=0.1)
    return dp, optimizer


def step(dp, optimizer, x, y):
    F.cross_entropy(dp(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_threshold_converges_to_the_quantile_of_the_norms(quantile):
    """σ = σ_b = 0, a fixed batch of exactly the expected size, parameters that do not move (lr=0):
    R reaches the target quantile of the per-sample norms within 10% in 50 steps, from 10 far above."""
    x, y = batch(32)
    dp, optimizer = private(mlp(), quantile=quantile, expected=32)
    for _ in range(50):
        step(dp, optimizer, x, y)
    target = torch.quantile(dp.per_sample_norms, quantile).item()
    assert abs(dp.max_grad_norm - target) <= 0.1 * target, (dp.max_grad_norm, target)
    assert optimizer.max_grad_norm == dp.max_grad_norm  # the noise is scaled to the R the next step clips at


def test_one_threshold_per_group_each_to_its_own_quantile():
    x, y = batch(32, seed=1)
    dp, optimizer = private(mlp(1), style="layer-wise", expected=32)
    for _ in range(50):
        step(dp, optimizer, x, y)
    for R, norms in zip(dp.max_grad_norm, dp.per_group_norms):
        target = torch.quantile(norms, 0.5).item()
        assert abs(R - target) <= 0.1 * target, (R, target)
    assert math.isclose(optimizer.max_grad_norm, math.hypot(*dp.max_grad_norm), rel_tol=1e-12)


def test_one_update_is_the_geometric_step_of_the_shifted_count_over_physical_batches():
    """One logical batch in two backward passes (physical batches), 11 samples against an expected
    12: b̄ = (Σ_i (1[‖G_i‖ ≤ R] − ½)) / m + ½, R ← R exp(−η (b̄ − γ)), with the norms clipped at R."""
    x, y = batch(11, seed=2)
    dp, optimizer = private(mlp(2), quantile=0.3, expected=12, max_grad_norm=2.7)
    R = dp.max_grad_norm
    norms = []
    for part in (slice(0, 6), slice(6, 11)):
        optimizer.logical_batch_complete = part.stop == 11
        F.cross_entropy(dp(x[part]), y[part]).backward()
        norms.append(dp.per_sample_norms)
        optimizer.step()
    norms = torch.cat(norms)
    b = ((norms <= R).double() - 0.5).sum().item() / 12 + 0.5
    assert 0 < (norms <= R).sum() < 11  # the count is not trivial
    assert math.isclose(dp.max_grad_norm, R * math.exp(-0.2 * (b - 0.3)), rel_tol=1e-12)


def test_compiled_step_reads_the_new_threshold_without_recapture_or_recompile():
    """The compiled BK step takes R as an input: five steps with five thresholds run one capture
    and one compiled program, and equal the eager step (parameters and R) step by step."""
    x, y = batch(16, seed=3)
    runs = [private(mlp(3), noise=1.0, sigma_b=2.0, lr=0.5, expected=16, compiled=c) for c in (False, True)]
    seen = []
    for k in range(5):
        xs, ys = x[k % 2::2] if k % 2 else x, y[k % 2::2] if k % 2 else y  # batch sizes 16 and 8
        for dp, optimizer in runs:
            step(dp, optimizer, xs, ys)
        (eager, _), (compiled, _) = runs
        assert math.isclose(eager.max_grad_norm, compiled.max_grad_norm, rel_tol=1e-10)
        for p, q in zip(eager.parameters(), compiled.parameters()):
            assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)
        seen.append(compiled.max_grad_norm)
    assert len(set(seen)) == 5
    assert compiled.capture_count == 1 and compiled.compiled_step_count == 1


def test_torch_compile_does_not_recompile_when_the_threshold_changes():
    """Under torch.compile the DP model is one operator that reads R at run time: one dynamo graph
    and one compiled BK step for every R."""
    x, y = batch(8, seed=4)
    dp, optimizer = private(mlp(4), noise=0.5, sigma_b=1.0, lr=0.1, expected=8, compiled=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    train = torch.compile(lambda x, y: F.cross_entropy(dp(x), y), backend=backend, fullgraph=True)
    thresholds = []
    for _ in range(4):
        train(x, y).backward()
        optimizer.step()
        optimizer.zero_grad()
        thresholds.append(dp.max_grad_norm)
    assert len(set(thresholds)) == 4
    assert len(graphs) == 1 and dp.capture_count == 1 and dp.compiled_step_count == 1


def test_accountant_charges_the_combined_gaussian():
    x, y = batch(8, seed=5)
    dp, optimizer = private(mlp(5), noise=1.0, sigma_b=2.0, expected=8)
    for _ in range(3):
        step(dp, optimizer, x, y)
    z = (1.0 ** -2 + 4.0 ** -2) ** -0.5
    assert math.isclose(optimizer.accounted_noise_multiplier, z, rel_tol=1e-15)
    assert optimizer.accountant.epsilon(1e-5) == bkfx.epsilon(z, 0.1, 3, 1e-5)
    report = bkfx.privacy_report(optimizer.accountant, delta=1e-5)
    assert report.noise_multiplier == z and "adaptive clipping" in str(report) and "count σ_b 2" in str(report)


def test_make_private_calibrates_the_gradient_noise_so_that_the_pair_meets_the_target():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(200, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (200,), generator=g))
    adaptive = bkfx.AdaptiveClipping(count_noise_multiplier=10.0, initial=0.5)
    model, optimizer, loader, accountant = _make_private(data, adaptive)
    z = bkfx.noise_multiplier_for(2.0, 0.1, 2 * len(loader), 1e-5)
    assert math.isclose(combined_noise_multiplier(optimizer.noise_multiplier, 10.0), z, rel_tol=1e-12)
    assert optimizer.noise_multiplier > z and model.max_grad_norm == 0.5
    assert bkfx.epsilon(optimizer.accounted_noise_multiplier, 0.1, 2 * len(loader), 1e-5) <= 2.0
    with pytest.raises(ValueError, match="2σ_b"):
        _make_private(data, bkfx.AdaptiveClipping(count_noise_multiplier=0.1))


def _make_private(data, adaptive):
    model = mlp()
    return bkfx.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), data, target_epsilon=2.0,
                             target_delta=1e-5, epochs=2, max_grad_norm=1.0, batch_size=20, adaptive_clipping=adaptive)


def test_count_without_noise_is_refused_with_gradient_noise():
    model = mlp()
    dp = bkfx.compile(model)
    with pytest.raises(ValueError, match="count_noise_multiplier=0"):
        bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, model=dp,
                         expected_batch_size=8, adaptive_clipping=bkfx.AdaptiveClipping(count_noise_multiplier=0.0))
    with pytest.raises(ValueError, match="target_unclipped_quantile"):
        bkfx.AdaptiveClipping(count_noise_multiplier=1.0, target_unclipped_quantile=1.0)
    assert gradient_noise_multiplier(combined_noise_multiplier(1.3, 2.0), 2.0) == pytest.approx(1.3, rel=1e-12)


def test_checkpoint_keeps_the_threshold_and_the_count_noise_stream(tmp_path):
    """A run resumed from a checkpoint continues with the saved R and draws the same count noise."""
    x, y = batch(8, seed=6)
    a = private(mlp(6), noise=1.0, sigma_b=2.0, lr=0.1, expected=8)
    for _ in range(3):
        step(*a, x, y)
    bkfx.save_checkpoint(tmp_path / "c.pt", model=a[0], optimizer=a[1])
    saved = a[0].max_grad_norm
    b = private(mlp(7), noise=1.0, sigma_b=2.0, lr=0.1, expected=8)
    bkfx.load_checkpoint(tmp_path / "c.pt", model=b[0], optimizer=b[1])
    assert b[0].max_grad_norm == saved and b[1].max_grad_norm == a[1].max_grad_norm
    for _ in range(2):
        for run in (a, b):
            step(*run, x, y)
    assert a[0].max_grad_norm == b[0].max_grad_norm
    assert all(torch.equal(p, q) for p, q in zip(a[0].parameters(), b[0].parameters()))
