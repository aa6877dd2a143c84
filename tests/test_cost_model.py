"""The cost model's decisions: the fastest mode by estimated seconds on the device, explicit only
within the memory budget (up to a batch size), a run-time guard when a dynamic size decides."""
from __future__ import annotations

import sympy
import torch
from torch import nn

import bkfx
from bkfx.rules.factors import Dense, Factored
from bkfx._ir.layout import SampleLayout
from bkfx._runtime.ledger import Record
from bkfx._ir.meta import META_BUDGET
from bkfx._ir.plan import Budget, Operand, Site
from bkfx.rules import factored_spec, lookup
from passes.cost_model import DEVICES, _decide, _fit, mode_times

B, T = sympy.symbols("B T", positive=True, integer=True)
CPU, GPU = DEVICES["cpu"], DEVICES["cuda"]


def _site(spec, sid=0) -> Site:
    operand = Operand((1,), (f"w{sid}",), "identity", spec=spec, rule=lookup("linear"))
    return Site(sid, f"linear{sid}", None, None, "", [operand], {}, SampleLayout(0))


def _budget(total, costs=GPU, activations=0) -> Budget:
    return Budget("test", costs, "float32", int(total), "test", activations, 0)


def _per_sample_seconds(T_, m, n, costs, dtype=torch.float32):
    """The module docstring's formulas, written out once more, per sample."""
    F = costs.macs_per_s * (costs.low_precision_speedup if dtype != torch.float32 else 1)
    traffic = 3 * dtype.itemsize / costs.bytes_per_s
    ghost = T_**2 * (m + n + 1) / (F * costs.gram_efficiency) + traffic * 2 * T_**2
    explicit = 2 * m * n / F + costs.rows_half * m * n / F + traffic * m * n
    return ghost, explicit


def test_estimated_seconds_follow_the_documented_formulas():
    spec = factored_spec(512, 768, 768, B)
    for costs in (CPU, GPU):
        for dtype in (torch.float32, torch.bfloat16):
            ghost, explicit = mode_times(spec, lookup("linear"), B, costs, dtype)
            want_g, want_e = _per_sample_seconds(512, 768, 768, costs, dtype)
            assert abs(float(ghost / B) - want_g) < 1e-12 * want_g and abs(float(explicit / B) - want_e) < 1e-12 * want_e


def test_gpt2_small_at_512_positions_is_explicit_on_a_gpu_and_short_sequences_are_ghost():
    # GPT-2 124M's q/k/v projection (p 2304, d 768) at T = 512: explicit per-sample gradients are
    # faster on a GPU (the profile of shared/GPU.md); at T = 1 (an MLP) ghost costs nothing
    site = _site(factored_spec(512, 2304, 768, B))
    assert _decide(site, B, "auto", GPU, torch.float32) is True  # a candidate for explicit
    _fit([site], B, _budget(80e9))
    assert site.mode == "explicit" and site.reason == "fastest within budget"
    for costs in (CPU, GPU):
        site = _site(factored_spec(1, 1024, 1024, B))
        assert _decide(site, B, "auto", costs, torch.float32) is False
        assert (site.mode, site.reason) == ("ghost", "ghost is faster")


def test_cpu_choices_match_the_cpu_benchmarks():
    # measured on the CPU (benchmarks/results): ghost for GPT-2 4x256's and the ViT's wide linear
    # layers, explicit for the CNN's convolutions over many positions
    for T_, m, n, mode in [(128, 768, 256, "ghost"), (128, 1024, 256, "ghost"), (128, 8192, 256, "ghost"),
                           (65, 256, 256, "ghost"), (1024, 32, 27, "explicit"), (256, 64, 288, "explicit")]:
        site = _site(factored_spec(T_, m, n, B))
        if _decide(site, B, "auto", CPU, torch.float32):
            _fit([site], B, _budget(16e9, CPU))
        assert site.mode == mode, (T_, m, n)


def test_explicit_sites_fill_the_budget_greedily_by_seconds_saved_per_byte():
    big = _site(factored_spec(512, 4096, 1024, B), 0)  # saves most, but per byte less
    small = _site(factored_spec(512, 768, 768, B), 1)
    for s in (big, small):
        assert _decide(s, B, "auto", GPU, torch.float32)
    per_sample = {s.id: float(s.bytes_explicit / B) for s in (big, small)}
    assert per_sample == {0: 4096 * 1024 * 4, 1: 768 * 768 * 4}
    activations = 10_000_000
    total = 16 * (activations + per_sample[1]) + 1000  # room for the small one only, at B = 16
    _fit([big, small], B, _budget(total, activations=activations))
    assert small.explicit_up_to == total // (activations + per_sample[1]) == 16
    assert big.explicit_up_to == total // (activations + per_sample[1] + per_sample[0]) < 16
    assert (small.mode, small.reason) == ("explicit", "fastest within budget")
    # the batch limit is what the runtime applies: explicit at B <= explicit_up_to, ghost above
    assert small.ghost_at(16) is False and small.ghost_at(17) is True
    assert big.ghost_at(big.explicit_up_to) is False and big.ghost_at(big.explicit_up_to + 1) is True
    _fit([big], B, _budget(activations - 1, activations=activations))  # not even one sample fits
    assert (big.mode, big.reason, big.explicit_up_to) == ("ghost", "explicit would exceed budget", 0)


def test_user_overrides_win_globally_and_per_parameter():
    site = _site(factored_spec(1, 256, 512, B))
    assert _decide(site, B, "explicit", CPU, torch.float32) is False
    assert site.mode == "explicit" and site.reason == "user override" and site.ghost_at(10**6) is False
    site = _site(factored_spec(512, 2304, 768, B))
    _decide(site, B, {"w0": "ghost"}, GPU, torch.float32)
    assert site.mode == "ghost" and site.ghost_at(1) is True


def test_a_decision_that_depends_on_a_dynamic_size_becomes_a_guard_evaluated_at_run_time():
    site = _site(factored_spec(T, 64, 64, B))
    _decide(site, B, "auto", CPU, torch.float32)
    assert site.mode == "guard" and site.guard.free_symbols == {T}
    # where ghost and explicit cost the same, from the formulas: ghost iff T <= T*
    crossing = max(t for t in range(1, 200) if (lambda g, e: g <= e)(*_per_sample_seconds(t, 64, 64, CPU)))
    record = Record.__new__(Record)
    record.site, record.tape = site, type("Tape", (), {"batch": 2})()

    def piece(t):
        return Factored(Dense(torch.zeros(2, t, 64)), Dense(torch.zeros(2, t, 64)))

    assert record._ghost([piece(crossing)]) is True
    assert record._ghost([piece(crossing + 1)]) is False
    assert (site.guard.subs(T, crossing) >= 0) and not (site.guard.subs(T, crossing + 1) >= 0)


def test_memory_budget_option_reaches_the_plan_and_both_modes_stay_exact():
    from bkfx.testing import assert_matches_reference

    # a convolution over many positions with few channels: explicit is faster (a candidate)
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 62, 3)).double()
    x, y = torch.randn(8, 3, 64, dtype=torch.float64), torch.randint(0, 3, (8,))
    loss_fn = nn.functional.cross_entropy
    roomy, _ = assert_matches_reference(model, loss_fn, x, y)
    budget = roomy.graph_module.meta[META_BUDGET]
    assert budget.total > 0 and budget.source.startswith("50% of") and budget.activation_bytes > 0
    conv = next(s for s in roomy.sites if s.node.startswith("conv"))
    assert (conv.mode, conv.reason) == ("explicit", "fastest within budget") and not conv.ghost_at(8)
    tight, _ = assert_matches_reference(model, loss_fn, x, y, memory_budget=1)
    assert tight.graph_module.meta[META_BUDGET].total == 1
    conv = next(s for s in tight.sites if s.node.startswith("conv"))
    assert (conv.mode, conv.reason, conv.explicit_up_to) == ("ghost", "explicit would exceed budget", 0)
    assert conv.ghost_at(8)
    for bad in (0, -5, "1GB", True):
        try:
            bkfx.compile(model, memory_budget=bad)
        except ValueError:
            continue
        raise AssertionError(f"memory_budget={bad!r} accepted")
