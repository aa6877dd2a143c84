"""`noise_multiplier_for` calibrates σ with dp_accounting's `calibrate_dp_mechanism`: the σ it
returns reaches the target ε by the accountant's own ε, is the smallest to within `precision`, and
agrees with the bisection it replaced (whose answers, at commit 7626baa, are written below)."""
from __future__ import annotations

import pytest

from bkfx.training.accounting import _quiet_absl, epsilon, noise_multiplier_for

DELTA = 1e-5

# (q, steps, target ε) -> σ of the former bisection (precision 1e-3: within [σ*, σ* + 1e-3])
BISECTION = {
    (64 / 1347, 630, 1.0): 4.951171875,
    (0.01, 3000, 3.0): 1.0869140625,
    (1.0, 1, 0.5): 7.66796875,
    (1.0, 10, 100.0): 0.30859375,
}


@pytest.mark.parametrize("q, steps, target", list(BISECTION))
def test_calibrated_sigma_reaches_the_target_and_agrees_with_the_bisection(q, steps, target):
    precision = 1e-3
    sigma = noise_multiplier_for(target, q, steps, DELTA, "rdp", precision)
    with _quiet_absl():
        spent, below = epsilon(sigma, q, steps, DELTA), epsilon(sigma - precision, q, steps, DELTA)
    assert spent <= target < below  # reaches the target, and σ − precision does not: σ* ≤ σ ≤ σ* + precision
    assert spent >= 0.99 * target  # and spends nearly all of it
    # both answers lie in [σ*, σ* + precision]
    assert abs(sigma - BISECTION[q, steps, target]) <= precision


def test_precision_is_the_tolerance_of_the_search():
    coarse = noise_multiplier_for(3.0, 0.01, 3000, DELTA, precision=0.1)
    fine = noise_multiplier_for(3.0, 0.01, 3000, DELTA, precision=1e-6)
    assert fine <= coarse <= fine + 0.1
    with _quiet_absl():
        assert epsilon(fine, 0.01, 3000, DELTA) <= 3.0 < epsilon(fine - 1e-6, 0.01, 3000, DELTA)
