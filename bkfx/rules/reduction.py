"""Reductions and ops along a dimension: `sum`, `mean`, `softmax`, `cumsum`, `sort`, `topk`, `flip`, FFTs,
`renorm`, `cross`, ... (sample rules).

Each works along the dimensions it names (`dim`, `dims`), which map to `None`: the shared check
refuses the op when one of them is the sample dimension. A full reduction (no `dim`) reduces over
the samples too, so its result has no sample dimension and is refused by the pass.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from bkfx._ir.node import arguments, op_name
from bkfx.rules.sample import broadcast, ndim, out_ndim, sample_rule, tensor_inputs, works_along

__all__ = []  # sample rules only, registered by their decorators


_REDUCTIONS = {
    "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "var", "std", "var_mean", "std_mean",
    "logsumexp", "prod", "any", "all", "norm", "linalg_vector_norm", "count_nonzero", "nansum", "nanmean", "aminmax",
}


@sample_rule(*_REDUCTIONS)
def _reduction(node):
    if len(node.args) > 1 and isinstance(node.args[1], Node) and isinstance(node.args[1].meta.get("val"), torch.Tensor):
        return broadcast(node)  # torch.max(a, b), torch.min(a, b): elementwise
    x = node.args[0]
    rank = ndim(x)
    args = arguments(node)
    dims = args.get("dim", None)
    if dims is None or dims == []:
        dims = list(range(rank))  # a full reduction: the output keeps no sample dimension
    dims = {int(d) % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])} if rank else set()
    keep = bool(args.get("keepdim", False))
    kept = [k for k in range(rank) if k not in dims]
    where = {k: (k if keep else kept.index(k)) for k in kept}
    return [(x, where.get)]


# op -> name of the argument(s) naming the dimension(s) it works along
_ALONG = {
    "softmax": "dim", "_softmax": "dim", "log_softmax": "dim", "_log_softmax": "dim", "cumsum": "dim",
    "cumprod": "dim", "logcumsumexp": "dim", "cummax": "dim", "cummin": "dim", "sort": "dim", "argsort": "dim",
    "topk": "dim", "kthvalue": "dim", "median": "dim", "nanmedian": "dim", "mode": "dim", "glu": "dim",
    "flip": "dims", "roll": "dims", "unfold": "dimension",
    "diff": "dim", "_fft_r2c": "dim", "_fft_c2r": "dim", "_fft_c2c": "dim", "fft_fft": "dim", "fft_ifft": "dim",
    "fft_rfft": "dim", "fft_irfft": "dim", "fft_fftn": "dim", "fft_rfftn": "dim", "fft_fft2": "dim",
    "fft_rfft2": "dim", "fft_hfft": "dim", "fft_ihfft": "dim", "special_softmax": "dim", "special_log_softmax": "dim",
    "_weight_norm_interface": "dim", "_safe_softmax": "dim",
}


@sample_rule(*_ALONG)
def _along(node):
    x = node.args[0]
    rank = ndim(x)
    dims = arguments(node).get(_ALONG[op_name(node)])
    if dims is None:
        dims = list(range(rank))  # every dimension (flip/roll without dims, a sort of a flattened view)
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if not dims:
        dims = list(range(rank))
    return [(x, works_along(*[int(d) for d in dims], rank=rank))]


@sample_rule("renorm")
def _renorm(node):
    """`renorm(x, p, dim, maxnorm)` rescales each slice `x.select(dim, j)` to norm <= maxnorm: the
    norm is taken over every dimension but `dim`, so only `dim` keeps its entries apart."""
    x = node.args[0]
    rank = ndim(x)
    d = int(arguments(node)["dim"]) % rank
    return [(x, lambda k: k if k == d else None)]


@sample_rule("cross", "linalg_cross")
def _cross(node):
    """`cross(a, b, dim)`: a and b broadcast together; the 3-vectors lie along `dim` (for `cross`
    without dim, the first dimension of size 3)."""
    r = out_ndim(node)
    dim = arguments(node).get("dim")
    if dim is None:
        dim = next(k for k, s in enumerate(node.meta["val"].shape) if s == 3)
    d = int(dim) % r
    return [(n, (lambda k, rank=ndim(n): None if k + r - rank == d else k + r - rank)) for n in tensor_inputs(node)]
