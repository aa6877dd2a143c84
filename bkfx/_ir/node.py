"""Reading an fx node of a captured graph: its shape in sympy, its op's name, its arguments.

Shared by the compiler passes and the rules, which read the same nodes.
"""
from __future__ import annotations

import sympy
import torch
from torch.fx import Node


def attribute(gm: torch.nn.Module, target: str):
    """The value a `get_attr` node of `gm` reads (`target` is a dotted path)."""
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def sym(x) -> sympy.Expr:
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def shape_of(node: Node) -> list[sympy.Expr] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return [sym(s) for s in val.shape] if isinstance(val, torch.Tensor) else None


def op_name(node: Node) -> str:
    return target_name(node.target)


def original_op_name(node: Node) -> str:
    """The op's name, also after the rewrite made the node a call of the BK operation
    (`bkfx._runtime.ops.site(op, ...)`): the op it wraps."""
    site = node.meta.get("bkfx.site")  # bkfx._ir.meta.META_SITE (node.py imports nothing of bkfx)
    return target_name(site.op) if site is not None else op_name(node)


def target_name(target) -> str:
    """An ATen op's name without overload or in-place suffix: `aten.add_.Tensor` -> "add"."""
    packet = getattr(target, "overloadpacket", None)
    name = packet.__name__ if packet is not None else getattr(target, "__name__", str(target))
    return name if name.startswith("__") else name.rstrip("_")


def arguments(node: Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    return bind(node.target, node.args, node.kwargs)


def bind(op, args, kwargs) -> dict:
    """An ATen op's arguments by schema name, defaults filled in (`{}` for a target without a schema)."""
    schema = getattr(op, "_schema", None)
    if schema is None:
        return {}
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out
