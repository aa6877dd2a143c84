"""Sample rules: how each ATen op maps the sample dimension, the registry and the dimension maps.

`passes.sample_dim` accepts a sample-dependent op only when a sample rule proves that it keeps
samples apart, the way `torch.func.vmap` needs a batching rule per op. The rules live beside the
gradient rules, in the module of their family (`linear.py`, `conv.py`, `shape.py`,
`reduction.py`, ...); this module holds what they share. Kinds of rule, by how they register:

- `@sample_rule("op", ...)`, a *dimension map*: `rule(node) -> [(input node, DimMap)]` gives, for
  each tensor input, where each of its dimensions goes in the output, or `None` when the op works
  along that dimension (reduces, contracts, sorts, pools, normalises or attends over it). The
  shared check (`check_maps`) then requires every sample-dependent input's sample dimension to map
  to one output dimension, all inputs to agree on it and on how samples are laid out in it
  (`SampleLayout.before/after`); the pass checks that the dimension keeps its size. With
  `refuses=True` the rule runs before any shape check, to refuse with its own reason (batch
  statistics, in-place renormalisation);
- `@layout_rule("op", ...)`, for ops with several outputs whose samples lie in different places
  (an RNN's output and its final hidden states): `rule(node, shapes, batch) -> [SampleLayout |
  None per output]`, proving separability itself;
- `@reshape_rule("op", ...)`: `rule(node, (source, layout), shape, d, batch) -> SampleLayout`, the
  sample dimension followed through a reshape by its stride;
- `elementwise_ops(..., module=__name__)`: elementwise ops without torch's pointwise tag (the
  tagged ones need no entry), whose rule is broadcasting (`broadcast`);
- `value_free_ops(..., module=__name__)`: ops whose value depends on their inputs' shapes, dtypes
  and devices only (`zeros_like`, `sym_size`), so they depend on no sample.

An op is registered once; `sample_rules()` lists every registered op with its kind and module
(`docs/gen_ops_table.py` writes docs/ops.md from it), and `tests/test_sample_rules_semantics.py`
checks every dimension map and layout rule against its op run on each sample alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import Node

from bkfx._ir.layout import SampleLayout
from bkfx._ir.meta import META_DEPENDENT, META_LAYOUT
from bkfx._ir.node import op_name, shape_of
from bkfx.errors import SampleMixingError, node_error

__all__ = ["DimMap", "MAP", "LAYOUT", "RESHAPE", "ELEMENTWISE", "VALUE_FREE", "SampleRule", "sample_rule",
           "layout_rule", "reshape_rule", "elementwise_ops", "value_free_ops", "sample_rules", "find_sample_rule",
           "dimension_map", "ndim", "out_ndim", "tensor_inputs", "aligned", "identity", "works_along", "shape_only",
           "broadcast", "check_maps", "expect_layouts"]

DimMap = Callable[[int], "int | None"]  # input dimension -> output dimension, None when the op works along it

# the kinds of sample rule (SampleRule.kind)
MAP, LAYOUT, RESHAPE, ELEMENTWISE, VALUE_FREE = "dimension map", "layout", "reshape", "elementwise", "value-free"


@dataclass(frozen=True)
class SampleRule:
    """A registered sample rule: its kind, its function (None for value-free ops), the module that
    registered it, and whether it may refuse before any shape check."""

    kind: str
    fn: Callable | None
    module: str
    refuses: bool = False

    @property
    def name(self) -> str:
        """The rule's name in docs/ops.md: its function's, without the leading underscore."""
        return self.fn.__name__.lstrip("_") if self.fn is not None else self.kind


_SAMPLE_RULES: dict[str, SampleRule] = {}


def _register(ops, rule: SampleRule) -> None:
    for op in ops:
        known = _SAMPLE_RULES.get(op)
        if known is not None and known != rule:  # two families claiming one op: the import order would pick
            raise ValueError(f"the sample rule of {op} is registered twice: in {known.module} and {rule.module}")
        _SAMPLE_RULES[op] = rule


def sample_rule(*ops: str, refuses: bool = False):
    """Register a dimension map: `rule(node) -> [(input node, DimMap)]`."""

    def register(fn):
        _register(ops, SampleRule(MAP, fn, fn.__module__, refuses))
        return fn

    return register


def layout_rule(*ops: str):
    """Register a layout rule: `rule(node, shapes, batch) -> [SampleLayout | None per output]`."""

    def register(fn):
        _register(ops, SampleRule(LAYOUT, fn, fn.__module__))
        return fn

    return register


def reshape_rule(*ops: str):
    """Register a reshape's rule: `rule(node, (source node, its layout), shape, d, batch) -> SampleLayout`."""

    def register(fn):
        _register(ops, SampleRule(RESHAPE, fn, fn.__module__))
        return fn

    return register


def elementwise_ops(*ops: str, module: str) -> None:
    """Register elementwise ops without torch's pointwise tag: their rule is `broadcast`."""
    _register(ops, SampleRule(ELEMENTWISE, broadcast, module))


def value_free_ops(*ops: str, module: str) -> None:
    """Register ops whose value depends on shapes, dtypes and devices only: no sample reaches it."""
    _register(ops, SampleRule(VALUE_FREE, None, module))


def sample_rules() -> dict[str, SampleRule]:
    """Every op with a sample rule, by ATen op name (pointwise-tagged ops are elementwise without an entry)."""
    return dict(_SAMPLE_RULES)


def find_sample_rule(op: str) -> SampleRule | None:
    """The sample rule registered for this ATen op name, or None."""
    return _SAMPLE_RULES.get(op)


def dimension_map(node: Node) -> Callable | None:
    """The dimension-map rule of the node's op: its registered map, `broadcast` for an elementwise op
    (registered or tagged `torch.Tag.pointwise`), else None."""
    rule = _SAMPLE_RULES.get(op_name(node))
    if rule is not None and rule.kind in (MAP, ELEMENTWISE):
        return rule.fn
    if torch.Tag.pointwise in getattr(node.target, "tags", ()):
        return broadcast
    return None


# ---- dimension maps ------------------------------------------------------------------------------


def ndim(node) -> int:
    """The number of dimensions of a tensor node."""
    return len(shape_of(node))


def out_ndim(node: Node) -> int:
    """The number of dimensions of the node's (first) output."""
    val = node.meta["val"]
    first = val[0] if isinstance(val, (list, tuple)) else val
    return first.dim()


def tensor_inputs(node: Node) -> list[Node]:
    """The node's inputs that are tensors."""
    return [n for n in node.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor)]


def aligned(rank_in: int, rank_out: int) -> DimMap:
    """Right-aligned broadcasting: input dim k is output dim k + rank_out - rank_in."""
    return lambda k: k + rank_out - rank_in


def identity(k: int) -> int:
    """Every dimension stays where it is."""
    return k


def works_along(*dims: int, rank: int) -> DimMap:
    """Dimension k maps to itself, except the given ones (the op works along them)."""
    along = {d % rank for d in dims} if rank else set()
    return lambda k: None if k in along else k


def shape_only(k: int) -> None:
    """The map of an input the op reads only the shape, dtype or device of (`expand_as`'s and
    `type_as`'s `other`): its values reach no output, so it cannot mix samples."""
    return None


def broadcast(node: Node):
    """Elementwise with broadcasting: every tensor input right-aligned to the output."""
    out = out_ndim(node)
    return [(n, aligned(ndim(n), out)) for n in tensor_inputs(node)]


# ---- the shared check ----------------------------------------------------------------------------


def check_maps(node: Node, maps: list[tuple[Node, DimMap]], name: str) -> tuple[int, int, int]:
    """The output dimension (and layout `before`, `after`) every sample-dependent input's sample
    dimension maps to; refuses a map that sends it nowhere or inputs that disagree."""
    covered = {n for n, _ in maps}
    missing = [n for n in node.all_input_nodes if n.meta.get(META_DEPENDENT) and n not in covered]
    if missing:  # an input the rule does not describe: nothing is proven
        raise node_error(
            SampleMixingError, node, f"{name} takes the sample-dependent input {missing[0].name} in a role bkfx has no rule for",
            "pass per-sample values only as the operation's data operands, or write the operation another way",
        )
    target = None
    for inp, dim_map in maps:
        lo = inp.meta.get(META_LAYOUT)
        if dim_map is shape_only or not inp.meta.get(META_DEPENDENT) or not isinstance(lo, SampleLayout):
            continue
        out = dim_map(lo.dim)
        if out is None:
            raise node_error(
                SampleMixingError, node,
                f"{name} works along the sample dimension of {inp.name} ({lo.describe()}): it reduces, contracts, "
                "sorts, pools, normalises or attends over it, so samples influence each other",
                f"apply {name} along a non-sample dimension; if this input is not batch-first, tell bkfx.compile "
                "where its batch is with batch_dim=",
            )
        candidate = (out, lo.before, lo.after)
        if target is not None and candidate != target:
            raise node_error(
                SampleMixingError, node,
                f"{name} pairs the sample dimensions of its inputs differently ({_describe(target)} vs "
                f"{_describe(candidate)}), so it combines entries of different samples",
                "lay out every operand's batch the same way (same dimension, same order)",
            )
        target = candidate
    if target is None:  # only shape-only inputs depend on samples: the values come from sample-free inputs
        target = next(((dim_map(lo.dim), lo.before, lo.after) for inp, dim_map in maps
                       if dim_map is not shape_only and isinstance(lo := inp.meta.get(META_LAYOUT), SampleLayout)
                       and dim_map(lo.dim) is not None), None)
    if target is None:
        raise node_error(SampleMixingError, node, f"{name}: no input carries the sample dimension", "report this model to bkfx")
    return target


def _describe(target) -> str:
    dim, before, after = target
    return SampleLayout(dim, before, after).describe()


def expect_layouts(node: Node, shapes, expected: list, batch) -> list:
    """A layout rule's `expected` (a layout or None per output) after checking each output's shape against it."""
    for shape, lo in zip(shapes, expected):
        dims = [i for i, s in enumerate(shape or []) if s.has(batch)]
        want = [] if lo is None else [lo.dim]
        if dims != want or (lo is not None and shape[lo.dim] != lo.before * batch * lo.after):
            raise node_error(
                SampleMixingError, node,
                f"{op_name(node)} returns an output of shape {shape} whose sample dimension is not where its inputs' "
                f"samples map ({lo.describe() if lo is not None else 'none'})",
                "operate on each sample separately",
            )
    return expected
