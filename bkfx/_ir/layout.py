"""Where the sample dimension lies in a tensor.

A tensor's sample dimension is one of its dimensions, possibly merged with others by a
view: its size is `before * B * after`, sample i occupying the entries
`[b * B * after + i * after + a]` for every `b < before`, `a < after`. Batch-first
`[B, T, d]` is `SampleLayout(0)`; `[B*T, d]` is `SampleLayout(0, after=T)`;
`[T*B, d]` (nn.MultiheadAttention's out projection) is `SampleLayout(0, before=T)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampleLayout:
    dim: int
    before: int = 1
    after: int = 1

    @property
    def merged(self) -> bool:
        return self.before != 1 or self.after != 1

    def describe(self) -> str:
        parts = [str(p) for p in (self.before, "B", self.after) if p != 1]
        return f"dim {self.dim}" + (f" = {'*'.join(parts)}" if self.merged else "")


def batch_first(t: torch.Tensor, layout: SampleLayout) -> torch.Tensor:
    """`t` with its samples along a new leading dimension: `[B, *rest]`.

    A merged sample dimension `before * B * after` is split into (before, B, after);
    `before` and `after` stay where the merged dimension was, in that order.
    """
    d = layout.dim
    if not layout.merged:
        return t.movedim(d, 0)
    size = t.shape[d]
    batch = size // (layout.before * layout.after)
    t = t.reshape(*t.shape[:d], layout.before, batch, layout.after, *t.shape[d + 1 :])
    return t.movedim(d + 1, 0)
