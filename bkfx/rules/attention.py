"""Attention: `scaled_dot_product_attention` and its kernels (sample rules).

Samples are attended within themselves: the batch and head dimensions of q, k, v and the mask map
to the output's, the key positions and head features are attended or contracted over.
"""
from __future__ import annotations

from torch.fx import Node

from bkfx._ir.node import arguments
from bkfx.rules.sample import ndim, out_ndim, sample_rule

__all__ = []  # sample rules only, registered by their decorators


@sample_rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention")
def _attention(node):
    """out[..., l, :] = softmax(q_l Kᵀ + mask_l) V: the query position l maps to itself, the key
    positions and the head features are attended or contracted over."""
    q, k, v = node.args[:3]
    r = out_ndim(node)
    args = arguments(node)
    mask = args.get("attn_mask", args.get("attn_bias"))

    def batch_dims(rank, keep_last=None):
        def f(j):
            if j < rank - 2:
                return j + r - rank
            return keep_last.get(j - rank) if keep_last else None

        return f

    out = [(q, batch_dims(ndim(q), {-2: r - 2})), (k, batch_dims(ndim(k))), (v, batch_dims(ndim(v), {-1: r - 1}))]
    if isinstance(mask, Node):
        out.append((mask, batch_dims(ndim(mask), {-2: r - 2})))
    return out
