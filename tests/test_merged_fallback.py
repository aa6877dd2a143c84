"""The generic fallback where the batch is merged with other dimensions (`[B*windows, ...]`)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bkfx.testing import assert_matches_reference


class WindowedUnknownOp(nn.Module):
    """`[B, 4*W, d]` viewed as `[B*4, W, d]` (windows), then an op no rule knows, with a parameter."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.p = nn.Parameter(torch.randn(3, 5))
        self.head = nn.Linear(5, 2)

    def forward(self, x):  # x: [B, 12, 5]
        h = torch.tanh(self.fc(x)).reshape(-1, 3, 5)  # [B*4, 3, 5]: samples merged with windows
        h = torch.atan2(h, self.p)  # the fallback's vmap of vjp, per sample over its 4 windows
        return self.head(h.reshape(x.shape[0], 12, 5).mean(1))


def test_fallback_on_a_merged_sample_dimension_matches_the_reference():
    torch.manual_seed(0)
    model = WindowedUnknownOp().double()
    x, y = torch.randn(3, 12, 5, dtype=torch.float64), torch.randint(0, 2, (3,))
    dp, _ = assert_matches_reference(model, F.cross_entropy, x, y, max_grad_norm=0.1)
    assert any(r["rule"] == "Fallback" for r in dp.plan() if "p" in r["params"])


def test_swin_windowed_attention_with_its_relative_position_bias_matches_the_reference():
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)

    class Swin(nn.Module):
        def __init__(self):
            super().__init__()
            config = transformers.SwinConfig(
                image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
                num_labels=3, hidden_dropout_prob=0, attention_probs_dropout_prob=0, drop_path_rate=0,
            )
            self.m = transformers.SwinForImageClassification(config)

        def forward(self, x):
            return self.m(pixel_values=x).logits

    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.randint(0, 3, (3,))
    assert_matches_reference(Swin().double(), F.cross_entropy, x, y, method="loop", max_grad_norm=0.1)
