"""Normalisation layers: layer_norm, rms_norm, group_norm, instance_norm, batch_norm (eval).

With `x̂` the input normalised by per-sample statistics (or running statistics in
eval mode), sample i's gradients are `Σ g ⊙ x̂` (weight) and `Σ g` (bias), summed over
sample i's entries that share the parameter (explicit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bkfx._ir.node import arguments, bind, op_name, shape_of
from bkfx.errors import SampleMixingError, node_error
from bkfx.rules.factors import Explicit
from bkfx.rules.precision import accumulation_dtype
from bkfx.rules.registry import explicit_spec, rows, rule, sum_to
from bkfx.rules.sample import identity, ndim, sample_rule, tensor_inputs

__all__ = ["LayerNorm", "GroupNorm", "InstanceNorm", "BatchNormEval", "RMSNorm"]


@rule("layer_norm")
class LayerNorm:
    """The forward runs `native_layer_norm` and keeps its per-row mean and 1/std, so the
    weight's `x̂ = (x - mean) · rstd` is not normalised a second time."""

    def spec(node, path, batch):
        return explicit_spec(shape_of(node.args[path[0]]), batch) if path in ((2,), (3,)) else None

    def forward(op, args, kwargs):
        values = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args), **kwargs)
        out, mean, rstd = torch.ops.aten.native_layer_norm(
            values["input"], values["normalized_shape"], values.get("weight"), values.get("bias"),
            values.get("eps", 1e-5),
        )
        return out, (mean.detach(), rstd.detach())

    def piece(call, path):
        if path == (3,):
            return Explicit(sum_to(call.g, call.out_layout, call.args[3].shape))
        mean, rstd = call.saved
        g_xhat = (call.args[0] - mean).mul_(rstd).mul_(call.g)  # one temporary
        return Explicit(sum_to(g_xhat, call.out_layout, call.args[2].shape))


def _per_channel(call, t):
    """`[B, C]`: `t` (shaped like the `[B, C, *spatial]` output) summed over each sample's
    positions (into float32 when `t` is bf16/fp16, as `sum_to`)."""
    return rows(t, call.out_layout, 1).sum(1, dtype=accumulation_dtype(t.dtype))


@rule("group_norm")
class GroupNorm:
    """`group_norm(x, G, weight, bias, eps)`: per-channel `Σ g ⊙ x̂` and `Σ g` over positions."""

    def spec(node, path, batch):
        return explicit_spec(shape_of(node.args[path[0]]), batch) if path in ((2,), (3,)) else None

    def piece(call, path):
        if path == (3,):
            return Explicit(_per_channel(call, call.g))
        eps = call.args[4] if len(call.args) > 4 else call.kwargs.get("eps", 1e-5)
        xhat = F.group_norm(call.args[0], call.args[1], None, None, eps)
        return Explicit(_per_channel(call, call.g * xhat))


@rule("instance_norm")
class InstanceNorm:
    """`instance_norm(x, weight, bias, ...)` with per-sample statistics: like group_norm with G = C."""

    def spec(node, path, batch):
        return explicit_spec(shape_of(node.args[path[0]]), batch) if path in ((1,), (2,)) else None

    def piece(call, path):
        if path == (2,):
            return Explicit(_per_channel(call, call.g))
        values = bind(call.op, call.args, call.kwargs)
        xhat = F.instance_norm(
            call.args[0], values.get("running_mean"), values.get("running_var"),
            use_input_stats=values.get("use_input_stats", True), eps=values.get("eps", 1e-5),
        )
        return Explicit(_per_channel(call, call.g * xhat))


@rule("batch_norm")
class BatchNormEval:
    """`batch_norm` in eval mode: `x̂ = (x - running_mean) / sqrt(running_var + eps)`, per channel.

    (In training mode batch statistics mix samples; sample_dim refuses it.)
    """

    def spec(node, path, batch):
        return explicit_spec(shape_of(node.args[path[0]]), batch) if path in ((1,), (2,)) else None

    def piece(call, path):
        if path == (2,):
            return Explicit(_per_channel(call, call.g))
        x, mean, var = call.args[0], call.args[3], call.args[4]
        eps = call.args[7] if len(call.args) > 7 else call.kwargs.get("eps", 1e-5)
        xhat = F.batch_norm(x, mean, var, None, None, False, 0.0, eps)
        return Explicit(_per_channel(call, call.g * xhat))


@rule("rms_norm")
class RMSNorm:
    """`rms_norm(x, shape, weight, eps)`: `x̂ = x / sqrt(mean(x²) + eps)`; weight gets `Σ g ⊙ x̂`."""

    def spec(node, path, batch):
        return explicit_spec(shape_of(node.args[2]), batch) if path == (2,) else None

    def piece(call, path):
        x, shape = call.args[0], call.args[1]
        eps = call.args[3] if len(call.args) > 3 else call.kwargs.get("eps")
        xhat = F.rms_norm(x, shape, None, eps)
        return Explicit(sum_to(call.g * xhat, call.out_layout, call.args[2].shape))


# ---- sample rules: how these ops map the sample dimension (bkfx/rules/sample.py) ------------------

# A norm works along the dimensions it normalises, which must not hold the samples.


@sample_rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _trailing_norm(node):
    x = node.args[0]
    rank = ndim(x)
    k = len(arguments(node).get("normalized_shape", ()))
    others = [n for n in tensor_inputs(node) if n is not x]  # weight, bias: parameters, aligned to the end
    return [(x, lambda j: None if j >= rank - k else j)] + [(n, lambda j: None) for n in others]


@sample_rule("group_norm", "native_group_norm", "instance_norm")
def _per_sample_norm(node):
    x = node.args[0]
    rank = ndim(x)
    keep = {0} if op_name(node) != "instance_norm" else {0, 1}
    others = [n for n in tensor_inputs(node) if n is not x]
    return [(x, lambda j: j if j in keep and rank > 1 else None)] + [(n, lambda j: None) for n in others]


_BATCH_NORMS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                "cudnn_batch_norm", "miopen_batch_norm", "_batch_norm_with_update", "_batch_norm_impl_index"}


@sample_rule(*_BATCH_NORMS, refuses=True)
def _batch_norm(node):
    if arguments(node).get("training", True) or op_name(node) == "_batch_norm_with_update":
        raise node_error(
            SampleMixingError, node,
            "batch normalisation in training mode normalises with statistics of the whole batch, which mixes samples",
            "use GroupNorm (bkfx.replace_batchnorm(model) swaps every BatchNorm for a GroupNorm in place), "
            "or put the BatchNorm layers in eval mode",
        )
    x = node.args[0]
    return [(x, identity)] + [(n, lambda j: None) for n in tensor_inputs(node) if n is not x]
