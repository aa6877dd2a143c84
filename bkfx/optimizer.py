"""`DPOptimizer`: Gaussian noise once per logical step, then any torch.optim optimizer.

It expects `.grad` to hold the *sum* of clipped per-sample gradients, accumulated over
as many forward/backward calls as the logical batch needs: pass the compiled model as
`model=` (it then writes sums whatever its loss reduction), or compile with
`loss_reduction="sum"`. On `step()` it sets

    grad = (Σ_i C_i G_i + N(0, (σ R)² I)) / expected_batch_size

before stepping. R is the total clipping norm of the style (`sqrt(Σ_g R_g²)` for groups).
"""
from __future__ import annotations

import math

import torch


class DPOptimizer:
    def __init__(
        self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm, expected_batch_size: int,
        generator: torch.Generator | None = None, seed: int | None = None, model=None,
    ):
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be positive, got {expected_batch_size}")
        self.optimizer = optimizer
        if model is not None:
            model.sum_clipped_gradients = True
        self.noise_multiplier = float(noise_multiplier)
        norms = [max_grad_norm] if isinstance(max_grad_norm, (int, float)) else list(max_grad_norm)
        self.max_grad_norm = math.sqrt(sum(float(r) ** 2 for r in norms))
        self.expected_batch_size = expected_batch_size
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(seed if seed is not None else torch.seed())
        self.generator = generator
        self.steps = 0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm

    def add_noise(self) -> None:
        """`.grad ← (.grad + N(0, σ²R²)) / expected_batch_size` for every trainable parameter."""
        std = self.noise_std
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                summed = p.grad if p.grad is not None else torch.zeros_like(p)
                noise = torch.normal(0.0, std, p.shape, generator=self.generator, dtype=p.dtype).to(p.device) if std else 0.0
                p.grad = (summed + noise) / self.expected_batch_size

    def step(self, closure=None):
        self.add_noise()
        self.steps += 1
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]
