"""The rule registry: every module under bkfx/rules registers its rules when the package loads."""
from __future__ import annotations

import importlib
import pkgutil

import pytest
import sympy

import bkfx.rules
import bkfx.rules.sample as sample
from bkfx.rules import FALLBACK, RuleClass, explicit_spec, factored_spec, lookup, registered
from bkfx.rules.sample import sample_rules


# modules of bkfx/rules that register no rule: the fallback and the code the rules share
SHARED = {"bkfx.rules.fallback", "bkfx.rules.factors", "bkfx.rules.precision", "bkfx.rules.registry",
          "bkfx.rules.sample"}


def test_every_rule_module_registers_a_rule():
    # a gradient rule or a sample rule: a family module may hold either kind, or both
    registering = {r.spec.__module__ for r in registered().values()} | {r.module for r in sample_rules().values()}
    modules = {f"bkfx.rules.{m.name}" for m in pkgutil.iter_modules(bkfx.rules.__path__)}
    assert FALLBACK.spec.__module__ in SHARED
    assert modules - registering == SHARED


def test_a_sample_rule_is_registered_once(monkeypatch):
    # two family modules claiming one op would leave the choice to the import order
    monkeypatch.setattr(sample, "_SAMPLE_RULES", dict(sample._SAMPLE_RULES))
    with pytest.raises(ValueError, match="transpose is registered twice"):
        sample.sample_rule("transpose")(lambda node: [])
    assert sample.find_sample_rule("transpose").module == "bkfx.rules.shape"


def test_rule_classes_are_registered():
    # a class with spec and piece in a rule module but without @rule would silently leave its op to the fallback
    rules = {(r.spec.__module__, r.name) for r in registered().values()} | {(FALLBACK.spec.__module__, FALLBACK.name)}
    for m in pkgutil.iter_modules(bkfx.rules.__path__):
        module = importlib.import_module(f"bkfx.rules.{m.name}")
        for name, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == module.__name__ and hasattr(value, "piece") \
                    and value is not RuleClass:  # the contract itself (a Protocol) lives in the registry
                assert (module.__name__, name) in rules, f"{module.__name__}.{name} has no @rule"


def test_fallback_is_not_looked_up_by_name():
    assert FALLBACK.fallback and not any(r.fallback for r in registered().values())
    assert lookup("Fallback") is None and lookup("no_such_op") is None


def test_registered_classes_meet_the_rule_contract():
    for m in pkgutil.iter_modules(bkfx.rules.__path__):
        module = importlib.import_module(f"bkfx.rules.{m.name}")
        for r in registered().values():
            if r.spec.__module__ == module.__name__:
                assert isinstance(getattr(module, r.name), RuleClass), f"{module.__name__}.{r.name}"


def test_nonprivate_cost_follows_the_one_hot_attribute_not_the_rule_name():
    B, T, m, n = sympy.symbols("B T m n", positive=True)
    spec = factored_spec(T, m, n, B)
    assert lookup("embedding").one_hot_left and not lookup("linear").one_hot_left
    assert lookup("embedding").nonprivate_time(spec, B) == B * T * n  # a scatter-add of T rows
    assert lookup("linear").nonprivate_time(spec, B) == B * T * m * n  # gᵀa
    assert lookup("linear").nonprivate_time(explicit_spec((m,), B), B) == B * m
