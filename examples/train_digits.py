"""DP-SGD with bkfx on scikit-learn's handwritten digits (8x8 images, 10 classes).

    python examples/train_digits.py                 # defaults: MLP, 20 epochs, noise 1.0, R 1.0
    python examples/train_digits.py --epochs 5 --noise-multiplier 2.0

The model is an ordinary nn.Module; `bkfx.compile` makes its backward pass leave the sum
of clipped per-sample gradients in `.grad`, and `bkfx.DPOptimizer` adds the Gaussian
noise and averages before each SGD step.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfx


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x):
        h = torch.tanh(self.norm(self.fc1(x.flatten(1))))
        h = h + torch.tanh(self.fc2(h))
        return self.out(h)


def load_digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description="DP-SGD on sklearn digits with bkfx")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--noise-multiplier", type=float, default=1.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_digits(args.seed)
    model = DigitsMLP()
    dp_model = bkfx.compile(model, max_grad_norm=args.max_grad_norm, loss_reduction="sum")
    optimizer = bkfx.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr), noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm, expected_batch_size=args.batch_size, seed=args.seed,
    )
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(xtr))
        for i in range(0, len(xtr), args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(dp_model(xtr[idx]), ytr[idx], reduction="sum")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        print(f"epoch {epoch:3d}  test accuracy {accuracy(model, xte, yte):.3f}  "
              f"median per-sample grad norm {dp_model.per_sample_norms.median().item():.3f}")
    print(f"done in {time.perf_counter() - start:.1f}s: test accuracy {accuracy(model, xte, yte):.3f} "
          f"(noise multiplier {args.noise_multiplier}, R {args.max_grad_norm}, batch {args.batch_size})")


if __name__ == "__main__":
    main()
