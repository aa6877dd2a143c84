"""Fixed-shape Poisson batches: truncated at max_batch_size, padded to a multiple of k with rows the
DP model gives clip factor 0; accounted as truncated Poisson sampling; at most ⌈M/k⌉ CUDA graph pairs."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binom
from torch import nn
from torch.utils.data import TensorDataset

import bkfx
from bkfx.training.accounting import Run, _epsilon_of, _mechanism_epsilon
from bkfx.training.data import PoissonSampler, current_padding, padded

from helpers import with_simulated_cuda_graphs


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def dataset(N=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g))


def loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def test_batches_are_truncated_uniformly_and_padded_to_multiples():
    """q N = 15 with M = 12: batches above 12 keep a uniformly random 12 of the drawn examples; every
    batch is padded to a multiple of 4 with the first example, marked as padding after the real rows."""
    data = dataset()
    loader = bkfx.poisson_loader(data, 0.25, steps=400, seed=1, max_batch_size=12, pad_to_multiple_of=4)
    sampler, draws = loader.batch_sampler, []
    truncate = sampler.truncate
    sampler.truncate = lambda indices: (draws.append(indices.tolist()), truncate(indices))[1]  # the drawn batches
    counts, truncated = torch.zeros(60), 0
    for step, (x, y) in enumerate(loader):
        drawn = draws[step]
        padding = current_padding()
        n = int(padding.mask.sum())
        assert x.shape[0] % 4 == 0 and x.shape[0] == max(1, math.ceil(n / 4)) * 4 and n == min(len(drawn), 12)
        assert torch.equal(padding.mask, torch.arange(x.shape[0]) < n)
        assert torch.equal(x[n:], data.tensors[0][:1].expand(x.shape[0] - n, 5))
        rows = [next(i for i in drawn if torch.equal(data.tensors[0][i], row)) for row in x[:n]]
        assert rows == sorted(rows) and set(rows) <= set(drawn)  # a subset of the drawn batch, in order
        truncated += len(drawn) > 12
        counts[rows] += 1
    assert current_padding() is None  # the mark ends with the loop
    assert truncated > 50
    # uniform: every example's inclusion rate is q P[kept] (the same for all), within 4 standard errors
    rate = counts / 400
    assert (rate - rate.mean()).abs().max() < 4 * math.sqrt(rate.mean() * (1 - rate.mean()) / 400)


@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
def test_a_padded_step_equals_the_unpadded_step(style):
    """The same examples, padded or not: the eager step's .grad is identical (float64, torch.equal),
    the padding rows' norms are 0; the compiled step (padded shape kept) agrees to rounding."""
    x, y = dataset(7).tensors
    xp, yp = torch.cat([x, x[:1].expand(5, 5)]), torch.cat([y, y[:1].expand(5)])
    for compiled in (False, True):
        a, b = mlp(), mlp()
        plain = bkfx.compile(a, max_grad_norm=0.3, loss_reduction="sum", style=style)
        pad = bkfx.compile(b, max_grad_norm=0.3, loss_reduction="sum", style=style)
        if compiled:
            pad.compile(backend="aot_eager")
        loss(plain(x), y).backward()
        with padded(torch.arange(12) < 7):
            loss(pad(xp), yp).backward()
        for p, q in zip(a.parameters(), b.parameters()):
            if compiled:
                assert torch.allclose(p.grad, q.grad, rtol=1e-14, atol=1e-15)
            else:
                assert torch.equal(p.grad, q.grad)
        assert torch.equal(pad.per_sample_norms[7:], torch.zeros(5, dtype=torch.float64))
        assert torch.allclose(pad.per_sample_norms[:7], plain.per_sample_norms, rtol=1e-14)
        assert compiled == (pad._last_program is not None)


def test_padding_rows_do_not_enter_the_adaptive_count():
    x, y = dataset(7, seed=2).tensors
    xp, yp = torch.cat([x, x[:1].expand(5, 5)]), torch.cat([y, y[:1].expand(5)])
    runs = []
    for pad in (False, True):
        model = mlp(2)
        dp = bkfx.compile(model, max_grad_norm=1.0)
        optimizer = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, model=dp,
                                     expected_batch_size=7,
                                     adaptive_clipping=bkfx.AdaptiveClipping(count_noise_multiplier=0.0))
        if pad:
            with padded(torch.arange(12) < 7):
                loss(dp(xp), yp).backward()
        else:
            loss(dp(x), y).backward()
        optimizer.step()
        runs.append(dp.max_grad_norm)
    assert runs[0] == runs[1] and runs[0] != 1.0


def test_reduce_overhead_captures_at_most_ceil_m_over_k_graph_pairs(monkeypatch):
    """mode="reduce-overhead" with simulated CUDA graphs (as tests/test_compiled.py): 25 Poisson
    steps at q N = 12 capture a graph pair per batch size unpadded, at most ⌈M/k⌉ = 3 padded (M=20,
    k=8); the padded run's parameters equal an eager padded run's."""
    with_simulated_cuda_graphs(monkeypatch)
    data = dataset(60, seed=3)
    counts = {}
    models = {}
    for name, options, graphs in [("unpadded", {}, True), ("padded", {"max_batch_size": 20, "pad_to_multiple_of": 8}, True),
                                  ("padded eager", {"max_batch_size": 20, "pad_to_multiple_of": 8}, False)]:
        model = mlp(3)
        dp = bkfx.compile(model, max_grad_norm=0.5)
        if graphs:
            dp.compile(backend="aot_eager", mode="reduce-overhead")
        optimizer = bkfx.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, model=dp,
                                     expected_batch_size=12, seed=0)
        for x, y in bkfx.poisson_loader(data, 0.2, steps=25, seed=4, **options):
            loss(dp(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        models[name] = model
        if graphs:
            counts[name] = sum(len(p.graphs._forward) for c in dp._captures.values() for ps in c.programs.values() for p in ps)
    assert counts["padded"] <= 3 < counts["unpadded"]
    for p, q in zip(models["padded"].parameters(), models["padded eager"].parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-13)


def test_truncation_is_accounted_in_delta():
    """The accountant adds (1 + e^ε)·T·P[Bin(N+1, q) > M] to δ: the ε it reports is the smallest
    whose untruncated mechanism meets the rest of δ; the probability agrees with a direct sum."""
    N, q, M = 1000, 0.05, 85
    p = PoissonSampler(N, q, seed=0, max_batch_size=M).truncation_probability
    direct = sum(binom.pmf(k, N + 1, q) for k in range(M + 1, N + 2))
    assert math.isclose(p, direct, rel_tol=1e-9) and 1e-9 < p < 1e-5
    accountant = bkfx.Accountant()
    accountant.step(noise_multiplier=1.2, sample_rate=q, count=100, truncation_probability=p)
    eps = accountant.epsilon(1e-2)
    plain = bkfx.epsilon(1.2, q, 100, 1e-2)
    runs = [Run(1.2, q, 100)]
    assert eps > plain
    assert _mechanism_epsilon(runs, 1e-2 - (1 + math.exp(eps)) * 100 * p, "rdp") <= eps
    report = bkfx.privacy_report(accountant, delta=1e-2)
    assert report.epsilon_rdp == eps and "truncation" in str(report)
    restored = bkfx.Accountant()
    restored.load_state_dict(accountant.state_dict())
    assert restored.epsilon(1e-2) == eps


def test_make_private_with_fixed_shapes_accounts_the_loader_truncation():
    data = dataset(60, seed=5)
    model = mlp(5)
    model, optimizer, loader, accountant = bkfx.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), data, noise_multiplier=1.0, max_grad_norm=1.0,
        batch_size=12, max_batch_size=16, pad_to_multiple_of=4, seed=0)
    for x, y in loader:
        assert x.shape[0] % 4 == 0
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    (run,) = accountant.history
    assert run.truncation == loader.batch_sampler.truncation_probability > 0 and run.count == len(loader)
