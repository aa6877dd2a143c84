"""The compiler's plan: parametric sites, their parameter operands, costs and modes.

`annotate` creates a `Site` for every node where a trainable parameter meets a
sample-dependent tensor; `cost_model` fills in the mode; `rewrite` turns the node into a
call of `bkfx.ops.site` carrying the site's id; the runtime reads the plan back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import sympy

from bkfx.layout import SampleLayout

Path = tuple  # where an operand sits in node.args: (i,) or (i, k) for a list argument


def get_path(args, path: Path):
    for i in path:
        args = args[i]
    return args


def set_path(args, path: Path, value):
    """A copy of the nested tuple/list `args` with `value` at `path`."""
    args = list(args)
    if len(path) == 1:
        args[path[0]] = value
    else:
        args[path[0]] = type(args[path[0]])(set_path(args[path[0]], path[1:], value))
    return tuple(args)


@dataclass
class PieceSpec:
    """What a rule contributes for one parameter operand, as sympy expressions in B."""

    kind: str  # "factored" (ghost or explicit) or "explicit"
    T: sympy.Expr = sympy.Integer(1)
    m: sympy.Expr = sympy.Integer(1)
    n: sympy.Expr = sympy.Integer(1)
    time_ghost: sympy.Expr | None = None
    mem_ghost: sympy.Expr | None = None
    time_explicit: sympy.Expr | None = None
    mem_explicit: sympy.Expr | None = None


@dataclass
class Operand:
    """A parameter-derived argument of a site and how it is made from parameters."""

    path: Path
    params: tuple[str, ...]  # the trainable parameters it is computed from
    chain: str  # "identity" | "transpose" | "general"
    chain_fn: Callable | None = None  # general: fn(*leaves) -> operand value
    chain_leaves: tuple = ()  # general: names of the leaf nodes (params, buffers, constants)
    chain_params: tuple[int, ...] = ()  # general: which leaves are the trainable parameters
    spec: PieceSpec | None = None
    rule: Any = None  # the rule that supplies its piece (bkfx.rules.fallback.Fallback if none knows the op)


@dataclass
class Site:
    id: int
    node: str
    op: Any
    source: str | None
    module: str
    operands: list[Operand]
    layouts: dict[Path, SampleLayout]  # sample-dependent arguments' layouts
    out_layout: SampleLayout
    mode: str = "ghost"  # "ghost" | "explicit" | "guard" (decided at run time) | "fallback"
    reason: str = ""
    guard: sympy.Expr | None = None  # ghost iff guard >= 0, in the run's sizes

    @property
    def params(self) -> list[str]:
        return sorted({p for o in self.operands for p in o.params})
