"""Checkpoints of a DP-SGD run: stop it, resume it, and spend no privacy twice.

    bkfx.save_checkpoint(path, model=model, optimizer=optimizer, loader=loader, scheduler=schedule,
                         extra={"epoch": epoch})            # after optimizer.step()
    extra = bkfx.load_checkpoint(path, model=model, optimizer=optimizer, loader=loader, scheduler=schedule)

A checkpoint holds the model's parameters and buffers, the `DPOptimizer`'s state (the wrapped
optimizer's, its step count, every device's noise generator or secure mode's key, and its
accountant), the Poisson sampler's position (its generator at the start of the epoch in
progress and the batches of that epoch already delivered, `bkfx.training.data.PoissonSampler`), an LR
scheduler's state, the global RNGs (torch's on every device, numpy's, Python's: dropout and
other randomness of the model), and `extra`, a dict of your own.

Why the privacy accounting stays right: a run resumed from the checkpoint of step k redoes
steps k+1, k+2, ... with the same logical batches (the sampler's position) and the same noise
(the generators' state), from the same parameters and optimizer state, so a step the killed
run took after its last checkpoint is computed again, not released anew, and the accountant,
restored to step k, counts each step once. Whoever holds a checkpoint can recompute the noise of
the steps after it: keep checkpoints as private as the training data and release only the final
model. The file is written to a temporary name and renamed, so a run killed while saving leaves
the previous checkpoint whole.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from bkfx.training.data import PhysicalBatches, PoissonSampler
from bkfx.training.optimizer import DPOptimizer

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "poisson_sampler_of"]

FORMAT = 1


def save_checkpoint(
    path, *, model, optimizer, loader=None, accountant=None, scheduler=None, extra: dict | None = None,
) -> None:
    """Write the run's state to `path` (atomically). Call it between logical batches, after
    `optimizer.step()`: `.grad` is not saved, so a batch half accumulated would be lost.

    loader: a `bkfx.poisson_loader`, `PhysicalBatches` over one, or a `PoissonSampler`.
    accountant: only when it is not the optimizer's own (which the optimizer's state holds).
    """
    if isinstance(optimizer, DPOptimizer) and not optimizer.logical_batch_complete:
        raise ValueError("save_checkpoint in the middle of a logical batch: the clipped sums accumulated in .grad "
                         "are not saved. Save after the optimizer.step() that ends a logical batch "
                         "(when optimizer.logical_batch_complete is True)")
    state = {"format": FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state()}
    if loader is not None:
        state["sampler"] = poisson_sampler_of(loader).state_dict()
    if accountant is not None and accountant is not getattr(optimizer, "accountant", None):
        state["accountant"] = accountant.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["extra"] = {} if extra is None else dict(extra)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def load_checkpoint(
    path, *, model, optimizer, loader=None, accountant=None, scheduler=None, map_location=None,
    weights_only: bool = True,
) -> dict:
    """Restore what `save_checkpoint` wrote into the same kinds of objects, built as for the
    original run; returns its `extra`. Every piece saved must be given (and nothing unsaved),
    so that no part of the run silently starts over."""
    state = torch.load(path, map_location=map_location, weights_only=weights_only)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a bkfx checkpoint (written by bkfx.save_checkpoint)")
    own_accountant = accountant is not None and accountant is getattr(optimizer, "accountant", None)
    for name, given in (("sampler", loader), ("scheduler", scheduler),
                        ("accountant", None if own_accountant else accountant)):
        if (given is None) != (name not in state):
            what = "loader" if name == "sampler" else name
            raise ValueError(f"the checkpoint {'has' if name in state else 'has no'} {name} state but "
                             f"{what}= was {'not ' if given is None else ''}given: pass the same pieces as to "
                             "save_checkpoint")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if loader is not None:
        poisson_sampler_of(loader).load_state_dict(state["sampler"])
    if "accountant" in state:
        accountant.load_state_dict(state["accountant"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["extra"]


def poisson_sampler_of(loader) -> PoissonSampler:
    """The `PoissonSampler` that draws `loader`'s logical batches."""
    if isinstance(loader, PhysicalBatches):
        loader = loader.loader
    if isinstance(loader, DataLoader):
        loader = loader.batch_sampler
    if not isinstance(loader, PoissonSampler):
        raise ValueError(f"loader must be a bkfx.poisson_loader, PhysicalBatches over one, or a PoissonSampler "
                         f"(its position is what is saved), got {type(loader).__name__}")
    return loader


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    random.setstate(rng["python"])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
