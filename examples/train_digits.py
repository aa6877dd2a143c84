"""DP-SGD with bkfx on scikit-learn's handwritten digits (8x8 images, 10 classes), to a target ε.

    python examples/train_digits.py                        # ε = 3, δ = 1e-5, 30 epochs
    python examples/train_digits.py --target-epsilon 1     # more noise, lower accuracy
    python examples/train_digits.py --style layer-wise --clipping automatic
    python examples/train_digits.py --compile              # forward+loss under torch.compile(fullgraph=True)
    torchrun --nproc_per_node 2 examples/train_digits.py --distributed   # data parallel, same ε
    torchrun --nproc_per_node 2 examples/train_digits.py --distributed --fsdp   # parameters sharded (FSDP2)

A small CNN (Conv2d + GroupNorm + ReLU blocks, then Linear; GroupNorm because batch
norm mixes samples) is an ordinary nn.Module. `bkfx.make_private` compiles it so that
backward leaves clipped per-sample gradient sums in `.grad`, wraps the optimizer to add
Gaussian noise once per step, Poisson-samples the training set, and calibrates the noise
multiplier so that the whole run is (ε, δ)-DP. The loop below is the non-private one.
Each epoch prints ε spent so far and test accuracy; a plot of accuracy against ε goes to
examples/results/, and the run ends with the privacy report (ε by RDP and by PLD, σ, q, steps).

`--distributed` (under torchrun) trains data parallel with the same global batch, noise and ε:
each rank runs the model on its shard of every Poisson batch, the DP optimizer sums the clipped
gradients over the ranks and adds the noise once (rank 0 draws it), so every rank holds the same
parameters. Rank 0 prints and plots. `--fsdp` also shards the parameters and the optimizer state
(`fully_shard` of each block and of the model, on a 1-D CPU mesh) before the model is made private.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from tqdm import tqdm

import bkfx

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class DigitsCNN(nn.Module):
    def __init__(self, channels: int = 16):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU())

        self.features = nn.Sequential(block(1, channels), nn.AvgPool2d(2), block(channels, 2 * channels), nn.AvgPool2d(2))
        self.classifier = nn.Linear(2 * channels * 2 * 2, 10)

    def forward(self, x):  # x: [B, 1, 8, 8]
        return self.classifier(self.features(x).flatten(1))


def load_digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return TensorDataset(xtr, ytr), xte, yte


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def plot(curve, delta: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps, acc = zip(*curve)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(eps, acc, marker="o")
    ax.set_xlabel(f"ε spent (δ = {delta:g})")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description="DP-SGD on sklearn digits with bkfx.make_private")
    ap.add_argument("--target-epsilon", type=float, default=3.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256, help="expected logical batch size (Poisson sampling)")
    ap.add_argument("--max-physical-batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=2.0, help="initial learning rate, cosine-annealed to 0")
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--clipping", default="abadi", choices=["abadi", "automatic"])
    ap.add_argument("--style", default="all-layer", choices=["all-layer", "layer-wise", "param-wise"])
    ap.add_argument("--accountant", default="rdp", choices=["rdp", "pld"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help="where to save the plot (default examples/results/digits_eps<ε>.png)")
    ap.add_argument("--distributed", action="store_true", help="data parallel over torchrun's processes (gloo)")
    ap.add_argument("--fsdp", action="store_true", help="with --distributed: shard the model with FSDP2's fully_shard")
    ap.add_argument("--compile", action="store_true",
                    help="forward and loss as one torch.compile(fullgraph=True) graph, bkfx's BK step compiled inside")
    args = ap.parse_args(argv)

    if args.distributed:  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
        torch.distributed.init_process_group("gloo")
    lead = not args.distributed or torch.distributed.get_rank() == 0
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    train_set, xte, yte = load_digits(args.seed)
    model = DigitsCNN()
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not args.distributed:
            ap.error("--fsdp needs --distributed (under torchrun)")
        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for block in [*model.features, model.classifier]:
            if any(True for _ in block.parameters()):
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    private = bkfx.make_private(
        model, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum), train_set,
        target_epsilon=args.target_epsilon, target_delta=args.delta, epochs=args.epochs,
        max_grad_norm=args.max_grad_norm, clipping=args.clipping, style=args.style, batch_size=args.batch_size,
        max_physical_batch_size=args.max_physical_batch_size, seed=args.seed, accountant=args.accountant,
    )
    dp_model, optimizer, loader, accountant = private
    if lead:
        ranks = f" over {torch.distributed.get_world_size()} processes" if args.distributed else ""
        print(f"{len(train_set)} training images, expected batch {args.batch_size}{ranks} (sample rate "
              f"{args.batch_size / len(train_set):.4f}), {args.epochs} epochs: noise multiplier "
              f"{optimizer.noise_multiplier:.3f} for ε = {args.target_epsilon} at δ = {args.delta} ({args.accountant})")

    # schedulers take the wrapped torch optimizer, whose param_groups the DP optimizer steps
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer.optimizer, T_max=args.epochs)
    curve = []
    progress = tqdm(total=args.epochs * len(loader) if hasattr(loader, "__len__") else None, unit="step",
                    dynamic_ncols=True, disable=not lead)
    def forward_and_loss(x, y):
        return F.cross_entropy(dp_model(x), y)

    if args.compile:  # one graph for every (Poisson-drawn) batch size
        forward_and_loss = torch.compile(forward_and_loss, fullgraph=True, dynamic=True)
    for epoch in range(1, args.epochs + 1):
        for x, y in loader:
            loss = forward_and_loss(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        schedule.step()
        eps, acc = accountant.epsilon(args.delta), accuracy(model, xte, yte)
        curve.append((eps, acc))
        if lead:
            progress.write(f"epoch {epoch:3d}  ε {eps:6.3f}  test accuracy {acc:.3f}")
    progress.close()
    if args.distributed:
        torch.distributed.destroy_process_group()
    if not lead:
        return

    path = args.plot or os.path.join(RESULTS, f"digits_eps{args.target_epsilon:g}.png")
    plot(curve, args.delta, path, f"bkfx DP-SGD on digits: {args.style}, {args.clipping}, target ε {args.target_epsilon:g}, "
                      f"δ {args.delta:g}")
    print(f"done in {time.perf_counter() - start:.1f}s: test accuracy {curve[-1][1]:.3f} at ε {curve[-1][0]:.3f} "
          f"(δ {args.delta:g}, σ {optimizer.noise_multiplier:.3f}, R {args.max_grad_norm}); plot: {path}")
    print(bkfx.privacy_report(accountant, delta=args.delta))


if __name__ == "__main__":
    main()
