"""The rule registry: every module under bkfx/rules registers its rules when the package loads."""
from __future__ import annotations

import importlib
import pkgutil

import bkfx.rules
from bkfx.rules import FALLBACK, lookup, registered


def test_every_rule_module_registers_a_rule():
    registering = {r.spec.__module__ for r in registered().values()}
    modules = {f"bkfx.rules.{m.name}" for m in pkgutil.iter_modules(bkfx.rules.__path__)}
    assert modules - registering == {FALLBACK.spec.__module__}


def test_rule_classes_are_registered():
    # a class with spec and piece in a rule module but without @rule would silently leave its op to the fallback
    rules = {(r.spec.__module__, r.name) for r in registered().values()} | {(FALLBACK.spec.__module__, FALLBACK.name)}
    for m in pkgutil.iter_modules(bkfx.rules.__path__):
        module = importlib.import_module(f"bkfx.rules.{m.name}")
        for name, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == module.__name__ and hasattr(value, "piece"):
                assert (module.__name__, name) in rules, f"{module.__name__}.{name} has no @rule"


def test_fallback_is_not_looked_up_by_name():
    assert FALLBACK.fallback and not any(r.fallback for r in registered().values())
    assert lookup("Fallback") is None and lookup("no_such_op") is None
