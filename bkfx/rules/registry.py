"""The gradient-rule registry and the helpers rules share (`bkfx.rules` re-exports all of it).

The family modules import from here, not from the package, so that the package can import
them without a cycle; the contract is in `bkfx/rules/__init__.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import sympy
import torch

from bkfx._ir.layout import SampleLayout, batch_first
from bkfx._ir.node import target_name
from bkfx._ir.plan import Path, PieceSpec
from bkfx.rules.factors import Explicit, Factored
from bkfx.rules.precision import accumulation_dtype

__all__ = ["SiteCall", "RuleClass", "Rule", "rule", "runner", "lookup", "registered", "rows", "sum_to", "numel",
           "factored_spec", "one_hot_spec", "explicit_spec"]

_RULES: dict[str, "Rule"] = {}


@dataclass
class SiteCall:
    """What a rule sees at backward time."""

    op: Any
    args: tuple  # the op's arguments as called (parameter operands detached)
    kwargs: dict
    g: torch.Tensor  # gradient of the site's output; with several outputs a tuple, None where none arrived
    layouts: dict[Path, SampleLayout]  # arguments with a sample dimension
    out_layout: SampleLayout  # with several outputs a tuple (SampleLayout or None per output)
    batch: int
    saved: Any = None  # what the rule's `forward` kept from the forward pass (None without one)
    fallback_paths: tuple = ()  # the operands the fallback serves: it pulls back to all of them at once
    cache: dict = field(default_factory=dict)  # pieces computed together for several operands, by path


@runtime_checkable
class RuleClass(Protocol):
    """The class `@rule` registers: its functions are called on the class, without an instance.

    Optional members, read with defaults: `forward(op, args, kwargs) -> (output, saved)`
    (default: the op itself, nothing saved) and `one_hot_left: bool` (default False).
    """

    @staticmethod
    def spec(node: Any, path: Path, batch: Any) -> PieceSpec | None:
        """The operand's piece at capture, with its costs in the batch symbol; None to decline."""

    @staticmethod
    def piece(call: SiteCall, path: Path) -> Factored | Explicit:
        """The operand's factors (or explicit per-sample gradients) at backward time."""


@dataclass
class Rule:
    """A registered rule: its class's name and functions (see `RuleClass` and the module docstring)."""

    name: str
    spec: Callable
    piece: Callable
    forward: Callable | None = None  # (op, args, kwargs) -> (output, saved): the op run keeping what piece reuses
    fallback: bool = False  # the generic fallback (FALLBACK), whose spec takes (node, path, batch, layouts, out_layout)
    one_hot_left: bool = False  # the left factor is a gather: weight gradient a scatter-add, no per-sample matmul

    def nonprivate_time(self, spec: PieceSpec, batch) -> sympy.Expr:
        """The standard weight gradient's work for one operand (what non-private training pays):
        `B·T·m·n` for dense factors (`gᵀa`), `B·T·n` for a one-hot left factor (a scatter-add of
        T rows), and the rule's own work for an explicit piece (the same per-position products,
        summed over the batch instead of kept per sample)."""
        if spec.kind == "explicit":
            return spec.time_explicit
        if self.one_hot_left:
            return batch * spec.T * spec.n
        return batch * spec.T * spec.m * spec.n


def rule(*op_names: str):
    """Register a module-level rule class (`RuleClass`) for these ATen ops."""

    def register(cls: type[RuleClass]):
        r = Rule(cls.__name__, cls.spec, cls.piece, getattr(cls, "forward", None),
                 one_hot_left=getattr(cls, "one_hot_left", False))
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
    """The rule registered for this ATen op name, or None (the fallback then takes the op)."""
    return _RULES.get(op_name)


def registered() -> dict[str, Rule]:
    """Every registered rule, by ATen op name (the fallback is not among them)."""
    return dict(_RULES)


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
    dimensions the operand was broadcast along, into float32 when `t` is bf16/fp16 (the
    sum stays unrounded for the norm, on every device and autocast state alike).
    """
    shape = tuple(shape)
    padded = (1,) * (t.dim() - len(shape)) + shape
    d = layout.dim
    reduce = [i for i in range(t.dim()) if padded[i] == 1 and t.shape[i] != 1 and i != d]
    acc = accumulation_dtype(t.dtype)
    if reduce:
        t = t.sum(reduce, keepdim=True, dtype=acc)
    moved = batch_first(t, layout)
    if layout.merged:
        moved = moved.sum((d + 1, d + 2), dtype=acc)
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


def one_hot_spec(T, V, d, batch) -> PieceSpec:
    """Costs of an embedding-like factored site, `L = onehot(ids)` (a gather over V rows) and
    `R: [T, d]`: the ghost norm's `L Lᵀ` is the index-equality matrix, `B T²` comparisons, so
    ghost time is `B T² (d + 2)`, memory `2 B T²`; explicit as for `factored_spec` with m = V."""
    return PieceSpec(
        "factored", T, V, d,
        time_ghost=batch * T**2 * (d + 2), mem_ghost=2 * batch * T**2,
        time_explicit=2 * batch * V * d, mem_explicit=batch * V * d,
    )


def explicit_spec(shape, batch, work=None) -> PieceSpec:
    """An explicit piece `[B, *shape]`: p is the parameter operand's size."""
    size = numel(shape)
    return PieceSpec(
        "explicit", sympy.Integer(1), size, sympy.Integer(1),
        time_explicit=batch * (work if work is not None else size), mem_explicit=batch * size,
    )
