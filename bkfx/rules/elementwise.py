"""Elementwise parameter uses: `x + shift`, `x - shift`, `x * scale` (any broadcast).

With the parameter P broadcast to the output, sample i's gradient is the output-shaped
elementwise gradient (`g` for add, `∓alpha·g` for sub, `g ⊙ x` for mul) summed over
sample i's entries along the dimensions P was broadcast along (explicit).
"""
from __future__ import annotations

from bkfx._ir.node import shape_of
from bkfx._ir.plan import get_path
from bkfx.rules.factors import Explicit
from bkfx.rules.registry import explicit_spec, rule, sum_to
from bkfx.rules.sample import elementwise_ops

__all__ = ["Add", "Sub", "Mul", "Expand"]


def _spec(node, path, batch):
    if len(path) != 1 or path[0] > 1:
        return None
    return explicit_spec(shape_of(node.args[path[0]]), batch)


def _explicit(call, path, elementwise):
    return Explicit(sum_to(elementwise, call.out_layout, get_path(call.args, path).shape))


@rule("add")
class Add:
    def spec(node, path, batch):
        return _spec(node, path, batch)

    def piece(call, path):
        alpha = call.kwargs.get("alpha", 1)
        return _explicit(call, path, call.g * alpha if path == (1,) and alpha != 1 else call.g)


@rule("sub")
class Sub:
    def spec(node, path, batch):
        return _spec(node, path, batch)

    def piece(call, path):
        return _explicit(call, path, call.g if path == (0,) else -call.kwargs.get("alpha", 1) * call.g)


@rule("mul")
class Mul:
    def spec(node, path, batch):
        return _spec(node, path, batch)

    def piece(call, path):
        other = call.args[1 - path[0]]
        return _explicit(call, path, call.g * other)


@rule("expand")
class Expand:
    """`P.expand(B, ...)` (e.g. a class token): sample i's gradient is `g_i` summed to P's shape."""

    def spec(node, path, batch):
        return explicit_spec(shape_of(node.args[0]), batch) if path == (0,) else None

    def piece(call, path):
        return _explicit(call, path, call.g)


# ---- sample rules: how these ops map the sample dimension (bkfx/rules/sample.py) ------------------

# Elementwise ops broadcast their inputs; those tagged torch.Tag.pointwise need no entry.


# elementwise ops without the pointwise tag
elementwise_ops(
    "clone", "_to_copy", "to", "detach", "alias", "contiguous", "lift_fresh_copy", "dropout",
    "native_dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "__and__", "__or__", "__xor__",
    "__lshift__", "__rshift__", "masked_fill", "copy", "fill", "hardswish", "hardsigmoid", "tril", "triu",
    "_native_batch_norm_legit_no_training", "positive", "real", "imag",
    "_conj", "resolve_conj", "resolve_neg", "where",
    module=__name__,
)
