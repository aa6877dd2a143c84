"""Adaptive clipping: the threshold R follows a quantile of the per-sample norms, privately.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping"
(NeurIPS 2021). Each step counts the samples whose gradient norm is at most the threshold the
step clipped at, noises the count, and moves R geometrically towards the target quantile γ:

    b̄ = (Σ_i (1[‖G_i‖ ≤ R] − ½) + N(0, σ_b²)) / m  +  ½        (m: the expected batch size)
    R ← R · exp(−η (b̄ − γ))

Each sample's term is shifted by −½ (as TF Privacy's `QuantileAdaptiveClipSumQuery`): adding or
removing one sample then changes the noised sum by ½, whatever its norm, so the count is a
Gaussian mechanism of noise multiplier 2σ_b, and its value does not depend on the batch's actual
size (Poisson sampling keeps that private; m is a constant). With a fixed batch of exactly m
samples and σ_b = 0, b̄ is the fraction of unclipped samples.

Privacy (Andrew et al., Theorem 1): the clipped sum with noise multiplier z_Δ and the count with
noise multiplier 2σ_b, released together, are one Gaussian mechanism with noise multiplier

    z = (z_Δ⁻² + (2σ_b)⁻²)^(−1/2)

(their joint L2 sensitivity is covered by stacking both noised vectors, each scaled to unit
sensitivity). The accountant charges each step at z; `gradient_noise_multiplier(z, σ_b)` is the
z_Δ that makes a target z (it needs 2σ_b > z). The paper suggests σ_b = m/20.

Group-wise styles keep one R per group and count each group against its own R: the G counts
form one vector query of L2 sensitivity √G/2, so each gets noise of standard deviation σ_b√G,
which keeps the vector's noise multiplier at 2σ_b and Theorem 1 unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["AdaptiveClipping", "combined_noise_multiplier", "gradient_noise_multiplier", "UnclippedCount",
    "updated_thresholds"]


@dataclass(frozen=True, kw_only=True)
class AdaptiveClipping:
    """What `DPOptimizer(adaptive_clipping=...)` (and `make_private`, `PrivacyArguments`) take.

    target_unclipped_quantile: γ, the fraction of samples R should leave unclipped.
    learning_rate: η of the geometric update `R ← R exp(−η(b̄ − γ))`.
    count_noise_multiplier: σ_b, the standard deviation of the count's noise (0 only without
        gradient noise either: a test, no privacy).
    initial: the first R (a number, or one per clipping group); None keeps the compiled model's.
    """

    count_noise_multiplier: float
    target_unclipped_quantile: float = 0.5
    learning_rate: float = 0.2
    initial: float | list | None = None

    def __post_init__(self):
        if not 0 < self.target_unclipped_quantile < 1:
            raise ValueError(f"target_unclipped_quantile must be in (0, 1), got {self.target_unclipped_quantile!r}")
        if not (_number(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate!r}")
        if not (_number(self.count_noise_multiplier) and self.count_noise_multiplier >= 0):
            raise ValueError(f"count_noise_multiplier must be finite and >= 0, got {self.count_noise_multiplier!r}")
        if self.initial is not None:
            values = self.initial if isinstance(self.initial, (list, tuple)) else [self.initial]
            if not values or not all(_number(r) and r > 0 for r in values):
                raise ValueError(f"initial must be a number > 0 or a list of them (one per group), got {self.initial!r}")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def combined_noise_multiplier(gradient_noise_multiplier: float, count_noise_multiplier: float) -> float:
    """`z = (z_Δ⁻² + (2σ_b)⁻²)^(−1/2)`: the one Gaussian mechanism the clipped sum (z_Δ) and the
    count (σ_b) make together (Andrew et al., Theorem 1); 0 when either is 0 (no privacy)."""
    if gradient_noise_multiplier == 0 or count_noise_multiplier == 0:
        return 0.0
    return (gradient_noise_multiplier ** -2 + (2 * count_noise_multiplier) ** -2) ** -0.5


def gradient_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """z_Δ with `combined_noise_multiplier(z_Δ, σ_b) = z`: `z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`, which
    exists only when 2σ_b > z (the count alone must leave room for the gradient's noise)."""
    if noise_multiplier == 0:
        return 0.0
    if not 2 * count_noise_multiplier > noise_multiplier:
        raise ValueError(
            f"adaptive clipping with count_noise_multiplier σ_b = {count_noise_multiplier:g} cannot reach the noise "
            f"multiplier z = {noise_multiplier:g} the privacy target needs: the count's noise alone spends the budget "
            f"of a multiplier 2σ_b = {2 * count_noise_multiplier:g}, which must exceed z. Raise count_noise_multiplier "
            "(Andrew et al. suggest expected_batch_size / 20)"
        )
    return (noise_multiplier ** -2 - (2 * count_noise_multiplier) ** -2) ** -0.5


class UnclippedCount:
    """The running count `Σ_i (1[‖G_{i,g}‖ ≤ R_g] − ½)` of each clipping group g over the backward
    passes of one logical batch; the DP model adds to it after each backward, the optimizer reads
    and resets it at step. Kept as a tensor on the norms' device (no host sync per backward).
    `mask` (padding rows: False) leaves rows out of the count."""

    def __init__(self, groups: int):
        self.groups = groups
        self.total: torch.Tensor | None = None

    def add(self, group_norms, thresholds: list[float], batch: int, mask: torch.Tensor | None = None) -> None:
        rows = []
        for g in range(self.groups):
            norms = group_norms[g] if group_norms is not None else None
            if norms is None:  # the group's parameters got no gradient: every norm is 0, unclipped
                rows.append(0.5 * (torch.tensor(float(batch), dtype=torch.float64) if mask is None
                                   else mask.to(torch.float64).sum()))
                continue
            under = (norms <= thresholds[g]).to(torch.float64) - 0.5
            if mask is not None:
                under = under * mask.to(under.device, torch.float64)
            rows.append(under.sum())
        device = next((r.device for r in rows if r.device.type != "cpu"), torch.device("cpu"))
        counts = torch.stack([r.to(device) for r in rows])
        self.total = counts if self.total is None else self.total + counts.to(self.total.device)

    def take(self, device=None) -> torch.Tensor:
        """The counts so far (`[G]`, float64; zeros when no backward ran), and a fresh start."""
        total, self.total = self.total, None
        if total is None:
            total = torch.zeros(self.groups, dtype=torch.float64)
        return total if device is None else total.to(device)


def updated_thresholds(thresholds: list[float], noisy_counts: list[float], expected_batch_size: float,
                       config: AdaptiveClipping) -> list[float]:
    """`R_g exp(−η (b̄_g − γ))` with `b̄_g = noisy_count_g / m + ½` for each group g."""
    gamma, eta = config.target_unclipped_quantile, config.learning_rate
    return [r * math.exp(-eta * (c / expected_batch_size + 0.5 - gamma)) for r, c in zip(thresholds, noisy_counts)]
