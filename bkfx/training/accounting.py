"""Privacy accounting for DP-SGD with Poisson sampling, on Google's `dp_accounting`.

One step of DP-SGD with sample rate q and noise multiplier σ is the Poisson
subsampled Gaussian mechanism: each example joins the batch independently with
probability q, the clipped sum (sensitivity R under adding or removing one example)
gets N(0, σ²R²) noise. T steps compose:

    SelfComposed(PoissonSampled(q, Gaussian(σ)), T)

- "rdp" (`dp_accounting.rdp.RdpAccountant`, its default orders α): the Rényi DP of
  the sampled Gaussian (Mironov, Talwar, Zhang 2019) adds up over steps,
  `ρ_T(α) = T ρ(α)`, and converts to (ε, δ) by
  `ε = min_α ρ_T(α) + log(1 - 1/α) - log(δ α)/(α - 1)` (Canonne, Kamath, Steinke 2020, Prop. 12).
- "pld" (`dp_accounting.pld.PLDAccountant`): the privacy loss distribution, composed
  numerically; tighter than RDP (smaller ε for the same run), slower.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

__all__ = ["METHODS", "check_noise_multiplier", "check_sample_rate", "Run", "truncation_probability",
    "epsilon", "noise_multiplier_for", "Accountant"]

METHODS = ("rdp", "pld")


def _check_method(accountant: str) -> None:
    if accountant not in METHODS:
        raise ValueError(f"accountant must be one of {METHODS}, got {accountant!r}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def check_noise_multiplier(noise_multiplier: float) -> None:
    """σ >= 0 (σ = 0 adds no noise: no privacy)."""
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")


def check_sample_rate(sample_rate: float, allow_zero: bool = False) -> None:
    """q in (0, 1] where batches are drawn; an accounted step may have q = 0 (`allow_zero`)."""
    if not (0 <= sample_rate <= 1 if allow_zero else 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in {'[0, 1]' if allow_zero else '(0, 1]'}, got {sample_rate}")


def _check_run(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    check_noise_multiplier(noise_multiplier)
    check_sample_rate(sample_rate, allow_zero=True)
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")


@dataclass(frozen=True)
class Run:
    """`count` consecutive steps with the same noise multiplier σ and sample rate q."""

    noise_multiplier: float
    sample_rate: float
    count: int
    truncation: float = 0.0  # per step: the probability that truncated Poisson sampling cut the batch

    def event(self):
        """`SelfComposed(PoissonSampled(q, Gaussian(σ)), count)`; σ = 0 is no privacy at all."""
        import dp_accounting

        if self.sample_rate == 0 or self.count == 0:
            return dp_accounting.NoOpDpEvent()
        if self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        step = dp_accounting.PoissonSampledDpEvent(self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier))
        return dp_accounting.SelfComposedDpEvent(step, self.count)


def truncation_probability(num_samples: int, sample_rate: float, max_batch_size: int) -> float:
    """`P[Binomial(num_samples, q) > max_batch_size]`: the probability that a Poisson batch is cut."""
    from scipy.stats import binom

    return float(binom.sf(max_batch_size, num_samples, sample_rate))


def _epsilon_of(runs: list[Run], delta: float, accountant: str) -> float:
    """ε at δ of the runs. Truncated Poisson sampling (`Run.truncation` = p per step, P = Σ steps·p):
    the truncated mechanism M' equals the untruncated M except on the event that some batch was
    cut, of probability at most P for either neighbouring dataset (p is that of the larger one), so
    `P[M'(D) ∈ S] ≤ P[M(D) ∈ S] + P ≤ e^ε P[M(D') ∈ S] + δ_M + P ≤ e^ε P[M'(D') ∈ S] + δ_M + (1 + e^ε) P`:
    M' is (ε, δ)-DP when M is (ε, δ − (1 + e^ε) P)-DP (a coupling argument: M and M' run on the same
    draws differ in total variation by at most P; the truncation probability is added to δ, counted
    on both sides of the inequality, hence 1 + e^ε). Solved for the smallest such ε by iteration
    (each round raises ε, and stops once the untruncated mechanism meets the δ left)."""
    _check_method(accountant)
    _check_delta(delta)
    tail = sum(r.count * r.truncation for r in runs)
    engine = _composed(runs, accountant)
    epsilon = float(engine.get_epsilon(delta))  # the answer without truncation: a lower bound; each round raises it
    if tail == 0:
        return epsilon
    for _ in range(100):
        rest = delta - (1 + math.exp(min(epsilon, 700))) * tail
        if rest <= 0:
            return math.inf
        needed = float(engine.get_epsilon(rest))
        if needed <= epsilon:
            return epsilon
        epsilon = needed * (1 + 1e-12) + 1e-15
    return math.inf


def _mechanism_epsilon(runs: list[Run], delta: float, accountant: str) -> float:
    """ε at δ of the runs' sampled Gaussians, truncation left out."""
    return float(_composed(runs, accountant).get_epsilon(delta))


def _composed(runs: list[Run], accountant: str):
    """A dp_accounting engine that has composed the runs (ε at any δ without composing again)."""
    import dp_accounting  # imported on first use: it pulls in scipy.signal, about 2 s
    from dp_accounting import pld, rdp

    engine = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    engine.compose(dp_accounting.ComposedDpEvent([r.event() for r in runs]))
    return engine


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε of `steps` steps of the Poisson subsampled Gaussian (σ = noise_multiplier, q = sample_rate) at δ.

    `inf` when σ = 0 and there is at least one step; 0 when there are no steps or q = 0.
    """
    _check_run(noise_multiplier, sample_rate, steps)
    return _epsilon_of([Run(float(noise_multiplier), float(sample_rate), int(steps))], delta, accountant)


@contextlib.contextmanager
def _quiet_absl():
    # The search visits small σ where dp_accounting drops orders whose series does not
    # converge and logs a warning for each; dropping an order only raises ε, so the answer stays valid.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def noise_multiplier_for(
    target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp",
    precision: float = 1e-3,
) -> float:
    """The smallest noise multiplier σ with `epsilon(σ, q, steps, δ) ≤ target_epsilon`, by
    `dp_accounting.calibrate_dp_mechanism` (Brent's method on ε(σ) − target_epsilon, which
    decreases as σ grows, with a final step to the side where ε ≤ target).

    The returned σ reaches the target (ε(σ) ≤ target_epsilon) and exceeds the exact smallest
    such σ* by at most `precision`: σ* ≤ σ ≤ σ* + precision. RDP searches from [0, 1] upwards
    (ε(0) = ∞). PLD searches between the RDP answer, which reaches the target (PLD's ε is the
    smaller, so its σ* too), and a σ below it that does not, found by steps of × 0.8: PLD is slow
    at small σ, and the bracket keeps it away from them.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    if not precision > 0:
        raise ValueError(f"precision must be positive, got {precision}")
    _check_run(0.0, sample_rate, steps)
    _check_method(accountant)
    _check_delta(delta)
    if steps == 0 or sample_rate == 0:
        return 0.0  # nothing is released, any σ will do
    import dp_accounting
    from dp_accounting import pld, rdp
    from dp_accounting.mechanism_calibration import NoBracketIntervalFoundError

    def event(sigma: float):
        return Run(float(sigma), float(sample_rate), int(steps)).event()

    if accountant == "rdp":
        engine, bracket = rdp.RdpAccountant, dp_accounting.LowerEndpointAndGuess(0.0, 1.0)
    else:
        hi = noise_multiplier_for(target_epsilon, sample_rate, steps, delta, "rdp", precision)
        lo = 0.8 * hi
        with _quiet_absl():
            while epsilon(lo, sample_rate, steps, delta, "pld") <= target_epsilon:
                hi, lo = lo, 0.8 * lo
        engine, bracket = pld.PLDAccountant, dp_accounting.ExplicitBracketInterval(lo, hi)
    try:
        with _quiet_absl():
            sigma = dp_accounting.calibrate_dp_mechanism(engine, event, target_epsilon, delta, bracket, tol=precision)
    except NoBracketIntervalFoundError:
        raise ValueError(
            f"no noise multiplier up to 2^30 reaches epsilon {target_epsilon} at delta {delta} "
            f"with sample rate {sample_rate} and {steps} steps"
        ) from None
    return float(sigma)


class Accountant:
    """The privacy spent so far by a training run, step by step.

    `step(noise_multiplier=σ, sample_rate=q)` records one step; consecutive steps with
    the same (σ, q) are kept as one `Run(σ, q, count)`, so the history stays short.
    `epsilon(δ)` composes the whole history with the chosen method ("rdp" or "pld").
    """

    def __init__(self, method: str = "rdp"):
        _check_method(method)
        self.method = method
        self.history: list[Run] = []
        self.notes: dict = {}  # what else was accounted, for `privacy_report` (adaptive clipping, the unit, ...)

    def note(self, key: str, value) -> None:
        """Record a fact about the mechanism (a dict of numbers and strings) for `privacy_report`."""
        self.notes[key] = value

    def step(self, *, noise_multiplier: float, sample_rate: float, count: int = 1,
             truncation_probability: float = 0.0) -> None:
        """Record `count` steps; `truncation_probability`: truncated Poisson sampling's per-step
        probability of a cut batch (`bkfx.training.data.PoissonSampler.truncation_probability`), added to δ."""
        _check_run(noise_multiplier, sample_rate, count)
        if not 0 <= truncation_probability <= 1:
            raise ValueError(f"truncation_probability must be in [0, 1], got {truncation_probability}")
        last = self.history[-1] if self.history else None
        if last is not None and (last.noise_multiplier, last.sample_rate, last.truncation) == \
                (noise_multiplier, sample_rate, truncation_probability):
            self.history[-1] = Run(last.noise_multiplier, last.sample_rate, last.count + count, last.truncation)
        else:
            self.history.append(Run(float(noise_multiplier), float(sample_rate), int(count), float(truncation_probability)))

    @property
    def steps(self) -> int:
        return sum(r.count for r in self.history)

    def epsilon(self, delta: float) -> float:
        """ε at δ of all the steps recorded so far (0 before the first)."""
        return _epsilon_of(self.history, delta, self.method)

    def state_dict(self) -> dict:
        state = {"method": self.method, "history": [(r.noise_multiplier, r.sample_rate, r.count) + ((r.truncation,) if r.truncation else ())
                                                    for r in self.history]}
        if self.notes:
            state["notes"] = {k: dict(v) if isinstance(v, dict) else v for k, v in self.notes.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        _check_method(state["method"])
        self.method = state["method"]
        self.history = [Run(float(s), float(q), int(n), *(float(t) for t in rest)) for s, q, n, *rest in state["history"]]
        self.notes = dict(state.get("notes", {}))

    def __repr__(self) -> str:
        runs = ", ".join(f"(σ={r.noise_multiplier:g}, q={r.sample_rate:g}) x {r.count}" for r in self.history)
        return f"Accountant({self.method!r}, [{runs}])"

