"""Poisson sampling, empty batches and physical batches (bkfx.training.data)."""
from __future__ import annotations

import math
from collections import namedtuple

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

import bkfx
from bkfx.training.data import PhysicalBatches, PoissonSampler, poisson_loader, split_physical_batches

# Tolerances below are 5 standard errors of the statistic's sampling distribution
# (a false failure about once in 3.5 million runs; the generators are seeded anyway).
Z = 5.0


def test_sampler_length_is_one_epoch_and_indices_are_valid():
    sampler = PoissonSampler(1000, 0.03, seed=0)
    assert len(sampler) == round(1 / 0.03) == 33
    batches = list(sampler)
    assert len(batches) == 33
    for b in batches:
        assert b == sorted(set(b)) and all(0 <= i < 1000 for i in b)
    assert PoissonSampler(10, 1.0, seed=0).__len__() == 1 and list(PoissonSampler(10, 1.0, seed=0)) == [list(range(10))]
    assert sampler.expected_batch_size == pytest.approx(30.0)


def test_sampler_is_reproducible_and_epochs_differ():
    a, b = PoissonSampler(500, 0.1, seed=7), PoissonSampler(500, 0.1, seed=7)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    assert list(a) != first_a  # the next epoch continues the stream
    assert list(PoissonSampler(500, 0.1, seed=8)) != first_a


def test_batch_sizes_are_binomial():
    # Poisson sampling: |batch| ~ Binomial(N, q), mean N q, variance N q (1 - q) — not a fixed size.
    N, q, steps = 400, 0.05, 4000
    sampler = PoissonSampler(N, q, steps=steps, seed=1)
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    mean, var = N * q, N * q * (1 - q)
    assert abs(sizes.mean().item() - mean) <= Z * math.sqrt(var / steps)
    # the sample variance has standard error ≈ var · sqrt(2/(n-1)) (near-normal sizes, N q = 20)
    assert abs(sizes.var().item() - var) <= Z * var * math.sqrt(2 / (steps - 1))
    # each example is included in a fraction q of the steps
    counts = torch.zeros(N)
    for b in PoissonSampler(N, q, steps=steps, seed=2):
        counts[b] += 1
    assert (counts / steps - q).abs().max().item() <= Z * math.sqrt(q * (1 - q) / steps)


def test_empty_batches_are_zero_row_tensors():
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    loader = poisson_loader(TensorDataset(x, y), 0.01, steps=200, seed=0)
    batches = list(loader)
    sizes = [len(b[1]) for b in batches]
    assert 0 in sizes and max(sizes) >= 1
    for xb, yb in batches:
        assert xb.shape[1:] == (1, 8, 8) and xb.dtype == torch.float32
        assert yb.dtype == torch.long and yb.shape == (xb.shape[0],)
    empty = next(b for b in batches if len(b[1]) == 0)
    assert empty[0].shape == (0, 1, 8, 8) and empty[1].shape == (0,)


Example = namedtuple("Example", ["image", "label"])


class Records(Dataset):
    """Examples as dicts and named tuples with Python numbers and strings, as users write them."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"pixels": torch.full((2, 3), float(i)), "pair": Example(torch.arange(4) + i, i), "name": f"n{i}",
                "weight": 0.5 * i}


def test_empty_batch_keeps_the_structure_of_any_batch():
    one = bkfx.training.data.EmptyBatchCollate(Records())
    full = one([Records()[0], Records()[1]])
    empty = one([])
    assert set(empty) == set(full)
    assert empty["pixels"].shape == (0, 2, 3) and empty["pixels"].dtype == full["pixels"].dtype
    assert isinstance(empty["pair"], Example)
    assert empty["pair"].image.shape == (0, 4) and empty["pair"].label.shape == (0,)
    assert empty["pair"].label.dtype == full["pair"].label.dtype == torch.long
    assert empty["weight"].dtype == torch.float64 and empty["weight"].shape == (0,)
    assert empty["name"] == [] and full["name"] == ["n0", "n1"]


def test_split_physical_batches():
    x, y = torch.arange(11.0).reshape(11, 1), torch.arange(11)
    parts = list(split_physical_batches((x, y), 4))
    assert [len(p[1]) for p in parts] == [4, 4, 3]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert [len(p["y"]) for p in split_physical_batches({"x": x, "y": y}, 11)] == [11]
    empty = list(split_physical_batches((x[:0], y[:0]), 4))
    assert len(empty) == 1 and empty[0][0].shape == (0, 1)
    with pytest.raises(ValueError, match="first"):
        list(split_physical_batches((x, y[:3]), 4))
    with pytest.raises(ValueError, match="positive"):
        list(split_physical_batches((x, y), 0))


def test_physical_batches_tell_the_optimizer_where_logical_batches_end():
    ds = TensorDataset(torch.randn(40, 2), torch.zeros(40))
    loader = poisson_loader(ds, 0.5, steps=6, seed=3)
    logical = [len(b[0]) for b in poisson_loader(ds, 0.5, steps=6, seed=3)]

    class Recorder:
        logical_batch_complete = True

    opt = Recorder()
    seen = [(len(b[0]), opt.logical_batch_complete) for b in PhysicalBatches(loader, 7, opt)]
    expected = [
        (min(7, n - start), start + 7 >= n) for n in logical for start in range(0, max(n, 1), 7)
    ]
    assert seen == expected
    assert opt.logical_batch_complete  # reset when the pass ends


def test_compiled_model_runs_poisson_batches_of_any_size_on_one_capture():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    dp = bkfx.compile(model)
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    loader = poisson_loader(TensorDataset(x, y), 0.2, steps=60, seed=0)
    dp(x)  # the first call captures, and needs a sample
    sizes = set()
    for xb, yb in loader:
        out = dp(xb)
        assert out.shape == (len(yb), 10)
        if len(yb):
            torch.testing.assert_close(out, model(xb))
        sizes.add(len(yb))
    assert {0, 1} <= sizes and max(sizes) >= 3
    assert dp.capture_count == 1


def test_poisson_loader_rejects_fixed_batch_options():
    with pytest.raises(ValueError, match="batch_size"):
        poisson_loader(TensorDataset(torch.zeros(4)), 0.5, batch_size=2)
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonSampler(10, 0.0)
