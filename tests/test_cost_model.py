"""The cost model's decisions: static when B divides out, a run-time guard otherwise."""
from __future__ import annotations

import sympy
import torch

from bkfx.factors import Dense, Factored
from bkfx.layout import SampleLayout
from bkfx.ledger import Record
from bkfx.plan import Operand, Site
from bkfx.rules import factored_spec
from passes.cost_model import _decide

B, T = sympy.symbols("B T", positive=True, integer=True)


def _site(spec) -> Site:
    operand = Operand((1,), ("w",), "identity", spec=spec, rule=None)
    return Site(0, "linear", None, None, "", [operand], {}, SampleLayout(0))


def test_ghost_iff_ghost_memory_is_at_most_explicit_memory():
    # T = 1 (an MLP): 2B vs B m n -> ghost
    site = _site(factored_spec(1, 256, 512, B))
    _decide(site, B, "auto")
    assert site.mode == "ghost" and "<=" in site.reason
    # long sequences on a small layer: 2 B T^2 > B m n -> explicit
    site = _site(factored_spec(512, 16, 16, B))
    _decide(site, B, "auto")
    assert site.mode == "explicit" and ">" in site.reason


def test_fastdp_boundary_is_reproduced():
    # ghost iff 2 T^2 <= p d
    for T_, p, d in [(64, 128, 128), (90, 128, 128), (91, 128, 128), (8, 4, 32), (9, 4, 32)]:
        site = _site(factored_spec(T_, p, d, B))
        _decide(site, B, "auto")
        assert site.mode == ("ghost" if 2 * T_**2 <= p * d else "explicit")


def test_user_overrides_win_globally_and_per_parameter():
    site = _site(factored_spec(1, 256, 512, B))
    _decide(site, B, "explicit")
    assert site.mode == "explicit" and site.reason == "user override"
    site = _site(factored_spec(1, 256, 512, B))
    _decide(site, B, {"w": "explicit"})
    assert site.mode == "explicit"


def test_a_decision_that_depends_on_a_dynamic_size_becomes_a_guard_evaluated_at_run_time():
    site = _site(factored_spec(T, 64, 64, B))
    _decide(site, B, "auto")
    assert site.mode == "guard" and site.guard.free_symbols == {T}
    record = Record.__new__(Record)
    record.site = site
    short = Factored(Dense(torch.zeros(2, 45, 64)), Dense(torch.zeros(2, 45, 64)))
    long = Factored(Dense(torch.zeros(2, 46, 64)), Dense(torch.zeros(2, 46, 64)))
    assert record._ghost([short]) is True  # 2T² <= 64·64
    assert record._ghost([long]) is False
    # the guard agrees with the symbolic margin at those sizes
    assert (site.guard.subs(T, 45) >= 0) and not (site.guard.subs(T, 46) >= 0)
