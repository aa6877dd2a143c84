"""Rules: per operation kind, the factors (or explicit per-sample gradients) and their costs.

A rule answers two questions about a parameter operand of a site:

- `spec(node, path, batch)`: the `PieceSpec` (factored or explicit, with T, m, n and the
  cost expressions), or None when it does not handle this arrangement (the generic
  fallback then does);
- `piece(call, path)`: at backward time, the `Factored` or `Explicit` piece.

Norms, tied parameters, clipping and the clipped sum are shared code (`bkfx.factors`,
`bkfx.ledger`); no rule repeats them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch

from bkfx.layout import SampleLayout, batch_first
from bkfx.node import target_name
from bkfx.plan import Path, PieceSpec

_RULES: dict[str, "Rule"] = {}


@dataclass
class SiteCall:
    """What a rule sees at backward time."""

    op: Any
    args: tuple  # the op's arguments as called (parameter operands detached)
    kwargs: dict
    g: torch.Tensor  # gradient of the site's output
    layouts: dict[Path, SampleLayout]  # arguments with a sample dimension
    out_layout: SampleLayout
    batch: int
    saved: Any = None  # what the rule's `forward` kept from the forward pass (None without one)


@dataclass
class Rule:
    name: str
    spec: Callable
    piece: Callable
    forward: Callable | None = None  # (op, args, kwargs) -> (output, saved): the op run keeping what piece reuses


def rule(*op_names: str):
    """Register `spec` and `piece` functions of a module-level rule class for these ATen ops."""

    def register(cls):
        r = Rule(cls.__name__, cls.spec, cls.piece, getattr(cls, "forward", None))
        for name in op_names:
            _RULES[name] = r
        return cls

    return register


_RUNNERS: dict = {}


def runner(op) -> Callable:
    """`(args, kwargs) -> (output, saved)` for a site's op: its rule's `forward` where it has one
    (keeping statistics its piece would otherwise recompute), else the op itself."""
    run = _RUNNERS.get(op)
    if run is None:
        r = lookup(target_name(op))
        if r is not None and r.forward is not None:
            run = lambda args, kwargs: r.forward(op, args, kwargs)  # noqa: E731
        else:
            run = lambda args, kwargs: (op(*args, **kwargs), None)  # noqa: E731
        _RUNNERS[op] = run
    return run


def lookup(op_name: str) -> Rule | None:
    from bkfx.rules import conv, elementwise, embedding, linear, normalization  # noqa: F401  (registration)

    return _RULES.get(op_name)


# ---- shared helpers for rules ----------------------------------------------------------


def rows(t: torch.Tensor, layout: SampleLayout, feature_dim: int) -> torch.Tensor:
    """`t` as `[B, T, k]`: samples first, `feature_dim` last, every other dimension in T."""
    f = feature_dim % t.dim()
    moved = batch_first(t, layout)
    f = f + 1 if f < layout.dim else (f + 2 if layout.merged else f)
    moved = moved.movedim(f, -1)
    return moved.reshape(moved.shape[0], math.prod(moved.shape[1:-1]), moved.shape[-1])


def sum_to(t: torch.Tensor, layout: SampleLayout, shape) -> torch.Tensor:
    """Per-sample gradient of an operand of `shape` broadcast to `t`'s shape: `[B, *shape]`.

    `t` is the elementwise gradient (output-shaped); each sample's part is summed over the
    dimensions the operand was broadcast along.
    """
    shape = tuple(shape)
    padded = (1,) * (t.dim() - len(shape)) + shape
    d = layout.dim
    reduce = [i for i in range(t.dim()) if padded[i] == 1 and t.shape[i] != 1 and i != d]
    if reduce:
        t = t.sum(reduce, keepdim=True)
    moved = batch_first(t, layout)
    if layout.merged:
        moved = moved.sum((d + 1, d + 2))
    return moved.reshape(moved.shape[0], *shape)


def numel(shape) -> sympy.Expr:
    return sympy.prod(shape) if shape else sympy.Integer(1)


def factored_spec(T, m, n, batch) -> PieceSpec:
    """Extra costs of the per-sample norm of a dense factored site, beyond the non-private
    weight gradient `(C ⊙ L)ᵀ R` (B·T·m·n, which both modes pay once):

    - ghost: the Gram matrices `L Lᵀ`, `R Rᵀ` and their inner product, time `B T² (m+n+1)`,
      memory `2 B T²`;
    - explicit: materialising `L_iᵀ R_i` replaces the weight-gradient matmul, then its norm
      and the weighted sum, time `2 B m n`, memory `B m n` (kept until the clip factors are known).
    """
    T, m, n = (sympy.simplify(x) for x in (T, m, n))
    return PieceSpec(
        "factored", T, m, n,
        time_ghost=batch * T**2 * (m + n + 1), mem_ghost=2 * batch * T**2,
        time_explicit=2 * batch * m * n, mem_explicit=batch * m * n,
    )


def explicit_spec(shape, batch, work=None) -> PieceSpec:
    """An explicit piece `[B, *shape]`: p is the parameter operand's size."""
    size = numel(shape)
    return PieceSpec(
        "explicit", sympy.Integer(1), size, sympy.Integer(1),
        time_explicit=batch * (work if work is not None else size), mem_explicit=batch * size,
    )
