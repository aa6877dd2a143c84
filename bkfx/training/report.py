"""`bkfx.privacy_report`: the privacy a training run spent, by both accountants, side by side.

    print(bkfx.privacy_report(accountant, delta=1e-5))

    privacy spent (Poisson subsampled Gaussian, add/remove one example)
      steps            150
      sample rate q    0.19
      noise σ          1.09
      δ                1e-05
      ε (RDP)          2.981
      ε (PLD)          2.512

RDP (Rényi DP, converted to (ε, δ)) is the classical bound; PLD (privacy loss distribution)
composes numerically and is tighter. Both bound the same run; report the one the noise was
calibrated with, or the smaller (PLD) when the analysis allows it. See `bkfx.training.accounting`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bkfx.training.accounting import METHODS, Accountant, _quiet_absl

__all__ = ["PrivacyReport", "privacy_report"]


@dataclass(frozen=True)
class PrivacyReport:
    """ε at δ of a run by RDP and by PLD, with the run's σ, q and number of steps.

    `runs` lists `(σ, q, steps)` for each stretch of steps with the same σ and q; `noise_multiplier`
    and `sample_rate` are those of the run when there is one stretch, else None (see `runs`).
    """

    delta: float
    epsilon_rdp: float
    epsilon_pld: float
    steps: int
    noise_multiplier: float | None
    sample_rate: float | None
    runs: tuple[tuple[float, float, int], ...]
    notes: dict = field(default_factory=dict)  # what else was accounted (`Accountant.notes`): see `accounted`

    @property
    def unit(self) -> str:
        """What one neighbouring dataset adds or removes: "example", or "user" (user-level sampling)."""
        return self.notes.get("unit", {}).get("name", "example")

    @property
    def accounted(self) -> list[tuple[str, str]]:
        """`(what, how)` rows for each part of the mechanism beyond the plain sampled Gaussian."""
        rows = []
        adaptive = self.notes.get("adaptive_clipping")
        if adaptive is not None:
            z, s = adaptive["gradient_noise_multiplier"], adaptive["count_noise_multiplier"]
            rows.append(("adaptive clipping", f"gradient z_Δ {z:.4g} + count σ_b {s:.4g} (target quantile "
                         f"{adaptive['target_unclipped_quantile']:g}, {adaptive['groups']} group(s)) charged as one "
                         "Gaussian z = (z_Δ⁻² + (2σ_b)⁻²)^(-1/2) (Andrew et al. 2021, Thm. 1)"))
        unit = self.notes.get("unit")
        if unit is not None and unit.get("name") == "user":
            rows.append(("unit", f"one user (at most {unit['examples_per_user']} examples each, their gradients summed, "
                         "then clipped); q is the rate users are sampled at"))
        truncation = self.notes.get("truncation")
        if truncation is not None:
            rows.append(("truncation", f"batches cut at max_batch_size with probability ≤ {truncation['per_step']:.3g} a step, "
                         f"{truncation['probability']:.3g} over the run, added to δ as (1 + e^ε)·{truncation['probability']:.3g} "
                         "(the truncated mechanism differs from Poisson sampling only when a batch is cut)"))
        return rows

    def epsilon(self, accountant: str) -> float:
        """ε by `accountant` ("rdp" or "pld")."""
        if accountant not in METHODS:
            raise ValueError(f"accountant must be one of {METHODS}, got {accountant!r}")
        return self.epsilon_rdp if accountant == "rdp" else self.epsilon_pld

    def __str__(self) -> str:
        rows = [("steps", f"{self.steps}")]
        if len(self.runs) <= 1:
            rows += [("sample rate q", _num(self.sample_rate)), ("noise σ", _num(self.noise_multiplier))]
        else:
            rows += [(f"run {k}: σ, q, steps", f"{_num(s)}, {_num(q)}, {n}") for k, (s, q, n) in enumerate(self.runs)]
        rows += [("δ", f"{self.delta:g}"), ("ε (RDP)", f"{self.epsilon_rdp:.4g}"), ("ε (PLD)", f"{self.epsilon_pld:.4g}")]
        rows += self.accounted
        width = max(len(name) for name, _ in rows)
        lines = [f"privacy spent (Poisson subsampled Gaussian, add/remove one {self.unit})"]
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def privacy_report(accountant: Accountant | None = None, *, delta: float, noise_multiplier: float | None = None,
                   sample_rate: float | None = None, steps: int | None = None) -> PrivacyReport:
    """The privacy spent by `accountant`'s history (or by `steps` steps at σ = noise_multiplier,
    q = sample_rate), as ε at `delta` by both RDP and PLD."""
    given = (noise_multiplier, sample_rate, steps)
    if accountant is None:
        if any(v is None for v in given):
            raise ValueError("pass an Accountant, or noise_multiplier=, sample_rate= and steps=")
        accountant = Accountant("rdp")
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, count=steps)
    elif any(v is not None for v in given):
        raise ValueError("pass either an Accountant or noise_multiplier=, sample_rate= and steps=, not both")
    state = accountant.state_dict()
    epsilons = {}
    with _quiet_absl():  # RDP orders whose series does not converge are dropped, which only raises ε
        for method in METHODS:
            other = Accountant(method)
            other.load_state_dict({**state, "method": method})
            epsilons[method] = other.epsilon(delta)
    runs = tuple((float(s), float(q), int(n)) for s, q, n, *_ in state["history"] if n > 0)
    tail = sum(int(n) * float(rest[0]) for _, _, n, *rest in state["history"] if rest)
    notes = dict(state.get("notes", {}))
    if tail:
        notes["truncation"] = {"probability": tail, "per_step": max(float(h[3]) for h in state["history"] if len(h) > 3)}
    one = runs[0] if len(runs) == 1 else None
    return PrivacyReport(
        delta=float(delta), epsilon_rdp=epsilons["rdp"], epsilon_pld=epsilons["pld"],
        steps=sum(n for _, _, n in runs), noise_multiplier=one[0] if one else None,
        sample_rate=one[1] if one else None, runs=runs, notes=notes,
    )
