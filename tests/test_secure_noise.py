"""Secure mode's noise: exactly N(0, σ²R²) (KS test and moments over millions of draws), the
documented stream (four float64 draws from keyed-hash seeds, halved), unpredictable across
optimizers, and reproducible from a saved state (a resumed run redraws the same noise)."""
from __future__ import annotations

import hashlib
import math

import pytest
import scipy.stats as scipy_stats
import torch
from torch import nn

import bkfx
from bkfx.training.optimizer import NOISE_CHUNK, add_gaussian_noise_


LEVEL = 1e-6  # two-sided; the key is fixed, so the tests are deterministic too
Z = 5.33  # the normal quantile of 1 - LEVEL / 2, rounded up


def _secure_noise(n, std, key=b"k" * 64, device="cpu", dtype=torch.float64):
    t = torch.zeros(n, dtype=dtype, device=device)
    add_gaussian_noise_([t], std, torch.Generator(device=device), secure_key=key)
    return t


def test_secure_noise_is_gaussian():
    std, n = 1.7, 2_000_000
    x = _secure_noise(n, std).double() / std
    assert scipy_stats.kstest(x.numpy(), "norm").pvalue > LEVEL
    mean, var = x.mean().item(), x.var().item()
    assert abs(mean) < Z / math.sqrt(n)
    assert abs(var - 1) < Z * math.sqrt(2 / n)
    assert abs(scipy_stats.skew(x.numpy())) < Z * math.sqrt(6 / n)
    assert abs(scipy_stats.kurtosis(x.numpy())) < Z * math.sqrt(24 / n)  # excess kurtosis 0
    # float32 parameters get the same distribution (the float64 draw rounded once)
    assert scipy_stats.kstest((_secure_noise(n // 4, std, dtype=torch.float32).double() / std).numpy(),
                              "norm").pvalue > LEVEL


def test_secure_stream_is_the_documented_one(device):
    """Chunk k's seed: BLAKE2b(str(k), key) (8 bytes, top bit dropped); its noise: (z1+z2+z3+z4)/2,
    consecutive float64 randn draws from a generator seeded with it; chunk 1 spans two tensors."""
    key = bytes(range(32))
    sizes = [NOISE_CHUNK + 5, 3]
    tensors = [torch.zeros(s, dtype=torch.float64, device=device) for s in sizes]
    add_gaussian_noise_(tensors, 2.0, torch.Generator(device=device), secure_key=key)
    chunks = [[(0, 0, NOISE_CHUNK)], [(0, NOISE_CHUNK, NOISE_CHUNK + 5), (1, 0, 3)]]
    for k, segments in enumerate(chunks):
        seed = int.from_bytes(hashlib.blake2b(str(k).encode(), key=key, digest_size=8).digest(), "little") >> 1
        g = torch.Generator(device=device).manual_seed(seed)
        size = sum(stop - start for _, start, stop in segments)
        z = sum(torch.randn(size, generator=g, dtype=torch.float64, device=device) for _ in range(4))
        got = torch.cat([tensors[i][start:stop] for i, start, stop in segments])
        torch.testing.assert_close(got, 2.0 * (z / 2), rtol=0, atol=0)


def _optimizer(**options):
    p = nn.Parameter(torch.zeros(50_000, dtype=torch.float64))
    return p, bkfx.DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=2.0, max_grad_norm=0.5,
                               expected_batch_size=1, secure_mode=True, **options)


def _draw(p, opt):
    p.grad = torch.zeros_like(p)
    opt.add_noise()
    return p.grad.clone()


def test_secure_optimizer_noise_is_unpredictable_and_resumable():
    p, opt = _optimizer()
    first = _draw(p, opt)
    assert scipy_stats.kstest((first / opt.noise_std).numpy(), "norm").pvalue > LEVEL
    saved = opt.state_dict()
    second = _draw(p, opt)
    assert not torch.equal(first, second)  # a new key for every draw
    q, other = _optimizer()
    assert not torch.equal(_draw(q, other), first)  # each optimizer its own key, from the OS
    q, resumed = _optimizer()
    resumed.load_state_dict(saved)
    assert torch.equal(_draw(q, resumed), second)  # a resumed run redraws the steps it repeats


def test_secure_mode_refuses_seeds():
    with pytest.raises(ValueError, match="secure_mode"):
        _optimizer(seed=3)
    with pytest.raises(ValueError, match="secure_mode"):
        _optimizer(generator=torch.Generator())
