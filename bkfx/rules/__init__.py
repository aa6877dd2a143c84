"""Rules: per operation kind, the factors (or explicit per-sample gradients) and their costs.

The contract. A rule is a class of static functions registered with `@rule("op", ...)`
for the ATen ops it knows (names as `bkfx._ir.node.target_name` gives them: `aten.addmm.default`
is "addmm"). For a parameter operand of a site, at `path` in the op's arguments:

- `spec(node, path, batch) -> PieceSpec | None`, at capture: the operand's piece, factored
  (`factored_spec(T, m, n, batch)`) or explicit (`explicit_spec(shape, batch)`), with its
  cost expressions in the batch symbol; None when the rule does not handle this
  arrangement, and the fallback then does;
- `piece(call, path) -> Factored | Explicit`, at backward time, from the `SiteCall`
  (the op's arguments, the output gradient `g`, the sample layouts);
- `forward(op, args, kwargs) -> (output, saved)`, optional: runs the op in the forward pass
  keeping what `piece` reuses (it arrives as `call.saved`), e.g. normalisation statistics;
- `one_hot_left = True`, optional: the left factor is a gather (`OneHot`), so the standard
  weight gradient is a scatter-add and per-sample gradients need no per-sample matmul.

`RuleClass` states this contract as a `typing.Protocol`; `Rule` is what `@rule` registers.
Norms, tied parameters, clipping and the clipped sum are shared code (`bkfx.rules.factors`,
`bkfx._runtime.ledger`); no rule repeats them. The non-private cost of a piece (what the standard
weight gradient pays, `Rule.nonprivate_time`) follows from its spec and `one_hot_left`.

The fallback (`fallback.Fallback`, registered as `FALLBACK`, the one rule with
`Rule.fallback` set) takes every parametric op no rule knows or declines: explicit
per-sample gradients by `vmap` of `vjp`. It is never looked up by op name, and its spec
takes two more arguments, `spec(node, path, batch, layouts, out_layout)`, since it must
refuse merged sample dimensions and arguments that name the batch size.

Adding a rule for a new ATen op: see `README.md` in this folder (a worked example and the
tests to add). Every module of this package is imported when the package is, so there is no
list to add it to, and `tests/test_rule_registry.py` checks that each registers a rule.
"""
from __future__ import annotations

import importlib
import pkgutil

from bkfx.rules.factors import Explicit, Factored
from bkfx.rules.precision import accumulation_dtype
from bkfx.rules.registry import (Rule, RuleClass, SiteCall, explicit_spec, factored_spec, lookup, numel, one_hot_spec,
                                 registered, rows, rule, runner, sum_to)

__all__ = ["Explicit", "Factored", "accumulation_dtype", "SiteCall", "RuleClass", "Rule", "rule", "runner",
    "lookup", "registered", "rows", "sum_to", "numel", "factored_spec", "one_hot_spec", "explicit_spec",
    "Fallback", "FALLBACK"]

# ---- registration: every module of this package, so none can be left out ---------------------

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from bkfx.rules.fallback import Fallback

FALLBACK = Rule(Fallback.name, Fallback.spec, Fallback.piece, fallback=True)
