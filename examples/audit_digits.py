"""Audit the digits job (examples/train_digits.py) in one run: an ε lower bound beside the accountant's ε.

    python examples/audit_digits.py                  # DP-SGD at ε = 3: the bound stays below 3
    python examples/audit_digits.py --non-private    # σ = 0, no clipping: the bound exceeds 3

`--canaries` images of the training split get a wrong label (a class drawn uniformly among
the nine others) and leave the clean set; `bkfx.audit.one_run` includes each with
probability ½, trains the README's main job once on the clean set plus the included
canaries (the same CNN, loop and hyperparameters as train_digits.py), scores each canary by
minus its loss under the trained model and guesses "included" for the highest scores and
"excluded" for the lowest. A private run memorises few wrong labels, so its guesses are
near chance and the bound is small; a run without noise or clipping memorises them, and the
bound, valid for any (ε, δ)-DP run, refutes the ε that the private run's accountant states.
The score histograms go to examples/results/audit_digits_<private|non-private>.png.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import bkfx
from train_digits import RESULTS, DigitsCNN, accuracy, load_digits

PRIVATE = {"epochs": 30, "batch_size": 256, "lr": 2.0}  # train_digits.py's defaults
NON_PRIVATE = {"epochs": 100, "batch_size": 64, "lr": 0.5}


def digits_job(args, non_private: bool, xte, yte):
    """The training function one_run calls: train_digits.py's job on the set it is given."""

    def train(training_set):
        torch.manual_seed(args.seed)
        model = DigitsCNN()
        budget = ({"noise_multiplier": 0.0} if non_private else
                  {"target_epsilon": args.target_epsilon, "target_delta": args.delta, "epochs": args.epochs})
        dp_model, optimizer, loader, accountant = bkfx.make_private(
            model, torch.optim.SGD(model.parameters(), lr=args.lr), training_set, **budget,
            max_grad_norm=1e6 if non_private else args.max_grad_norm, batch_size=args.batch_size, seed=args.seed,
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer.optimizer, T_max=args.epochs)
        for _ in range(args.epochs):
            for x, y in loader:
                F.cross_entropy(dp_model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
            schedule.step()
        # what the private run's accountant says: its σ, calibrated for its batch size and epochs on this set
        q = PRIVATE["batch_size"] / len(training_set)
        steps = PRIVATE["epochs"] * len(bkfx.poisson_loader(training_set, q))
        sigma = bkfx.noise_multiplier_for(args.target_epsilon, q, steps, args.delta)
        train.private_epsilon = bkfx.epsilon(sigma, q, steps, args.delta)
        print(f"trained on {len(training_set)} images ({accountant.steps} steps, σ {optimizer.noise_multiplier:.3f}): "
              f"test accuracy {accuracy(model, xte, yte):.3f}")
        return model, accountant

    return train


def main(argv=None):
    ap = argparse.ArgumentParser(description="one-run privacy audit of DP-SGD on sklearn digits")
    ap.add_argument("--non-private", action="store_true", help="noise multiplier 0 and no clipping (R = 1e6)")
    ap.add_argument("--canaries", type=int, default=500, help="mislabeled training images used as canaries")
    ap.add_argument("--target-epsilon", type=float, default=3.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=int, default=None, help="default: 30 (private), 100 (non-private)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 256 (private), 64 (non-private)")
    ap.add_argument("--lr", type=float, default=None, help="default: 2.0 (private), 0.5 (non-private)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help="where to save the score histograms")
    args = ap.parse_args(argv)
    # the private run is train_digits.py's; without clipping, lr 2 diverges, and memorising takes more steps
    for name, default in (NON_PRIVATE if args.non_private else PRIVATE).items():
        if getattr(args, name) is None:
            setattr(args, name, default)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    train_set, xte, yte = load_digits(args.seed)
    rest, canaries = bkfx.audit.mislabeled_canaries(train_set, args.canaries, num_classes=10, seed=args.seed + 1)
    train = digits_job(args, args.non_private, xte, yte)
    report = bkfx.audit.one_run(train, rest, canaries, delta=args.delta, confidence=args.confidence,
                                seed=args.seed + 2)
    kind = "non-private" if args.non_private else "private"
    path = report.plot(args.plot or os.path.join(RESULTS, f"audit_digits_{kind}.png"),
                       title=f"digits, {kind} run: ε lower bound {report.epsilon_lower_bound:.2f}, "
                             f"accountant ε {report.epsilon:.2f}")
    print(report)
    print(f"ε lower bound {report.epsilon_lower_bound:.3f} vs accountant ε {report.epsilon:.3f} ({kind} run); "
          f"the private run's accountant ε is {train.private_epsilon:.3f}")
    if report.epsilon_lower_bound > train.private_epsilon:
        print("the audit refutes the private run's ε: this run leaks more than the private run may")
    print(f"done in {time.perf_counter() - start:.1f}s; plot: {path}")


if __name__ == "__main__":
    main()
