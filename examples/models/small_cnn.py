"""A small CNN with GroupNorm for `bkfx inspect` / `bkfx check` (images `[B, 3, H, W]`, 10 classes).

    bkfx inspect examples/models/small_cnn.py:small_cnn --input-shape 8,3,32,32
    bkfx check examples/models/small_cnn.py:small_cnn --input-shape 4,3,16,16 --num-classes 10
"""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv → GroupNorm → ReLU, twice (the second with a residual), global average pool, linear head."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        h = torch.relu(self.norm1(self.conv1(x)))
        h = h + torch.relu(self.norm2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


def small_cnn() -> nn.Module:
    return SmallCNN()
