"""`bkfx.audit`: an empirical lower bound on ε from one training run with canaries.

    rest, canaries = bkfx.audit.mislabeled_canaries(train_set, 1000, num_classes=10, seed=1)

    def train(training_set):            # your private training job, on the set it is given
        model = Net()
        dp_model, optimizer, loader, accountant = bkfx.make_private(model, ..., training_set, ...)
        ...                             # the ordinary loop
        return model, accountant        # the trained model and what was accounted

    report = bkfx.audit.one_run(train, rest, canaries, delta=1e-5)
    print(report)                       # ε lower bound beside the accountant's ε
    report.plot("scores.png")           # scores of included vs excluded canaries

The method is Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run"
(NeurIPS 2023). Each of m canaries is included in the training set independently with
probability ½; after one run, the auditor scores every canary (here: minus its loss under
the trained model), guesses "included" for the k₊ highest scores and "excluded" for the
k₋ lowest, and abstains on the rest. If training is (ε, δ)-DP with respect to adding or
removing one example, the number of correct guesses among the r = k₊ + k₋ is stochastically
dominated by Bin(r, e^ε/(1+e^ε)) up to a δ term (their Theorem 5.2), so many correct
guesses refute small ε: `epsilon_lower_bound` turns (r, v correct, m, δ) into the largest ε
that the observed v refutes at the given confidence.

The bound holds whatever the scores and the canaries are; weak canaries only make it
loose. Input-space canaries (mislabeled examples) see the released model only, so for
DP-SGD the bound they give is typically far below the accountant's ε even when the
mechanism is exactly right; a bound above the accountant's ε means the implementation or
its accounting is broken (no clipping, no noise, a wrong sample rate). The bound is not a
proof of privacy. Gradient canaries (a canary's clipped gradient injected into each step,
scored on the released noisy gradients) are not provided: `bkfx.make_private`'s public
loop gives no place to add an extra per-step contribution that the optimizer would treat
as a Poisson-sampled example, so a sound version would need the optimizer's internals.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

__all__ = ["epsilon_lower_bound", "p_value", "one_run", "AuditReport", "mislabeled_canaries", "negative_cross_entropy"]

# the guess counts one_run tries when the caller does not choose: r/m for a symmetric split
GUESS_FRACTIONS = (0.1, 0.25, 0.5)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_bound_arguments(num_guesses, num_correct, num_canaries, delta, confidence) -> tuple[int, int, int]:
    r = _check_count("num_guesses", num_guesses)
    v = _check_count("num_correct", num_correct)
    m = _check_count("num_canaries", num_canaries)
    if v > r:
        raise ValueError(f"num_correct must be at most num_guesses ({r}), got {v}")
    if r > m:
        raise ValueError(f"num_guesses must be at most num_canaries ({m}), got {r}")
    if not (isinstance(delta, numbers.Real) and 0 <= delta <= 1):
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    if not (isinstance(confidence, numbers.Real) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return r, v, m


def _log_binomial_coefficients(r: int) -> np.ndarray:
    """log C(r, k) for k = 0..r."""
    log_factorial = np.array([math.lgamma(k + 1) for k in range(r + 1)])
    return log_factorial[r] - log_factorial - log_factorial[::-1]


def _log_p_value(log_choose: np.ndarray, v: int, m: int, epsilon: float, delta: float) -> float:
    """log of min(1, β + 2 m δ α) at ε (Steinke et al., Theorem 5.2), in log space throughout.

    q = e^ε/(1+e^ε); β = P[Bin(r, q) ≥ v]; α = max_{1≤i≤v} P[v−i ≤ Bin(r, q) < v] / i.
    """
    r = len(log_choose) - 1
    log_q, log_1mq = -np.logaddexp(0.0, -epsilon), -np.logaddexp(0.0, epsilon)  # log σ(ε), log σ(−ε)
    k = np.arange(r + 1)
    log_pmf = log_choose + k * log_q + (r - k) * log_1mq
    log_beta = np.logaddexp.reduce(log_pmf[v:])
    if delta == 0 or v == 0:
        return float(min(0.0, log_beta))
    # P[v−i ≤ Bin < v] for i = 1..v: running sums of pmf(v−1), pmf(v−2), ..., pmf(0)
    log_window = np.logaddexp.accumulate(log_pmf[v - 1::-1])
    log_alpha = np.max(log_window - np.log(np.arange(1, v + 1)))
    return float(min(0.0, np.logaddexp(log_beta, math.log(2 * m * delta) + log_alpha)))


def p_value(num_guesses: int, num_correct: int, num_canaries: int, delta: float, epsilon: float) -> float:
    """min(1, β + 2 m δ α): how likely v or more correct guesses out of r are under (ε, δ)-DP.

    Steinke, Nasr, Jagielski (2023), Theorem 5.2, with r = num_guesses, v = num_correct,
    m = num_canaries, q = e^ε/(1+e^ε), β = P[Bin(r, q) ≥ v] and
    α = max_{1≤i≤v} P[v−i ≤ Bin(r, q) < v] / i.
    """
    r, v, m = _check_bound_arguments(num_guesses, num_correct, num_canaries, delta, 0.5)
    if not (isinstance(epsilon, numbers.Real) and epsilon >= 0):
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    return math.exp(_log_p_value(_log_binomial_coefficients(r), v, m, float(epsilon), float(delta)))


def epsilon_lower_bound(
    num_guesses: int, num_correct: int, num_canaries: int, delta: float, confidence: float = 0.95,
) -> float:
    """The largest ε with p_value(r, v, m, δ, ε) ≤ 1 − confidence: an ε that (ε, δ)-DP cannot have.

    With probability at least `confidence` over the canaries' inclusion and the training
    run, a run that is (ε, δ)-DP (add/remove one example) gives a bound ≤ ε. Bisection on ε
    (the p-value grows with ε, as the paper's own search assumes), to 1e-9 absolute; 0 when
    even ε = 0 explains the guesses (in particular for v = 0 or r = 0).
    For r = v = m = 1000, δ = 0 and confidence 0.95 it is 5.81: q¹⁰⁰⁰ = 0.05.
    """
    r, v, m = _check_bound_arguments(num_guesses, num_correct, num_canaries, delta, confidence)
    log_choose = _log_binomial_coefficients(r)
    log_level = math.log1p(-confidence)

    def refuted(eps: float) -> bool:
        return _log_p_value(log_choose, v, m, eps, float(delta)) <= log_level

    if v == 0 or not refuted(0.0):
        return 0.0
    lo, hi = 0.0, 1.0  # invariant once bracketed: lo refuted, hi not
    while refuted(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if refuted(mid) else (lo, mid)
    return lo


def negative_cross_entropy(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default score: −CE(model(x), y) per canary; a memorised canary scores high."""
    return -F.cross_entropy(model(inputs), targets, reduction="none")


def mislabeled_canaries(dataset: Dataset, num_canaries: int, num_classes: int, seed: int = 0):
    """m examples drawn from `dataset`, each with its label replaced by a different class drawn uniformly.

    Returns `(rest, canaries)`: the dataset without the drawn examples (a Subset) and the m
    relabelled examples (a TensorDataset of inputs and labels). Removing the originals keeps
    a canary's correct twin out of training, which would otherwise pull its score down.
    Items of `dataset` are `(input tensor, label)`.
    """
    m = _check_count("num_canaries", num_canaries)
    if not 0 < m <= len(dataset):
        raise ValueError(f"num_canaries must be in [1, {len(dataset)}] (the dataset's size), got {num_canaries}")
    if _check_count("num_classes", num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2 to mislabel, got {num_classes}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset))
    drawn, rest = order[:m], np.sort(order[m:])
    inputs = torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in drawn])
    labels = torch.tensor([int(dataset[int(i)][1]) for i in drawn])
    wrong = (labels + torch.as_tensor(rng.integers(1, num_classes, size=m))) % num_classes  # never the true class
    return Subset(dataset, rest.tolist()), TensorDataset(inputs, wrong)


@dataclass
class AuditReport:
    """What `one_run` measured: the ε lower bound beside the accountant's ε, and the evidence.

    epsilon_lower_bound: the largest ε refuted at `confidence` (Bonferroni-corrected over the
        `candidates` guess counts tried). epsilon: what the training run's accountant says (inf
        without noise). num_guesses = guesses_in + guesses_out of which num_correct were right.
    scores, included: per canary, the score and whether it was in the training set.
    """

    epsilon_lower_bound: float
    epsilon: float
    delta: float
    confidence: float
    num_canaries: int
    num_included: int
    num_guesses: int
    num_correct: int
    guesses_in: int
    guesses_out: int
    candidates: tuple[tuple[int, int], ...]
    scores: np.ndarray = field(repr=False)
    included: np.ndarray = field(repr=False)

    def __str__(self) -> str:
        return (
            f"privacy audit (one run, {self.num_canaries} canaries, {self.num_included} included)\n"
            f"  guesses          {self.num_guesses} ({self.guesses_in} in, {self.guesses_out} out), "
            f"{self.num_correct} correct\n"
            f"  ε lower bound    {self.epsilon_lower_bound:.3f}  (confidence {self.confidence:g}, "
            f"δ {self.delta:g}, best of {len(self.candidates)} guess counts)\n"
            f"  ε (accountant)   {self.epsilon:.3f}"
        )

    def plot(self, path: str, title: str | None = None) -> str:
        """Histograms of the scores of included and excluded canaries, with the guess thresholds; saved to `path`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ordered = np.sort(self.scores)
        bins = np.linspace(ordered[0], ordered[-1], 41) if ordered[-1] > ordered[0] else 10
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.hist(self.scores[self.included], bins=bins, alpha=0.6, label=f"included ({self.num_included})")
        ax.hist(self.scores[~self.included], bins=bins, alpha=0.6,
                label=f"excluded ({self.num_canaries - self.num_included})")
        if self.guesses_in:
            ax.axvline(ordered[-self.guesses_in], color="k", ls="--", lw=1, label="guess in ≥ / out ≤")
        if self.guesses_out:
            ax.axvline(ordered[self.guesses_out - 1], color="k", ls="--", lw=1)
        ax.set_xlabel("score (−loss of the canary)")
        ax.set_ylabel("canaries")
        ax.set_title(title or f"ε lower bound {self.epsilon_lower_bound:.2f}, accountant ε {self.epsilon:.2f} "
                              f"(δ {self.delta:g})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _guess_counts(guesses, m: int) -> list[tuple[int, int]]:
    """(k₊, k₋) pairs to try: the caller's one, or the symmetric splits r = f·m of GUESS_FRACTIONS."""
    if guesses is None:
        pairs = {(round(f * m / 2), round(f * m / 2)) for f in GUESS_FRACTIONS}
        return sorted(p for p in pairs if sum(p) > 0) or [(0, 0)]
    pair = (guesses, guesses) if isinstance(guesses, numbers.Integral) and not isinstance(guesses, bool) else guesses
    if not (isinstance(pair, tuple) and len(pair) == 2):
        raise ValueError(f"guesses must be None, an int k (k in, k out) or a pair (k_in, k_out), got {guesses!r}")
    k_in, k_out = (_check_count("guesses", k) for k in pair)
    if k_in + k_out > m:
        raise ValueError(f"guesses must total at most num_canaries ({m}), got {k_in} + {k_out}")
    return [(k_in, k_out)]


def _epsilon_of(reported, delta: float) -> float:
    from bkfx.training.accounting import Accountant

    if isinstance(reported, Accountant):
        return reported.epsilon(delta)
    if isinstance(reported, numbers.Real):
        return float(reported)
    raise ValueError(f"train must return (model, epsilon) with epsilon a number or a bkfx.Accountant, "
                     f"got {type(reported).__name__}")


def _scores(model, canaries: Dataset, score_fn, batch_size: int) -> np.ndarray:
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    try:
        with torch.no_grad():
            parts = [score_fn(model, x, y).detach().reshape(-1).double().cpu()
                     for x, y in DataLoader(canaries, batch_size=batch_size, shuffle=False)]
    finally:
        if was_training:
            model.train()
    scores = torch.cat(parts).numpy()
    if len(scores) != len(canaries):
        raise ValueError(f"score_fn must return one score per canary, got {len(scores)} for {len(canaries)}")
    return scores


def one_run(
    train: Callable, dataset: Dataset, canaries: Dataset, *, delta: float, confidence: float = 0.95,
    guesses=None, score_fn: Callable = negative_cross_entropy, seed: int = 0, batch_size: int = 256,
) -> AuditReport:
    """Audit `train` in one run: include each canary with probability ½, train once, score, guess, bound ε.

    train(training_set) -> (model, epsilon): your training job on the Dataset it is given
        (`dataset` followed by the included canaries); epsilon is the accountant's ε at
        `delta` as a number, or the `bkfx.Accountant` itself. Use a training seed unrelated
        to `seed`, which draws the inclusions.
    canaries: a Dataset of m `(input, target)` examples, e.g. from `mislabeled_canaries`.
    score_fn(model, inputs, targets) -> one score per canary, higher meaning "more likely
        included" (default: minus the cross-entropy); computed under no_grad, model in eval().
    guesses: k (k in and k out), (k₊, k₋), or None: try the symmetric splits with
        k₊ = k₋ = f·m/2 for f in GUESS_FRACTIONS and keep the best bound, each computed at
        confidence 1 − (1 − confidence)/J for J tries (Bonferroni), so the best is still
        valid at `confidence`.
    """
    m = len(canaries)
    if m == 0:
        raise ValueError("canaries must hold at least one example")
    if not (isinstance(delta, numbers.Real) and 0 <= delta <= 1):
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    if not (isinstance(confidence, numbers.Real) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    candidates = _guess_counts(guesses, m)

    included = np.random.default_rng(seed).random(m) < 0.5
    training_set = ConcatDataset([dataset, Subset(canaries, np.flatnonzero(included).tolist())])
    result = train(training_set)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError(f"train must return (model, epsilon), got {type(result).__name__}")
    model, reported = result
    epsilon = _epsilon_of(reported, delta)
    scores = _scores(model, canaries, score_fn, batch_size)

    order = np.argsort(scores, kind="stable")  # ascending: the lowest scores guessed out
    each = 1 - (1 - confidence) / len(candidates)
    best = None
    for k_in, k_out in candidates:
        correct = int(included[order[m - k_in:]].sum()) if k_in else 0
        correct += int((~included[order[:k_out]]).sum())
        bound = epsilon_lower_bound(k_in + k_out, correct, m, delta, each)
        if best is None or bound > best[0]:
            best = (bound, k_in, k_out, correct)
    bound, k_in, k_out, correct = best
    return AuditReport(
        epsilon_lower_bound=bound, epsilon=epsilon, delta=float(delta), confidence=float(confidence),
        num_canaries=m, num_included=int(included.sum()), num_guesses=k_in + k_out, num_correct=correct,
        guesses_in=k_in, guesses_out=k_out, candidates=tuple(candidates), scores=scores, included=included,
    )
