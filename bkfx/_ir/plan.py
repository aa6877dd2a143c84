"""The compiler's plan: parametric sites, their parameter operands, costs and modes.

`annotate` creates a `Site` for every node where a trainable parameter meets a
sample-dependent tensor; `cost_model` fills in the mode, who decided it and why; `rewrite`
turns the node into a call of `bkfx._runtime.ops.site` carrying the site's id; the runtime (the
ledger, through `Site.ghost_at`) and `explain` (through `Site.decision`) read the plan back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import sympy

from bkfx._ir.layout import SampleLayout

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
    rule: Any = None  # the rule that supplies its piece (bkfx.rules.FALLBACK if none knows the op)


# who decided a mode (`Site.decided_by`, `Decision.decided_by`)
EXPLICIT_RULE = "explicit rule"  # the rule's piece is explicit: no choice
FALLBACK = "fallback"  # no rule: explicit per-sample gradients by vmap of vjp
USER_OVERRIDE = "user override"  # norm_mode=
GUARD = "run-time guard"  # depends on a dynamic size other than the batch
GHOST_FASTER = "ghost is faster"
WITHIN_BUDGET = "fastest within budget"  # explicit up to `Site.explicit_up_to`
OVER_BUDGET = "explicit would exceed budget"  # ghost above `Site.explicit_up_to`


class Decision(NamedTuple):
    """One operand's norm mode at one batch size, who decided it, and the compiler's words."""

    mode: str  # "ghost" | "explicit" | "guard" | "fallback"
    decided_by: str  # one of the constants above
    reason: str


@dataclass
class Site:
    id: int
    node: str
    op: Any
    source: str | None
    module: str
    operands: list[Operand]
    layouts: dict[Path, SampleLayout]  # sample-dependent arguments' layouts
    out_layout: SampleLayout  # the output's (with several outputs: the first one's with a sample dimension)
    out_layouts: tuple | None = None  # with several outputs: each one's SampleLayout, or None
    mode: str = "ghost"  # "ghost" | "explicit" | "guard" (decided at run time from the actual sizes)
    decided_by: str = ""  # EXPLICIT_RULE, FALLBACK, USER_OVERRIDE, GUARD, GHOST_FASTER, WITHIN_BUDGET or OVER_BUDGET
    reason: str = ""  # the cost model's words (a guard's inequality)
    guard: sympy.Expr | None = None  # ghost iff guard >= 0, in the run's sizes
    # set by the cost model: estimated extra seconds of each mode (sympy, in the batch symbol), the
    # explicit mode's bytes held until the clip factors are known, and the budget's batch limit
    time_ghost_s: sympy.Expr | None = None
    time_explicit_s: sympy.Expr | None = None
    bytes_explicit: sympy.Expr | None = None
    explicit_up_to: int | None = None  # explicit at batch sizes <= this, ghost above (None: `mode` at every batch)
    _guard_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def params(self) -> list[str]:
        return sorted({p for o in self.operands for p in o.params})

    def ghost_at(self, batch: int, sizes=()) -> bool:
        """Whether the site runs ghost at this batch size; `sizes` are the factored operands'
        actual `(T, m, n)` (in `operands` order), which a run-time guard needs."""
        if self.mode == "guard":
            key = tuple(sizes)
            if key not in self._guard_cache:
                self._guard_cache[key] = _guard_holds(self, key)
            return self._guard_cache[key]
        if self.explicit_up_to is not None:
            return batch > self.explicit_up_to
        return self.mode == "ghost"

    def mode_at(self, batch: int) -> str:
        """The site's mode at this batch size, the budget's batch limit applied: "ghost",
        "explicit", or "guard" (decided at run time from sizes other than the batch)."""
        if self.mode == "guard":
            return "guard"
        return "ghost" if self.ghost_at(batch) else "explicit"

    def decision(self, operand: Operand, batch: int) -> Decision:
        """One operand's mode at this batch size and who decided it: an explicit piece is its
        rule's (or the fallback's); a factored one the cost model's, whose budget decision
        depends on the batch size (explicit up to `explicit_up_to`, ghost above)."""
        if operand.spec.kind == "explicit":
            if operand.rule.fallback:
                return Decision("fallback", FALLBACK, "no rule: vmap of vjp")
            return Decision("explicit", EXPLICIT_RULE, f"explicit rule ({operand.rule.name})")
        if self.decided_by in (WITHIN_BUDGET, OVER_BUDGET):
            within = batch <= self.explicit_up_to
            return Decision("explicit" if within else "ghost", WITHIN_BUDGET if within else OVER_BUDGET, self.reason)
        return Decision(self.mode, self.decided_by, self.reason)


def _guard_holds(site: "Site", sizes) -> bool:
    """`guard >= 0` with the dynamic sizes solved from the factored operands' actual (T, m, n)."""
    specs = [o.spec for o in site.operands if o.spec is not None and o.spec.kind == "factored"]
    equations = [
        sympy.Eq(expr, value)
        for spec, actual in zip(specs, sizes)
        for expr, value in zip((spec.T, spec.m, spec.n), actual)
        if sympy.sympify(expr).free_symbols
    ]
    unknown = sorted(site.guard.free_symbols, key=str)
    solved = sympy.solve(equations, unknown, dict=True) if equations else []
    value = site.guard.subs(solved[0]) if solved else None
    if value is None or not value.is_number:
        return True  # sizes the plan cannot read: ghost, whose memory never depends on the parameter's size
    return bool(value >= 0)


@dataclass
class DeviceCosts:
    """What a device's time estimates are made of (see `passes.cost_model`)."""

    kind: str
    macs_per_s: float  # large fp32 matmuls, multiply-adds per second
    low_precision_speedup: float  # bf16/fp16 matmuls (autocast) relative to fp32
    bytes_per_s: float  # memory bandwidth, as reached writing fresh tensors
    gram_efficiency: float  # the ghost norms' batched T x T Gram matmuls, relative to large matmuls
    rows_half: float  # per-sample matmuls with this many rows run at half a large matmul's rate


@dataclass
class Budget:
    """The memory budget a plan was made for: `total` bytes for the step's activations
    (`activation_bytes` per sample, estimated from the graph) and the explicit per-sample
    gradients; `source` says where `total` came from."""

    device: str
    costs: DeviceCosts
    compute_dtype: str
    total: int
    source: str
    activation_bytes: int
    fixed_bytes: int  # per sample, explicit-rule and fallback sites' per-sample gradients (no choice)
