"""Data parallel DP-SGD on torch.distributed (gloo, CPU): DPOptimizer sums the clipped gradients over
the ranks and adds the noise once; PoissonSampler shards the global Poisson batch.

One spawn of 2 worker processes runs every distributed check and saves what it saw; the test
process compares it with one process on the union batch. Every wait is bounded: the workers'
collectives time out, and a worker still running at the deadline is killed and fails the test."""
from __future__ import annotations

import datetime
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import bkfx
from bkfx.data import PoissonSampler, poisson_loader

WORLD = 2
N, Q, SEED, STEPS = 24, 0.5, 3, 2  # the data-parallel run: 24 examples at rate 1/2, 2 steps
NOISE_SHAPE = (100, 100)  # σ > 0 check: the noise's std over 10 000 entries
SIGMA, EBS = 1.5, 4.0
DEADLINE_S = 90


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _train(dp_model, optimizer, batches):
    """One step per batch: forward, backward (sum of clipped gradients), step."""
    for x, y in batches:
        F.cross_entropy(dp_model(x), y, reduction="sum").backward()
        optimizer.step()
        optimizer.zero_grad()


def _sgd(dp_model, **options):
    return bkfx.DPOptimizer(torch.optim.SGD(dp_model.parameters(), lr=0.5), noise_multiplier=0.0,
                            expected_batch_size=Q * N, model=dp_model, seed=0, **options)


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    try:
        result = {}
        # σ = 0: the ranks' shards of the Poisson batches, then a step where this rank's batch is empty
        dataset = _data()
        dp_model = bkfx.compile(_model(), max_grad_norm=0.7, loss_reduction="sum")
        optimizer = _sgd(dp_model)
        loader = poisson_loader(dataset, Q, steps=STEPS, seed=SEED, rank=rank, world_size=WORLD)
        batches = list(loader)
        result["local_sizes"] = [len(y) for _, y in batches]
        _train(dp_model, optimizer, batches)
        result["after_poisson"] = [p.detach().clone() for p in dp_model.parameters()]
        x, y = dataset.tensors
        empty = (x[:0], y[:0]) if rank == 1 else (x[:10], y[:10])  # rank 1 has no example this step
        _train(dp_model, optimizer, [empty])
        result["after_empty"] = [p.detach().clone() for p in dp_model.parameters()]
        # σ > 0 on zero gradients: the update is the noise / B; each rank has its own seed, so
        # noise drawn on every rank would show as a √2 larger std
        param = nn.Parameter(torch.zeros(NOISE_SHAPE, dtype=torch.float64))
        noisy = bkfx.DPOptimizer(torch.optim.SGD([param], lr=1.0), noise_multiplier=SIGMA, max_grad_norm=1.0,
                                 expected_batch_size=EBS, seed=100 + rank)
        noisy.step()
        result["noise_update"] = param.detach().clone()
        # a process_group=False optimizer stays local
        local = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        local.grad = torch.full((3,), float(rank + 1), dtype=torch.float64)
        bkfx.DPOptimizer(torch.optim.SGD([local], lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                         expected_batch_size=1, process_group=False).step()
        result["local"] = local.detach().clone()
        # a GradScaler under data parallel is refused on every rank before any collective
        scaled = bkfx.compile(nn.Linear(2, 2).double(), grad_scaler=torch.amp.GradScaler("cpu"))
        scaled_opt = bkfx.DPOptimizer(torch.optim.SGD(scaled.parameters(), lr=1.0), noise_multiplier=0.0,
                                      expected_batch_size=2, model=scaled)
        try:
            scaled_opt.step()
            result["scaler_error"] = None
        except bkfx.BkfxError as e:
            result["scaler_error"] = str(e)
        # a DistributedDataParallel model is refused
        try:
            bkfx.compile(nn.parallel.DistributedDataParallel(nn.Linear(2, 2).double()))
            result["ddp_error"] = None
        except bkfx.BkfxError as e:
            result["ddp_error"] = str(e)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the workers once (bounded by DEADLINE_S) and load what each saved."""
    tmp = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} workers did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _reference():
    """One process on the union batches: the same model, sampler seed and steps."""
    dataset = _data()
    dp_model = bkfx.compile(_model(), max_grad_norm=0.7, loss_reduction="sum")
    optimizer = _sgd(dp_model)
    batches = list(poisson_loader(dataset, Q, steps=STEPS, seed=SEED))
    _train(dp_model, optimizer, batches)
    after_poisson = [p.detach().clone() for p in dp_model.parameters()]
    x, y = dataset.tensors
    _train(dp_model, optimizer, [(x[:10], y[:10])])
    return batches, after_poisson, [p.detach().clone() for p in dp_model.parameters()]


def test_sigma_zero_equals_one_process_on_the_union_batch(ranks):
    batches, after_poisson, after_empty = _reference()
    assert [sum(r["local_sizes"][k] for r in ranks) for k in range(STEPS)] == [len(y) for _, y in batches]
    assert all(size > 0 for r in ranks for size in r["local_sizes"])
    for r in ranks:
        for got, want in zip(r["after_poisson"], after_poisson):
            assert (got - want).abs().max() <= 1e-10
        for got, want in zip(r["after_empty"], after_empty):  # rank 1's batch was empty
            assert (got - want).abs().max() <= 1e-10
        assert any((a - b).abs().max() > 1e-3 for a, b in zip(r["after_empty"], r["after_poisson"]))


def test_every_rank_ends_with_the_same_parameters(ranks):
    for key in ("after_poisson", "after_empty"):
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b)
    assert torch.equal(ranks[0]["noise_update"], ranks[1]["noise_update"])


def test_noise_is_added_once_over_the_ranks(ranks):
    update = ranks[0]["noise_update"].flatten()
    n = update.numel()
    want = SIGMA * 1.0 / EBS
    ratio = float((update ** 2).sum()) / (n * want ** 2)  # n · ratio ~ χ²_n: mean 1, std √(2/n) ≈ 0.014
    assert abs(ratio - 1) < 6 * math.sqrt(2 / n), ratio  # noise on both ranks would give 2
    assert abs(float(update.mean())) < 6 * want / math.sqrt(n)


def test_process_group_false_and_ddp_refusal(ranks):
    for rank, r in enumerate(ranks):
        assert torch.equal(r["local"], torch.full((3,), -float(rank + 1), dtype=torch.float64))
        assert r["ddp_error"] is not None and "DistributedDataParallel" in r["ddp_error"]
        assert "ddp.module" in r["ddp_error"]
        assert r["scaler_error"] is not None and "GradScaler with data-parallel" in r["scaler_error"]


def test_sharded_sampler_partitions_the_global_poisson_batch():
    n, q, steps = 2000, 0.05, 40
    whole = list(PoissonSampler(n, q, steps=steps, seed=7))
    shards = [list(PoissonSampler(n, q, steps=steps, seed=7, rank=r, world_size=3)) for r in range(3)]
    counts = torch.zeros(n)
    for k in range(steps):
        parts = [shards[r][k] for r in range(3)]
        assert sorted(i for part in parts for i in part) == whole[k]
        for r, part in enumerate(parts):
            assert all(i % 3 == r for i in part)
        for part in parts:
            counts[part] += 1
    # every example at rate q: the total over n · steps Bernoulli(q) draws, within 5 standard deviations
    total, trials = float(counts.sum()), n * steps
    assert abs(total - q * trials) < 5 * math.sqrt(trials * q * (1 - q))
    assert counts.max() < steps * q + 8 * math.sqrt(steps * q)  # no example drawn far too often
    assert PoissonSampler(n, q, seed=7, rank=1, world_size=3).expected_batch_size == q * n  # global


def test_sharded_sampler_arguments():
    with pytest.raises(ValueError, match="seed"):
        PoissonSampler(10, 0.5, rank=0, world_size=2)
    with pytest.raises(ValueError, match="both"):
        PoissonSampler(10, 0.5, seed=0, rank=0)
    with pytest.raises(ValueError, match="rank"):
        PoissonSampler(10, 0.5, seed=0, rank=2, world_size=2)
    single = PoissonSampler(10, 0.5, rank=0, world_size=1)  # a world of one needs no seed
    assert single.world_size == 1


def test_process_group_without_torch_distributed_is_refused():
    assert not dist.is_initialized()
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    opt = bkfx.DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                           expected_batch_size=1, process_group=object())
    with pytest.raises(bkfx.BkfxError, match="not initialised"):
        opt.step()
