"""`replace_batchnorm`: swap BatchNorm layers (which mix samples in training) for GroupNorm."""
from __future__ import annotations

from torch import nn

__all__ = ["replace_batchnorm"]


def _groups(channels: int, preferred: int) -> int:
    """The largest divisor of `channels` that is at most `preferred`."""
    return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


def replace_batchnorm(model: nn.Module, num_groups: int = 32) -> nn.Module:
    """Replace every `nn.BatchNorm{1,2,3}d` in `model` (in place, same attribute names) by a
    `GroupNorm` over the same channels, with `num_groups` groups or the largest divisor of the
    channel count below it; affine weights are copied. Returns `model`."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            gn = nn.GroupNorm(_groups(child.num_features, num_groups), child.num_features, eps=child.eps, affine=child.affine)
            if child.affine:
                gn.weight.data.copy_(child.weight.data)
                gn.bias.data.copy_(child.bias.data)
            gn.to(device=child.weight.device if child.affine else None)
            setattr(model, name, gn)
        else:
            replace_batchnorm(child, num_groups)
    return model
