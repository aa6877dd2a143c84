"""`bkfx.make_private`: a model, an optimizer and data made ready for DP-SGD in one call.

    model, optimizer, loader, accountant = bkfx.make_private(
        model, optimizer, train_set, target_epsilon=3.0, target_delta=1e-5, epochs=10,
        max_grad_norm=1.0, batch_size=64)
    for x, y in loader:                 # Poisson-sampled logical batches
        F.cross_entropy(model(x), y).backward()
        optimizer.step()                # clipped sum + N(0, σ²R²), / (q N), then the step
        optimizer.zero_grad()
    accountant.epsilon(1e-5)            # ≤ 3.0 after `epochs` epochs

The pieces are the public ones, wired together: `bkfx.compile` (with
`sum_clipped_gradients` on), `bkfx.DPOptimizer`, `bkfx.training.data.poisson_loader` (and
`PhysicalBatches` when `max_physical_batch_size` bounds memory), `bkfx.training.accounting.Accountant`.
With `target_epsilon`, the noise multiplier is the smallest that keeps
`epochs × round(1/q)` steps at sample rate q within (target_epsilon, target_delta).
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from bkfx.dpmodel import DPModel, compile
from bkfx.errors import PoissonSamplingWarning
from bkfx.training.accounting import (
    METHODS,
    Accountant,
    check_noise_multiplier,
    check_sample_rate,
    noise_multiplier_for,
)
from bkfx.training.adaptive import AdaptiveClipping, gradient_noise_multiplier
from bkfx.training.data import PhysicalBatches, PoissonSampler, check_physical_batch_size, poisson_loader
from bkfx.training.optimizer import DPOptimizer

__all__ = ["PrivateTraining", "make_private"]


class PrivateTraining(NamedTuple):
    """What `make_private` returns; unpacks as `model, optimizer, loader, accountant`."""

    model: DPModel
    optimizer: DPOptimizer
    loader: DataLoader | PhysicalBatches
    accountant: Accountant


def make_private(
    model: nn.Module, optimizer: torch.optim.Optimizer, data, *, target_epsilon: float | None = None,
    noise_multiplier: float | None = None, target_delta: float | None = None, epochs: int | None = None,
    max_grad_norm, clipping: str = "abadi", style="all-layer", batch_size: int | None = None,
    sample_rate: float | None = None, loss_reduction: str = "mean", max_physical_batch_size: int | None = None,
    seed: int | None = None, accountant: str = "rdp", adaptive_clipping: AdaptiveClipping | None = None,
    max_batch_size: int | None = None, pad_to_multiple_of: int | None = None, **compile_options,
) -> PrivateTraining:
    """Compile `model`, wrap `optimizer` and Poisson-sample `data` for (ε, δ)-DP training.

    data: a Dataset, or a DataLoader (its dataset, collate_fn, num_workers and pin_memory
        are kept; its batch_size is the expected batch size unless batch_size or
        sample_rate is given). A DataLoader's own batching, shuffled or in order, is
        replaced by Poisson sampling, with a `PoissonSamplingWarning` (none for a
        `poisson_loader`).
    target_epsilon | noise_multiplier: exactly one. target_epsilon needs target_delta and
        epochs, and sets σ = `noise_multiplier_for(target_epsilon, q, epochs × round(1/q), δ)`.
    batch_size | sample_rate: the expected logical batch size B, or q = B / N.
    max_grad_norm, clipping, style, loss_reduction, **compile_options: as `bkfx.compile`;
        loss_reduction is the reduction of your loss (the optimizer gets sums regardless).
    max_physical_batch_size: split each logical batch into physical batches of at most
        this many examples; the loader then yields physical batches and the optimizer
        steps once per logical batch (call step()/zero_grad() after every batch as usual).
    seed: makes the batches and the noise reproducible (two independent streams). Data parallel
        (torch.distributed initialised): every rank passes the same seed and gets its shard of the
        global Poisson batch; `batch_size` is the global expected batch size.
    accountant: "rdp" or "pld", for both the noise calibration and the accountant.
    max_batch_size, pad_to_multiple_of: fixed-shape batches (truncated Poisson sampling, padded;
        see `bkfx.poisson_loader`); the accountant adds the truncation probability to δ.
    adaptive_clipping: a `bkfx.AdaptiveClipping`: R follows a quantile of the norms (max_grad_norm
        is its start unless `initial` is given). noise_multiplier is then the gradient's z_Δ; with
        target_epsilon, the calibrated σ is the combined z of gradient and count, and
        z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (`bkfx.training.adaptive`), so the pair meets the target.
    """
    _check_arguments(model, optimizer, target_epsilon, noise_multiplier, target_delta, epochs, accountant,
                     max_physical_batch_size)

    dataset, loader_options = _dataset_of(data)
    if batch_size is None and sample_rate is None and isinstance(data, DataLoader):
        batch_size = data.batch_size
    sample_rate = _sample_rate(len(dataset), batch_size, sample_rate)
    expected_batch_size = batch_size if batch_size is not None else sample_rate * len(dataset)

    sampling_seed, noise_seed = (None, None) if seed is None else np.random.SeedSequence(seed).generate_state(2)
    shard = {}
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # data parallel: this rank's shard
        shard = {"rank": torch.distributed.get_rank(), "world_size": torch.distributed.get_world_size()}
    loader = poisson_loader(
        dataset, sample_rate, seed=None if sampling_seed is None else int(sampling_seed), **shard, **loader_options,
        max_batch_size=max_batch_size, pad_to_multiple_of=pad_to_multiple_of,
    )
    if target_epsilon is not None:
        steps = epochs * len(loader)
        # truncation: the untruncated mechanism must meet δ − (1 + e^ε)·T·p (`bkfx.training.accounting._epsilon_of`)
        sampler_delta = target_delta - (1 + math.exp(target_epsilon)) * steps * loader.batch_sampler.truncation_probability
        if not sampler_delta > 0:
            raise ValueError(f"max_batch_size={max_batch_size} truncates too often for target_delta={target_delta}: "
                             f"P[batch > max_batch_size] = {loader.batch_sampler.truncation_probability:.3g} a step; "
                             "raise max_batch_size (a few standard deviations above the expected batch size)")
        noise_multiplier = noise_multiplier_for(target_epsilon, sample_rate, steps, sampler_delta, accountant)
        if adaptive_clipping is not None:  # the calibrated σ is the pair's: the gradient gets z_Δ
            noise_multiplier = gradient_noise_multiplier(noise_multiplier, adaptive_clipping.count_noise_multiplier)

    dp_model = compile(
        model, max_grad_norm=max_grad_norm, clipping=clipping, style=style, loss_reduction=loss_reduction,
        **compile_options,
    )
    account = Accountant(accountant)
    dp_optimizer = DPOptimizer(
        optimizer, noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size,
        seed=None if noise_seed is None else int(noise_seed), model=dp_model, accountant=account,
        sample_rate=sample_rate, adaptive_clipping=adaptive_clipping,
    )
    if max_physical_batch_size is not None:
        loader = PhysicalBatches(loader, max_physical_batch_size, dp_optimizer)
    return PrivateTraining(dp_model, dp_optimizer, loader, account)


def _check_arguments(model, optimizer, target_epsilon, noise_multiplier, target_delta, epochs, accountant,
                     max_physical_batch_size) -> None:
    """make_private's arguments, each checked before anything is built."""
    if isinstance(model, DPModel):
        raise ValueError("make_private compiles the model itself: pass the original nn.Module, not a DPModel")
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("pass exactly one of target_epsilon= (σ is then calibrated) and noise_multiplier=")
    if accountant not in METHODS:
        raise ValueError(f"accountant must be one of {METHODS}, got {accountant!r}")
    if target_delta is not None and not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
    if epochs is not None and (int(epochs) != epochs or epochs <= 0):
        raise ValueError(f"epochs must be a positive integer, got {epochs}")
    if target_epsilon is not None:
        if target_delta is None or epochs is None:
            raise ValueError("target_epsilon needs target_delta= and epochs= to calibrate the noise")
        if not target_epsilon > 0:
            raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    else:
        check_noise_multiplier(noise_multiplier)
    if max_physical_batch_size is not None:
        check_physical_batch_size(max_physical_batch_size)
    _check_optimizer(model, optimizer)


def _check_optimizer(model: nn.Module, optimizer) -> None:
    if isinstance(optimizer, DPOptimizer):
        raise ValueError("make_private wraps the optimizer itself: pass the torch.optim optimizer, not a DPOptimizer")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("the optimizer updates parameters that are not the model's; build it from model.parameters()")


def _dataset_of(data) -> tuple:
    """The dataset behind `data` and the DataLoader options that carry over to the Poisson loader."""
    if isinstance(data, DataLoader):
        _warn_batching_replaced(data)
        # without automatic batching (batch_size=None) the loader's collate_fn converts single examples
        collate_fn = data.collate_fn if data.batch_sampler is not None else None
        options = {"num_workers": data.num_workers, "pin_memory": data.pin_memory, "collate_fn": collate_fn}
        data = data.dataset
    else:
        options = {}
    if isinstance(data, IterableDataset) or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ValueError(f"data must be a map-style Dataset (with __len__ and __getitem__) or a DataLoader over one, "
                         f"got {type(data).__name__}")
    return data, options


def _warn_batching_replaced(loader: DataLoader) -> None:
    """A loader's own batches (shuffled or in order, of a fixed size) are not what the accounting
    assumes: make_private draws Poisson batches instead, and says so (a Poisson loader's are kept
    in kind: no warning)."""
    if isinstance(loader.batch_sampler, PoissonSampler):
        return
    sampler = type(loader.sampler).__name__
    how = {"RandomSampler": "shuffled (shuffle=True) ", "SequentialSampler": "in-order (shuffle=False) "}.get(sampler, "")
    warnings.warn(
        f"make_private replaces the DataLoader's {how}batches ({sampler}, batch_size={loader.batch_size}) by Poisson "
        "sampling: every logical batch holds each example independently with probability q = batch_size / N, so "
        "batch sizes vary (0 is possible) and an epoch is round(1/q) steps; the privacy accounting assumes exactly "
        "this. Only the loader's dataset, collate_fn, num_workers and pin_memory are kept. To silence this, pass the "
        "dataset with batch_size= (or a bkfx.poisson_loader)",
        PoissonSamplingWarning, stacklevel=4,
    )


def _sample_rate(num_samples: int, batch_size: int | None, sample_rate: float | None) -> float:
    """q from exactly one of the expected batch size (q = B / N) and the sample rate."""
    if num_samples == 0:
        raise ValueError("the dataset is empty")
    if (batch_size is None) == (sample_rate is None):
        raise ValueError("pass exactly one of batch_size= (the expected logical batch size) and sample_rate=")
    if batch_size is not None:
        if not 0 < batch_size <= num_samples:
            raise ValueError(f"batch_size must be in [1, {num_samples}] (the dataset's size), got {batch_size}")
        return batch_size / num_samples
    check_sample_rate(sample_rate)
    return float(sample_rate)
