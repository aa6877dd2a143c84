"""Checkpoint and resume: a run killed mid-epoch and resumed ends with the parameters of the run
that was never interrupted, and its accountant counts every step once.

Run as a program, this module is the training run the test starts in subprocesses:
    python tests/test_checkpoint.py RUN_DIR [--every K] [--kill-at STEP]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import bkfx
from bkfx.training.data import PoissonSampler, poisson_loader

EPOCHS, N, BATCH = 3, 48, 8  # 6 logical batches an epoch, 18 steps


def _digest(model) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]


def train(run_dir: Path, every: int, kill_at: int | None) -> None:
    """Poisson batches split into physical batches, dropout, momentum, an LR schedule on the
    DPOptimizer; a checkpoint every `every` steps; SIGKILL right after step `kill_at`."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g))
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3)).double()
    model, optimizer, loader, accountant = bkfx.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), data, noise_multiplier=1.0,
        max_grad_norm=1.0, batch_size=BATCH, max_physical_batch_size=3, seed=7,
    )
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    checkpoint = run_dir / "checkpoint.pt"
    pieces = dict(model=model, optimizer=optimizer, loader=loader, scheduler=schedule)
    if checkpoint.exists():
        extra = bkfx.load_checkpoint(checkpoint, **pieces)
        print(f"resumed {optimizer.steps} {accountant.steps} {extra['step']}", flush=True)
    sampler = bkfx.training.checkpoint.poisson_sampler_of(loader)
    for _ in range(sampler.epoch, EPOCHS):
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            if not optimizer.logical_batch_complete:
                continue
            schedule.step()
            print(f"step {optimizer.steps} {_digest(model)}", flush=True)
            if optimizer.steps % every == 0:
                bkfx.save_checkpoint(checkpoint, **pieces, extra={"step": optimizer.steps})
            if optimizer.steps == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    torch.save({"params": [p.detach() for p in model.parameters()], "accountant": accountant.state_dict()},
               run_dir / "final.pt")


def _start(run_dir: Path, *args: str) -> subprocess.Popen:
    run_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, str(run_dir), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _steps(output: str) -> dict[int, str]:
    return {int(n): digest for _, n, digest in (line.split() for line in output.splitlines() if line.startswith("step "))}


def test_killed_run_resumes_to_the_uninterrupted_run(tmp_path):
    whole = _start(tmp_path / "whole", "--every", "4")
    killed = _start(tmp_path / "killed", "--every", "4", "--kill-at", "10")
    whole_out, whole_err = whole.communicate(timeout=120)
    killed_out, killed_err = killed.communicate(timeout=120)
    assert whole.returncode == 0, whole_err
    assert killed.returncode == -signal.SIGKILL, killed_err
    killed_steps = _steps(killed_out)
    assert max(killed_steps) == 10  # steps 9 and 10 were taken after the last checkpoint (step 8), mid-epoch 2

    resumed = subprocess.run([sys.executable, __file__, str(tmp_path / "killed"), "--every", "4"], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    first = resumed.stdout.splitlines()[0]
    assert first == "resumed 8 8 8"  # optimizer and accountant both at the checkpoint's step
    resumed_steps = _steps(resumed.stdout)
    assert sorted(resumed_steps) == list(range(9, EPOCHS * N // BATCH + 1))
    # the steps the killed run took after its checkpoint are redone bit for bit: same batches, same noise
    assert resumed_steps[9] == killed_steps[9] and resumed_steps[10] == killed_steps[10]
    whole_steps = _steps(whole_out)
    assert all(resumed_steps[k] == whole_steps[k] for k in resumed_steps)

    want, got = torch.load(tmp_path / "whole" / "final.pt"), torch.load(tmp_path / "killed" / "final.pt")
    assert all(torch.equal(a, b) for a, b in zip(want["params"], got["params"]))
    spent, whole_spent = bkfx.Accountant(), bkfx.Accountant()
    spent.load_state_dict(got["accountant"])
    whole_spent.load_state_dict(want["accountant"])
    assert spent.steps == whole_spent.steps == EPOCHS * N // BATCH  # each step counted once, none missed
    assert spent.history == whole_spent.history and spent.epsilon(1e-5) == whole_spent.epsilon(1e-5)


def test_sampler_resumes_mid_epoch_with_the_remaining_batches():
    sampler = PoissonSampler(40, 0.2, seed=3)
    whole = [list(sampler) for _ in range(2)]
    sampler = PoissonSampler(40, 0.2, seed=3)
    it = iter(sampler)
    taken = [next(it) for _ in range(3)]
    state = sampler.state_dict()
    assert (state["epoch"], state["batches_done"]) == (0, 3)
    resumed = PoissonSampler(40, 0.2, seed=99)
    resumed.load_state_dict(state)
    assert taken + list(resumed) == whole[0] and list(resumed) == whole[1]
    assert resumed.epoch == 2
    sampler = PoissonSampler(40, 0.2, seed=3)
    it = iter(sampler)
    next(it)
    assert list(sampler) == whole[0][1:]  # a pass stopped early is continued, not restarted


def test_loader_with_workers_counts_the_batches_the_loop_received():
    data = TensorDataset(torch.arange(30.0))
    loader = poisson_loader(data, 0.25, seed=5, num_workers=1, prefetch_factor=3)
    whole = [b[0].tolist() for b in poisson_loader(data, 0.25, seed=5)]
    batches = iter(loader)
    got = [next(batches)[0].tolist() for _ in range(2)]  # the worker has drawn more
    state = loader.batch_sampler.state_dict()
    assert state["batches_done"] == 2
    del batches
    resumed = poisson_loader(data, 0.25, seed=0)
    resumed.batch_sampler.load_state_dict(state)
    assert got + [b[0].tolist() for b in resumed] == whole


def test_checkpoint_refuses_half_a_logical_batch_and_missing_pieces(tmp_path):
    model = nn.Linear(3, 2)
    dp, opt, loader, acc = bkfx.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                             TensorDataset(torch.randn(12, 3), torch.randint(0, 2, (12,))),
                                             noise_multiplier=1.0, max_grad_norm=1.0, batch_size=6,
                                             max_physical_batch_size=2, seed=0)
    opt.logical_batch_complete = False
    with pytest.raises(ValueError, match="middle of a logical batch"):
        bkfx.save_checkpoint(tmp_path / "c.pt", model=dp, optimizer=opt, loader=loader)
    opt.logical_batch_complete = True
    bkfx.save_checkpoint(tmp_path / "c.pt", model=dp, optimizer=opt, loader=loader, extra={"epoch": 1})
    with pytest.raises(ValueError, match="loader= was not given"):
        bkfx.load_checkpoint(tmp_path / "c.pt", model=dp, optimizer=opt)
    with pytest.raises(ValueError, match="same dataset"):
        bkfx.load_checkpoint(tmp_path / "c.pt", model=dp, optimizer=opt, loader=PoissonSampler(13, 0.5))
    with pytest.raises(ValueError, match="poisson_loader"):
        bkfx.save_checkpoint(tmp_path / "c.pt", model=dp, optimizer=opt, loader=[1, 2])
    assert bkfx.load_checkpoint(tmp_path / "c.pt", model=dp, optimizer=opt, loader=loader) == {"epoch": 1}
    assert not (tmp_path / "c.pt.partial").exists()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    train(args.run_dir, args.every, args.kill_at)
