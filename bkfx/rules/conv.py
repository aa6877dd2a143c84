"""Convolutions: `conv1d`, `conv2d`, `conv3d` (stride, padding incl. "same"/"valid", dilation, groups).

With `U_i = unfold(a_i)`: `[T, C_in/groups · K]` (T output positions, K kernel volume)
and `g_i`: `[T, C_out]`, group j's weight block is `G_i^j = g_i[:, j]ᵀ U_i^j`. The blocks
stack into one factored piece by zero-padding: L has `groups · T` rows, the rows of
block j carrying only group j's output channels, so `LᵀR = Σ_j` (block j) is the whole
weight gradient `[C_out, C_in/groups · K]` and ghost norms, tied cross terms and the
clipped sum come from the shared code. The bias gradient is g summed over positions.
"""
from __future__ import annotations

import math

import sympy
import torch
import torch.nn.functional as F
from torch.fx import Node

from bkfx._ir.node import bind, shape_of
from bkfx.rules.factors import Dense, Explicit, Factored
from bkfx.rules.precision import accumulation_dtype
from bkfx.rules.registry import explicit_spec, factored_spec, numel, rows, rule
from bkfx.rules.sample import ndim, sample_rule

__all__ = ["unfold", "Conv"]


def _options(op, args, kwargs, n: int):
    """stride, padding (as (left, right) pairs or None), dilation, groups of a conv call."""
    values = bind(op, args, kwargs)
    stride = _tuple(values.get("stride", 1), n)
    dilation = _tuple(values.get("dilation", 1), n)
    groups = int(values.get("groups", 1))
    padding = values.get("padding", 0)
    return stride, padding, dilation, groups


def _tuple(v, n):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(int(x) for x in (v * n if len(v) == 1 else v))


def _pairs(padding, kernel, dilation):
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in total]
    return [(p, p) for p in _tuple(padding, len(kernel))]


def unfold(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """`[B, T, C · K]`: every output position's receptive field, channels major then kernel offsets."""
    n = len(kernel)
    pad = [p for pair in reversed(_pairs(padding, kernel, dilation)) for p in pair]
    x = F.pad(x, pad) if any(pad) else x
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    # x: [B, C, *out, k_1, ..., k_n]
    x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
    B, out, field = x.shape[0], x.shape[1 : 1 + n], x.shape[1 + n :]
    return x.reshape(B, math.prod(out), math.prod(field))


@rule("conv1d", "conv2d", "conv3d")
class Conv:
    def spec(node, path, batch):
        x = node.args[0]
        layout = x.meta.get("bkfx._ir.layout")
        if layout is None or layout.dim != 0 or layout.merged:
            return None
        out = shape_of(node)
        if path == (2,):
            return explicit_spec(shape_of(node.args[2]), batch)
        if path != (1,):
            return None
        w = shape_of(node.args[1])
        stride, padding, dilation, groups = _options(node.target, node.args, node.kwargs, len(w) - 2)
        T = numel(out[2:])
        return factored_spec(groups * T, w[0], numel(w[1:]), batch)

    def piece(call, path):
        x, w = call.args[0], call.args[1]
        if path == (2,):
            return Explicit(rows(call.g, call.out_layout, 1).sum(1, dtype=accumulation_dtype(call.g.dtype)))
        n = w.dim() - 2
        stride, padding, dilation, groups = _options(call.op, call.args, call.kwargs, n)
        U = unfold(x, w.shape[2:], stride, padding, dilation)  # [B, T, C_in * K]
        g = rows(call.g, call.out_layout, 1)  # [B, T, C_out]
        if groups == 1:
            return Factored(Dense(g), Dense(U))
        B, T, c_out = g.shape
        per_in, per_out = U.shape[2] // groups, c_out // groups
        L = g.new_zeros(B, groups, T, c_out)
        for j in range(groups):
            L[:, j, :, j * per_out : (j + 1) * per_out] = g[:, :, j * per_out : (j + 1) * per_out]
        R = U.reshape(B, T, groups, per_in).transpose(1, 2)
        return Factored(Dense(L.reshape(B, groups * T, c_out)), Dense(R.reshape(B, groups * T, per_in)))


# ---- sample rules: how these ops map the sample dimension (bkfx/rules/sample.py) ------------------

# Convolutions work along channels and space; an unbatched input (no batch dimension) has none.


_CONVS = {"convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
          "conv_transpose3d", "cudnn_convolution", "mkldnn_convolution"}


@sample_rule(*_CONVS)
def _conv(node):
    x, w = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else None
    batched = ndim(x) == ndim(w)  # an unbatched input has no batch dimension: its dim 0 is channels
    out = [(x, {0: 0}.get if batched else (lambda k: None)), (w, lambda k: None)]
    if isinstance(bias, Node):
        out.append((bias, lambda k: None))
    return out
