"""Linear family: `linear`, `addmm`, `mm`, `matmul` with a parameter operand.

For `y = x Wᵀ (+ b)` with per-sample activations `a_i: [T, d]` and output gradients
`g_i: [T, p]`, the weight's per-sample gradient is `G_i = g_iᵀ a_i`, factored as
`L = g`, `R = a`. A parameter on the right of a matmul (`x @ W`, W `[d, p]`, HF
GPT-2's Conv1D as `addmm` over `[B*T, d]`) gives `G_i = a_iᵀ g_i`: `L = a`, `R = g`.
A parameter on the left (`W @ x`, W `[p, d]`, x `[..., d, n]`) gives
`G_i = Σ g_{:,t} x_{:,t}ᵀ`: `L = gᵀ`, `R = xᵀ` over the columns. A bias's per-sample
gradient is `g` summed over each sample's other dimensions (explicit).
"""
from __future__ import annotations

import torch
from torch.fx import Node

from bkfx._ir.node import op_name, shape_of
from bkfx._ir.plan import get_path
from bkfx.rules.factors import Dense, Explicit, Factored
from bkfx.rules.registry import explicit_spec, factored_spec, numel, rows, rule, sum_to
from bkfx.rules.sample import aligned, ndim, out_ndim, sample_rule, works_along

__all__ = ["Linear", "MatMul", "AddMM", "Einsum"]


def _right(node, x_pos, w_pos, batch):
    """Spec for `x @ W` with W `[d, p]` (or `[d]`)."""
    xs, ws = shape_of(node.args[x_pos]), shape_of(node.args[w_pos])
    if len(ws) > 2:
        return None
    d = xs[-1]
    return factored_spec(numel(xs) / (batch * d), d, ws[1] if len(ws) == 2 else 1, batch)


def _left(node, w_pos, x_pos, batch):
    """Spec for `W @ x` with W `[p, d]` and x `[..., d, n]`."""
    ws, xs = shape_of(node.args[w_pos]), shape_of(node.args[x_pos])
    if len(ws) != 2 or len(xs) < 2:
        return None
    return factored_spec(numel(xs) / (batch * ws[1]), ws[0], ws[1], batch)


def _right_piece(call, x_pos, scale=1):
    a = rows(call.args[x_pos], call.layouts[(x_pos,)], -1)
    g = call.g if call.g.dim() == call.args[x_pos].dim() else call.g.unsqueeze(-1)
    return Factored(Dense(a), Dense(rows(g * scale if scale != 1 else g, call.out_layout, -1)))


def _left_piece(call, x_pos, scale=1):
    g = call.g * scale if scale != 1 else call.g
    return Factored(Dense(rows(g, call.out_layout, -2)), Dense(rows(call.args[x_pos], call.layouts[(x_pos,)], -2)))


def _bias(call, path):
    return Explicit(sum_to(call.g, call.out_layout, get_path(call.args, path).shape))


@rule("linear")
class Linear:
    """`linear(x, W, b)`: W `[p, d]` factored `L = g`, `R = x`; b explicit."""

    def spec(node, path, batch):
        if path == (1,):
            xs, ws = shape_of(node.args[0]), shape_of(node.args[1])
            return factored_spec(numel(xs) / (batch * xs[-1]), ws[0], ws[1], batch)
        if path == (2,):
            return explicit_spec(shape_of(node.args[2]), batch)
        return None

    def piece(call, path):
        if path == (1,):
            return Factored(Dense(rows(call.g, call.out_layout, -1)), Dense(rows(call.args[0], call.layouts[(0,)], -1)))
        return _bias(call, path)


@rule("mm", "matmul")
class MatMul:
    """`a @ b` with one parameter operand (2-D, or a vector on the right)."""

    def spec(node, path, batch):
        if len(shape_of(node.args[0])) < 1 or len(shape_of(node.args[1])) < 1:
            return None
        return _right(node, 0, 1, batch) if path == (1,) else _left(node, 0, 1, batch)

    def piece(call, path):
        return _right_piece(call, 0) if path == (1,) else _left_piece(call, 1)


@rule("addmm")
class AddMM:
    """`bias + m1 @ m2` (HF Conv1D: `addmm(b, x.view(-1, d), W)`)."""

    def spec(node, path, batch):
        if path == (0,):
            return explicit_spec(shape_of(node.args[0]), batch)
        return _right(node, 1, 2, batch) if path == (2,) else _left(node, 1, 2, batch)

    def piece(call, path):
        if path == (0,):
            beta = call.kwargs.get("beta", 1)
            piece = _bias(call, path)
            return Explicit(piece.G * beta) if beta != 1 else piece
        alpha = call.kwargs.get("alpha", 1)
        return _right_piece(call, 1, alpha) if path == (2,) else _left_piece(call, 2, alpha)


@rule("einsum")
class Einsum:
    """`einsum(eq, [x, P])` with one sample operand x and one parameter P (either order).

    Sample i's gradient is one einsum of the output gradient with x that keeps the batch
    letter: for `"btd,de->bte"`, `G = einsum("bte,btd->bde", g, x)` (explicit).
    """

    def spec(node, path, batch):
        equation, operands = node.args[0], node.args[1]
        letters = _einsum_letters(equation, len(operands))
        if letters is None or len(operands) != 2 or path[0] != 1:
            return None
        other = operands[1 - path[1]]
        layout = other.meta.get("bkfx._ir.layout") if hasattr(other, "meta") else None
        if layout is None or layout.merged:
            return None
        ins, out = letters
        p_letters, x_letters = ins[path[1]], ins[1 - path[1]]
        if len(set(p_letters)) != len(p_letters):
            return None
        work = numel(shape_of(node)) / batch * numel(shape_of(operands[path[1]]))
        return explicit_spec(shape_of(operands[path[1]]), batch, work=work) if x_letters[layout.dim] in out else None

    def piece(call, path):
        ins, out = _einsum_letters(call.args[0], 2)
        k = path[1]
        x = call.args[1][1 - k]
        s = ins[1 - k][call.layouts[(1, 1 - k)].dim]
        G = torch.einsum(f"{out},{ins[1 - k]}->{s}{ins[k]}", call.g, x)
        return Explicit(G)


def _einsum_letters(equation: str, n: int):
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    return (ins, out) if len(ins) == n else None


# ---- sample rules: how these ops map the sample dimension (bkfx/rules/sample.py) ------------------

# Contractions map the free dimensions of each operand and contract the others.


@sample_rule("mm")
def _mm(node):
    a, b = node.args[:2]
    return [(a, {0: 0}.get), (b, {1: 1}.get)]


@sample_rule("addmm")
def _addmm(node):
    bias, a, b = node.args[:3]
    out = [(a, {0: 0}.get), (b, {1: 1}.get)]
    if isinstance(bias, Node):
        out.append((bias, aligned(ndim(bias), 2)))
    return out


@sample_rule("bmm")
def _bmm(node):
    a, b = node.args[:2]
    return [(a, {0: 0, 1: 1}.get), (b, {0: 0, 2: 2}.get)]


@sample_rule("baddbmm")
def _baddbmm(node):
    c, a, b = node.args[:3]
    out = [(a, {0: 0, 1: 1}.get), (b, {0: 0, 2: 2}.get)]
    if isinstance(c, Node):
        out.append((c, aligned(ndim(c), 3)))
    return out


@sample_rule("mv", "addmv", "dot", "vdot", "outer", "ger")
def _vector_products(node):
    name = op_name(node)
    tensors = [a for a in node.args if isinstance(a, Node)]
    if name in ("dot", "vdot"):
        return [(t, lambda k: None) for t in tensors]
    if name in ("outer", "ger"):
        return [(tensors[0], {0: 0}.get), (tensors[1], {0: 1}.get)]
    if name == "mv":
        return [(tensors[0], {0: 0}.get), (tensors[1], lambda k: None)]
    c, m, v = tensors  # addmv
    return [(c, aligned(ndim(c), 1)), (m, {0: 0}.get), (v, lambda k: None)]


@sample_rule("matmul")
def _matmul(node):
    a, b = node.args[:2]
    ra, rb, r = ndim(a), ndim(b), out_ndim(node)

    def left(k):
        if k == ra - 1:
            return None  # contracted
        if ra >= 2 and k == ra - 2:
            return r - 2 if rb >= 2 else r - 1
        return k + (r - (2 if rb >= 2 else 1)) - (ra - 2)  # batch dimensions, right-aligned

    def right(k):
        if rb == 1 or k == rb - 2:
            return None
        if k == rb - 1:
            return r - 1
        return k + (r - 2) - (rb - 2)

    return [(a, left), (b, right)]


@sample_rule("linear")
def _linear(node):
    x, w = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else None
    r = out_ndim(node)
    out = [(x, works_along(-1, rank=ndim(x))), (w, {0: r - 1}.get if ndim(w) == 2 else (lambda k: None))]
    if isinstance(bias, Node):
        out.append((bias, aligned(ndim(bias), r)))
    return out


@sample_rule("einsum")
def _einsum(node):
    equation, operands = node.args[0], node.args[1]
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not arrow:
        letters = "".join(terms).replace("...", "")
        rhs = ("..." if any("..." in t for t in terms) else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    out_rank = out_ndim(node)
    out_ell = out_rank - len(rhs.replace("...", ""))
    out = []
    for term, operand in zip(terms, operands):
        if not isinstance(operand, Node):
            continue
        rank = ndim(operand)
        labels = _einsum_labels(term, rank)
        out_labels = _einsum_labels(rhs, out_rank)
        where = {}
        for k, label in enumerate(labels):
            if isinstance(label, int):  # an ellipsis dimension, counted from the right
                j = out_rank - len(rhs.split("...")[1]) - (rank - len(term.split("...")[1]) - k) if "..." in rhs else None
                where[k] = j if j is not None and out_ell > 0 else None
            else:
                where[k] = out_labels.index(label) if label in out_labels else None
        out.append((operand, where.get))
    return out


def _einsum_labels(term: str, rank: int) -> list:
    if "..." not in term:
        return list(term)
    head, tail = term.split("...")
    n = rank - len(head) - len(tail)
    return list(head) + list(range(n)) + list(tail)
