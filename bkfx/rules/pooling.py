"""Pooling and other spatial ops: max/avg/adaptive/lp pooling, upsampling, reflection and replication
padding, pixel and channel shuffles, `im2col`/`col2im`, `grid_sampler_2d` (sample rules).

Each works along the last k dimensions of its input (the spatial ones, and the channels where it
reshuffles them), `_POOLS[op] = k`; the leading (batch) dimensions stay in place.
"""
from __future__ import annotations

from bkfx._ir.node import op_name
from bkfx.rules.sample import ndim, sample_rule, tensor_inputs

__all__ = []  # sample rules only, registered by their decorators


_POOLS = {
    "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "max_pool1d_with_indices": 1, "max_pool2d_with_indices": 2,
    "max_pool3d_with_indices": 3, "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3, "adaptive_avg_pool1d": 1,
    "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "_adaptive_avg_pool2d": 2, "_adaptive_avg_pool3d": 3,
    "adaptive_max_pool1d": 1, "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3, "upsample_nearest1d": 1,
    "upsample_nearest2d": 2, "upsample_nearest3d": 3, "upsample_linear1d": 1, "upsample_bilinear2d": 2,
    "upsample_bicubic2d": 2, "upsample_trilinear3d": 3, "_upsample_nearest_exact1d": 1,
    "_upsample_nearest_exact2d": 2, "_upsample_nearest_exact3d": 3, "_upsample_bilinear2d_aa": 2,
    "reflection_pad1d": 1, "reflection_pad2d": 2, "reflection_pad3d": 3, "replication_pad1d": 1,
    "replication_pad2d": 2, "replication_pad3d": 3, "lp_pool1d": 1, "lp_pool2d": 2, "lp_pool3d": 3,
    "fractional_max_pool2d": 2, "pixel_shuffle": 3, "pixel_unshuffle": 3, "channel_shuffle": 3, "im2col": 3,
    "col2im": 2, "grid_sampler_2d": 3,
}


@sample_rule(*_POOLS)
def _pool(node):
    # the op works along the last k dimensions (spatial, and channels where it reshuffles them)
    x = node.args[0]
    rank = ndim(x)
    k = _POOLS[op_name(node)]
    return [(n, (lambda j, rank=ndim(n): None if j >= rank - k else j)) for n in tensor_inputs(node) if n is x]
