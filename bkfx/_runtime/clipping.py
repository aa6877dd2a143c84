"""Clip functions and clipping styles.

- Abadi: `C_i = min(1, R / ‖G_i‖)` (1 when the norm is 0).
- Automatic (Bu et al.): `C_i = R / (‖G_i‖ + γ)`.

A style partitions the trainable parameters into groups, each with its own norm,
threshold R and clip factor: "all-layer" (one group), "layer-wise" (one per module),
"param-wise" (one per parameter), or a list of lists of parameter names.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

CLIPPINGS = ("abadi", "automatic")


def clip_factor(norms: torch.Tensor, max_grad_norm: float, clipping: str, gamma: float = 0.01) -> torch.Tensor:
    if clipping == "abadi":
        return max_grad_norm / torch.clamp(norms, min=max_grad_norm)
    if clipping == "automatic":
        return max_grad_norm / (norms + gamma)
    raise ValueError(f"clipping must be one of {CLIPPINGS}, got {clipping!r}")


def groups_for(style, names: Sequence[str]) -> list[list[str]]:
    """The parameter groups of a clipping style, over the trainable parameter `names`."""
    if style == "all-layer":
        return [list(names)]
    if style == "param-wise":
        return [[n] for n in names]
    if style == "layer-wise":
        layers: dict[str, list[str]] = {}
        for n in names:
            layers.setdefault(n.rpartition(".")[0], []).append(n)
        return list(layers.values())
    if callable(style):
        keyed: dict = {}
        for n in names:
            keyed.setdefault(style(n), []).append(n)
        return list(keyed.values())
    if isinstance(style, (list, tuple)):
        groups = [list(g) for g in style]
        listed = [n for g in groups for n in g]
        missing, unknown = set(names) - set(listed), set(listed) - set(names)
        if missing or unknown or len(listed) != len(set(listed)):
            raise ValueError(
                "style groups must list every trainable parameter exactly once; "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        return groups
    raise ValueError(f"style must be 'all-layer', 'layer-wise', 'param-wise', a list of name lists or a callable, got {style!r}")


def thresholds(max_grad_norm, groups: list) -> list[float]:
    if isinstance(max_grad_norm, (int, float)):
        return [float(max_grad_norm)] * len(groups)
    values = [float(r) for r in max_grad_norm]
    if len(values) != len(groups):
        raise ValueError(f"max_grad_norm has {len(values)} values for {len(groups)} clipping groups")
    return values
