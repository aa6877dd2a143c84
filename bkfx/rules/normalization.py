"""Normalisation layers: `layer_norm(x, shape, weight, bias, eps)`.

With `x̂ = (x - mean) / sqrt(var + eps)` over the normalised dimensions, sample i's
gradients are `Σ g ⊙ x̂` (weight) and `Σ g` (bias), summed over sample i's other
dimensions (explicit).
"""
from __future__ import annotations

import torch.nn.functional as F

from bkfx.factors import Explicit
from bkfx.rules import explicit_spec, rule, sum_to
from passes.sample_dim import shape_of


@rule("layer_norm")
class LayerNorm:
    def spec(node, path, batch):
        return explicit_spec(shape_of(node.args[path[0]]), batch) if path in ((2,), (3,)) else None

    def piece(call, path):
        x, shape = call.args[0], call.args[1]
        if path == (3,):
            return Explicit(sum_to(call.g, call.out_layout, call.args[3].shape))
        eps = call.args[4] if len(call.args) > 4 else call.kwargs.get("eps", 1e-5)
        xhat = F.layer_norm(x, shape, None, None, eps)
        return Explicit(sum_to(call.g * xhat, call.out_layout, call.args[2].shape))
