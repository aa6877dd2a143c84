"""bkfx.audit: the one-run ε lower bound against scipy's binomial, and audits of a private and a non-private run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import bkfx
from bkfx.audit import epsilon_lower_bound, mislabeled_canaries, one_run, p_value


def reference_p_value(m, r, v, eps, delta):
    """Steinke, Nasr, Jagielski (2023), Algorithm in their appendix, with scipy's binomial."""
    q = 1 / (1 + math.exp(-eps))
    beta = scipy.stats.binom.sf(v - 1, r, q)  # P[Bin(r, q) >= v]
    windows = np.cumsum(scipy.stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v - i <= Bin(r, q) < v]
    alpha = float(np.max(windows / np.arange(1, v + 1))) if v else 0.0
    return min(1.0, beta + alpha * delta * 2 * m)


def reference_bound(m, r, v, delta, confidence):
    lo, hi = 0.0, 1.0
    level = 1 - confidence
    if reference_p_value(m, r, v, 0.0, delta) > level:
        return 0.0
    while reference_p_value(m, r, v, hi, delta) <= level:
        hi += 1
    for _ in range(45):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reference_p_value(m, r, v, mid, delta) <= level else (lo, mid)
    return lo


POINTS = [  # (r, v, m, delta, confidence)
    (1000, 1000, 1000, 0.0, 0.95),
    (100, 90, 1000, 1e-5, 0.95),
    (500, 400, 1000, 1e-6, 0.99),
    (50, 50, 50, 1e-2, 0.95),
    (1000, 700, 2000, 1e-5, 0.95),
    (20, 15, 100, 0.0, 0.9),
    (300, 296, 1000, 1e-5, 0.9875),
]


@pytest.mark.parametrize("r, v, m, delta, confidence", POINTS)
def test_bound_matches_scipy(r, v, m, delta, confidence):
    expected = reference_bound(m, r, v, delta, confidence)
    assert expected > 0
    assert epsilon_lower_bound(r, v, m, delta, confidence) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("r, v, m, delta, confidence", POINTS)
def test_p_value_matches_scipy(r, v, m, delta, confidence):
    for eps in (0.0, 0.5, 2.0, 6.0):
        assert p_value(r, v, m, delta, eps) == pytest.approx(reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-300)


def test_bound_of_the_paper():
    # all 1000 guesses right: q^1000 = 0.05, so eps = log(q / (1 - q)) with q = 0.05^(1/1000)
    q = 0.05 ** (1 / 1000)
    assert epsilon_lower_bound(1000, 1000, 1000, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert round(epsilon_lower_bound(1000, 1000, 1000, 0.0), 2) == 5.81


def test_bound_grows_with_correct_guesses():
    bounds = [epsilon_lower_bound(200, v, 1000, 1e-5) for v in range(100, 201, 10)]
    assert bounds[0] == 0.0
    positive = [b for b in bounds if b > 0]
    assert len(positive) >= 8 and all(a < b for a, b in zip(positive, positive[1:]))
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))


def test_bound_grows_with_guesses_at_fixed_accuracy():
    bounds = [epsilon_lower_bound(r, int(0.9 * r), 1600, 1e-5) for r in (50, 100, 200, 400, 800, 1600)]
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] == pytest.approx(reference_bound(1600, 1600, 1440, 1e-5, 0.95), abs=1e-6)


def test_bound_edge_cases():
    assert epsilon_lower_bound(0, 0, 10, 1e-5) == 0.0
    assert epsilon_lower_bound(10, 0, 10, 0.0) == 0.0
    assert epsilon_lower_bound(10, 5, 10, 0.0) == 0.0  # chance level refutes nothing
    assert epsilon_lower_bound(1000, 1000, 1000, 1.0) == 0.0  # δ = 1 allows anything
    # a larger δ or a higher confidence can only lower the bound
    assert epsilon_lower_bound(500, 450, 1000, 1e-3) < epsilon_lower_bound(500, 450, 1000, 1e-6)
    assert epsilon_lower_bound(500, 450, 1000, 1e-5, 0.99) < epsilon_lower_bound(500, 450, 1000, 1e-5, 0.9)


@pytest.mark.parametrize("args, name", [
    ((-1, 0, 10, 0.0), "num_guesses"),
    ((5.5, 0, 10, 0.0), "num_guesses"),
    ((5, -1, 10, 0.0), "num_correct"),
    ((5, 6, 10, 0.0), "num_correct"),
    ((True, 0, 10, 0.0), "num_guesses"),
    ((11, 5, 10, 0.0), "num_guesses"),
    ((5, 5, -1, 0.0), "num_canaries"),
    ((5, 5, 10, -1e-5), "delta"),
    ((5, 5, 10, 1.5), "delta"),
    ((5, 5, 10, float("nan")), "delta"),
])
def test_bound_argument_errors(args, name):
    with pytest.raises(ValueError, match=name):
        epsilon_lower_bound(*args)


@pytest.mark.parametrize("confidence", [0.0, 1.0, -0.5, float("nan")])
def test_bound_confidence_errors(confidence):
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(5, 5, 10, 0.0, confidence)


def clusters(n, seed, num_classes=10, dim=64):
    """n points around num_classes well-separated means in `dim` dimensions, labelled by cluster."""
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0))
    y = torch.randint(num_classes, (n,), generator=g)
    return TensorDataset(means[y] + torch.randn(n, dim, generator=g), y)


def test_mislabeled_canaries():
    data = clusters(50, seed=1)
    rest, canaries = mislabeled_canaries(data, 20, num_classes=10, seed=3)
    assert len(rest) == 30 and len(canaries) == 20
    x, y = canaries.tensors
    originals = {tuple(data[i][0].tolist()): int(data[i][1]) for i in range(len(data))}
    assert all(originals[tuple(xi.tolist())] != int(yi) for xi, yi in zip(x, y))
    assert not {tuple(x.tolist()) for x, _ in (rest[i] for i in range(len(rest)))} & {tuple(xi.tolist()) for xi in x}
    with pytest.raises(ValueError, match="num_canaries"):
        mislabeled_canaries(data, 51, num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        mislabeled_canaries(data, 5, num_classes=1)


def audit(private: bool, tmp_path=None):
    """A linear classifier on 10 clusters in 64 dimensions, 200 mislabeled canaries; fixed seeds."""
    rest, canaries = mislabeled_canaries(clusters(300, seed=1), 200, num_classes=10, seed=2)

    def train(training_set):
        torch.manual_seed(0)
        model = nn.Linear(64, 10)
        budget = {"target_epsilon": 2.0, "target_delta": 1e-5, "epochs": 30} if private else {"noise_multiplier": 0.0}
        dp_model, optimizer, loader, accountant = bkfx.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.5), training_set, **budget,
            max_grad_norm=1.0 if private else 1e6, batch_size=50, seed=0)
        for _ in range(30):
            for x, y in loader:
                F.cross_entropy(dp_model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
        return model, accountant

    return one_run(train, rest, canaries, delta=1e-5, seed=5)


def test_audit_finds_the_leak_of_a_non_private_run(tmp_path):
    report = audit(private=False)
    assert report.epsilon == math.inf
    assert report.num_canaries == 200 and report.num_included == int(report.included.sum())
    assert report.epsilon_lower_bound > 1.0
    # the report's bound is the bound of its guesses at the Bonferroni-corrected confidence
    each = 1 - 0.05 / len(report.candidates)
    assert report.epsilon_lower_bound == epsilon_lower_bound(report.num_guesses, report.num_correct, 200, 1e-5, each)
    order = np.argsort(report.scores, kind="stable")
    right = report.included[order[200 - report.guesses_in:]].sum() + (~report.included[order[:report.guesses_out]]).sum()
    assert report.num_correct == right
    path = report.plot(str(tmp_path / "scores.png"))
    assert (tmp_path / "scores.png").stat().st_size > 1000 and path.endswith("scores.png")


def test_audit_of_a_private_run_stays_below_the_accountant():
    report = audit(private=True)
    assert report.epsilon == pytest.approx(2.0, abs=0.05)
    assert report.epsilon_lower_bound < report.epsilon


def test_one_run_argument_errors():
    data = clusters(20, seed=1)
    rest, canaries = mislabeled_canaries(data, 10, num_classes=10)
    model = nn.Linear(64, 10)
    with pytest.raises(ValueError, match="guesses"):
        one_run(lambda s: (model, 1.0), rest, canaries, delta=1e-5, guesses=(6, 6))
    with pytest.raises(ValueError, match="guesses"):
        one_run(lambda s: (model, 1.0), rest, canaries, delta=1e-5, guesses="all")
    with pytest.raises(ValueError, match="delta"):
        one_run(lambda s: (model, 1.0), rest, canaries, delta=2.0)
    with pytest.raises(ValueError, match="train must return"):
        one_run(lambda s: model, rest, canaries, delta=1e-5)
    with pytest.raises(ValueError, match="train must return"):
        one_run(lambda s: (model, "3"), rest, canaries, delta=1e-5)
    # the training set holds the clean examples and exactly the included canaries
    seen = {}

    def train(training_set):
        seen["n"] = len(training_set)
        return model, 1.0

    report = one_run(train, rest, canaries, delta=1e-5, guesses=(2, 3))
    assert seen["n"] == len(rest) + report.num_included
    assert (report.guesses_in, report.guesses_out, report.num_guesses) == (2, 3, 5)
