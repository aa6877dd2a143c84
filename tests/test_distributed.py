"""Data-parallel and FSDP2 DP-SGD on torch.distributed (gloo, CPU): DPOptimizer sums the clipped
gradients over the ranks (all-reduced, or reduce-scattered to FSDP2's shards) and adds the noise
once; PoissonSampler shards the global Poisson batch.

One spawn per world size (2 and 3 worker processes) runs every distributed check and saves what
each rank saw; the test process compares it with one process on the union batch. Every wait is
bounded: the workers' collectives time out, and a worker still running at the deadline is killed
and fails the test."""
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
from bkfx.training.data import PoissonSampler, poisson_loader

# under pytest-xdist every test of this file runs in one worker, so each world size is spawned once
pytestmark = pytest.mark.xdist_group("distributed")

WORLDS = (2, 3)
N, Q, SEED, STEPS = 24, 0.5, 3, 2  # the data-parallel run: 24 examples at rate 1/2, 2 steps
NOISE_SHAPE = (100, 100)  # σ > 0 check: the noise's std over 10 000 entries
SHARDED_NOISE_SHAPE = (91, 110)  # the same through a fully_shard linear layer (uneven shards)
SIGMA, EBS = 1.5, 4.0
DEADLINE_S = 180  # a hang guard, not a timing: the workers share two cores with another test process


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _sharded_model():
    """7 and 2 rows: at 3 ranks the shards are 3, 3, 1 and 1, 1, 0 rows (one empty)."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()


def _sharded_data():
    x, y = _data().tensors
    return x, y % 2


def _train(dp_model, optimizer, batches):
    """One step per batch: forward, backward (sum of clipped gradients), step."""
    for x, y in batches:
        F.cross_entropy(dp_model(x), y, reduction="sum").backward()
        optimizer.step()
        optimizer.zero_grad()


def _sgd(dp_model, **options):
    return bkfx.DPOptimizer(torch.optim.SGD(dp_model.parameters(), lr=0.5), noise_multiplier=0.0,
                            expected_batch_size=Q * N, model=dp_model, seed=0, **options)


def _noise_update(params, seed, **options):
    """The update of SGD (lr 1) through a DPOptimizer with σ = SIGMA on zero clipped sums: -noise / EBS."""
    return bkfx.DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=SIGMA, max_grad_norm=1.0,
                            expected_batch_size=EBS, seed=seed, **options)


def _refused(run) -> str | None:
    try:
        run()
    except bkfx.BkfxError as e:
        return str(e)
    return None


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        result = {}
        _data_parallel(rank, world, result)
        _adaptive(rank, world, result)
        _fully_sharded(rank, world, result)
        _fully_sharded_compiled(rank, world, result)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _empty_step_batch(rank: int, world: int):
    """The step in which rank 1 has no example: the others split x[:10] between them."""
    x, y = _data().tensors
    if rank == 1:
        return x[:0], y[:0]
    others = [r for r in range(world) if r != 1]
    idx = [i for i in range(10) if others[i % len(others)] == rank]
    return x[idx], y[idx]


def _data_parallel(rank: int, world: int, result: dict) -> None:
    """Replicated parameters: Poisson shards, an empty batch, the noise, the refusals."""
    dataset = _data()
    dp_model = bkfx.compile(_model(), max_grad_norm=0.7, loss_reduction="sum")
    optimizer = _sgd(dp_model)
    batches = list(poisson_loader(dataset, Q, steps=STEPS, seed=SEED, rank=rank, world_size=world))
    result["local_sizes"] = [len(y) for _, y in batches]
    _train(dp_model, optimizer, batches)
    result["after_poisson"] = [p.detach().clone() for p in dp_model.parameters()]
    _train(dp_model, optimizer, [_empty_step_batch(rank, world)])
    result["after_empty"] = [p.detach().clone() for p in dp_model.parameters()]
    # σ > 0 on zero gradients: the update is -noise / B; each rank has its own seed, so noise
    # drawn on every rank would show as a √world larger std, and differ from rank 0's own draw
    param = nn.Parameter(torch.zeros(NOISE_SHAPE, dtype=torch.float64))
    _noise_update([param], seed=100 + rank).step()
    result["noise_update"] = param.detach().clone()
    # a process_group=False optimizer stays local
    local = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    local.grad = torch.full((3,), float(rank + 1), dtype=torch.float64)
    bkfx.DPOptimizer(torch.optim.SGD([local], lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                     expected_batch_size=1, process_group=False).step()
    result["local"] = local.detach().clone()
    # a GradScaler under data parallel is refused on every rank before any collective
    scaled = bkfx.compile(nn.Linear(2, 2).double(), grad_scaler=torch.amp.GradScaler("cpu"))
    result["scaler_error"] = _refused(bkfx.DPOptimizer(
        torch.optim.SGD(scaled.parameters(), lr=1.0), noise_multiplier=0.0, expected_batch_size=2, model=scaled).step)
    # a DistributedDataParallel model is refused
    result["ddp_error"] = _refused(lambda: bkfx.compile(nn.parallel.DistributedDataParallel(nn.Linear(2, 2).double())))


ADAPTIVE = dict(count_noise_multiplier=0.0, target_unclipped_quantile=0.3, learning_rate=0.5)  # σ = σ_b = 0


def _adaptive_steps(parts_of_step):
    """Adaptive clipping with σ = σ_b = 0: two steps, each over its own (x, y) parts; R and the
    parameters after each. In one process the parts are the whole batches; on a rank, its share."""
    dp_model = bkfx.compile(_model(), max_grad_norm=0.4, loss_reduction="sum")
    optimizer = _sgd(dp_model, adaptive_clipping=bkfx.AdaptiveClipping(**ADAPTIVE))
    thresholds, params = [], []
    for x, y in parts_of_step:
        F.cross_entropy(dp_model(x), y, reduction="sum").backward()
        optimizer.step()
        optimizer.zero_grad()
        thresholds.append(dp_model.max_grad_norm)
        params.append([p.detach().clone() for p in dp_model.parameters()])
    return thresholds, params


def _adaptive(rank: int, world: int, result: dict) -> None:
    """The unclipped count is all-reduced with the sums: R after each step is the union batch's."""
    x, y = _data().tensors
    shares = [list(step)[rank::world] for step in (range(0, 12), range(12, 24))]
    result["adaptive"] = _adaptive_steps([(x[share], y[share]) for share in shares])


def _fully_shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fully_sharded(rank: int, world: int, result: dict) -> None:
    """FSDP2: the union-batch update, per-sample norms, shards, the noise and the refusals."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    x, y = _sharded_data()
    model, dp_model, optimizer = _sharded_dp(mesh)
    result["fsdp_norms"] = _sharded_step_1(rank, world, dp_model, optimizer,
                                           lambda x, y: F.cross_entropy(dp_model(x), y, reduction="sum"))
    optimizer.zero_grad()
    result["fsdp_local_after_1"] = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
    result["fsdp_after_1"] = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    # step 2: only rank 0 has examples; rank 1 runs an empty batch, rank 2 no forward call at all
    if rank == 0:
        F.cross_entropy(dp_model(x[:3]), y[:3], reduction="sum").backward()
    elif rank == 1:
        F.cross_entropy(dp_model(x[:0]), y[:0], reduction="sum").backward()
    optimizer.step(empty_batch=rank == 2)  # a rank that ran no backward says its batch was empty
    optimizer.zero_grad()
    result["fsdp_after_2"] = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    # σ > 0 through a sharded layer: the noise, drawn once (by rank 0), reduce-scattered to the shards
    noisy = _fully_shard_linear(mesh)
    dp_noisy = bkfx.compile(noisy, loss_reduction="sum")
    _noise_update(list(dp_noisy.parameters()), seed=100 + rank, model=dp_noisy).step(empty_batch=True)
    result["fsdp_noise_update"] = noisy.weight.detach().full_tensor()
    # refusals, each raised on every rank before any collective of its step
    plain = _sharded_model()
    late = bkfx.compile(plain)
    _fully_shard(plain, mesh)
    result["late_error"] = _refused(lambda: late(x[:2]))
    local = bkfx.compile(_fully_shard(_sharded_model(), mesh), loss_reduction="sum")
    local_opt = bkfx.DPOptimizer(torch.optim.SGD(local.parameters(), lr=1.0), noise_multiplier=0.0,
                                 expected_batch_size=1, model=local, process_group=False)
    F.cross_entropy(local(x[:2]), y[:2], reduction="sum").backward()
    result["local_error"] = _refused(local_opt.step)
    unsharded_opt = bkfx.DPOptimizer(torch.optim.SGD(local.parameters(), lr=1.0), noise_multiplier=0.0,
                                     expected_batch_size=1, model=local)  # built between forward and step
    result["unsharded_error"] = _refused(unsharded_opt.step)
    hybrid = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    result["hybrid_error"] = _refused(lambda: bkfx.compile(_fully_shard(_sharded_model(), hybrid)))


def _fully_sharded_compiled(rank: int, world: int, result: dict) -> None:
    """FSDP2 under torch.compile(fullgraph=True): the loss and the DP model (one bkfx::forward
    operator, whose run all-gathers the shards) in one graph; step 1 of `_fully_sharded`."""
    from torch.distributed.device_mesh import init_device_mesh

    model, dp_model, optimizer = _sharded_dp(init_device_mesh("cpu", (world,)))
    loss = torch.compile(lambda m, x, y: F.cross_entropy(m(x), y, reduction="sum"), fullgraph=True, dynamic=True)
    result["compiled_fsdp_norms"] = _sharded_step_1(rank, world, dp_model, optimizer, lambda x, y: loss(dp_model, x, y))
    result["compiled_fsdp_after_1"] = {n: p.detach().full_tensor() for n, p in model.named_parameters()}


def _sharded_dp(mesh):
    """The fully sharded model, its DP model (layer-wise, two thresholds) and optimizer (σ = 0)."""
    model = _fully_shard(_sharded_model(), mesh)
    dp_model = bkfx.compile(model, max_grad_norm=[0.5, 0.3], style="layer-wise", loss_reduction="sum")
    optimizer = bkfx.DPOptimizer(torch.optim.SGD(dp_model.parameters(), lr=0.5), noise_multiplier=0.0,
                                 expected_batch_size=5.0, model=dp_model, seed=0)
    return model, dp_model, optimizer


def _sharded_step_1(rank: int, world: int, dp_model, optimizer, loss):
    """Step 1: x[:10] split over the ranks, rank 0's part as two backward calls of `loss(x, y)`;
    (this rank's examples, their per-sample norms)."""
    x, y = _sharded_data()
    idx = [i for i in range(10) if i % world == rank]
    norms = []
    for part in [idx[:2], idx[2:]] if rank == 0 else [idx]:
        loss(x[part], y[part]).backward()
        norms.append(dp_model.per_sample_norms)
    optimizer.step()
    return idx, torch.cat(norms)


def _fully_shard_linear(mesh):
    from torch.distributed.fsdp import fully_shard

    layer = nn.Linear(SHARDED_NOISE_SHAPE[1], SHARDED_NOISE_SHAPE[0], bias=False).double()
    nn.init.zeros_(layer.weight)  # the weight after the step is then its update
    return fully_shard(layer, mesh=mesh)


# the tests that read `ranks` spawn each world size's processes once (tens of seconds): marked distributed and slow
_SPAWNED = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module", params=[pytest.param(w, marks=_SPAWNED) for w in WORLDS], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    """Run the workers of one world size once (bounded by DEADLINE_S) and load what each saved."""
    world = request.param
    tmp = tmp_path_factory.mktemp(f"distributed{world}")
    context = mp.start_processes(_worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} workers did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


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


def _sharded_reference():
    """The FSDP2 run in one process: x[:10], then x[:3]; the per-sample norms of the first step."""
    x, y = _sharded_data()
    model = _sharded_model()
    dp_model = bkfx.compile(model, max_grad_norm=[0.5, 0.3], style="layer-wise", loss_reduction="sum")
    optimizer = bkfx.DPOptimizer(torch.optim.SGD(dp_model.parameters(), lr=0.5), noise_multiplier=0.0,
                                 expected_batch_size=5.0, model=dp_model, seed=0)
    F.cross_entropy(dp_model(x[:10]), y[:10], reduction="sum").backward()
    norms = dp_model.per_sample_norms.clone()
    optimizer.step()
    optimizer.zero_grad()
    after_1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(dp_model, optimizer, [(x[:3], y[:3])])
    return norms, after_1, {n: p.detach().clone() for n, p in model.named_parameters()}


def _one_process_noise(shape) -> torch.Tensor:
    """Rank 0's noise update (its seed is 100), drawn by one process."""
    param = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    _noise_update([param], seed=100).step()
    return param.detach()


def _check_noise_std(update: torch.Tensor) -> None:
    update = update.flatten()
    n = update.numel()
    want = SIGMA * 1.0 / EBS
    ratio = float((update ** 2).sum()) / (n * want ** 2)  # n · ratio ~ χ²_n: mean 1, std √(2/n) ≈ 0.014
    assert abs(ratio - 1) < 6 * math.sqrt(2 / n), ratio  # noise on every rank would give the world size
    assert abs(float(update.mean())) < 6 * want / math.sqrt(n)


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
        for r in ranks[1:]:
            for a, b in zip(ranks[0][key], r[key]):
                assert torch.equal(a, b)
    for r in ranks[1:]:
        assert torch.equal(ranks[0]["noise_update"], r["noise_update"])
        for key in ("fsdp_after_1", "fsdp_after_2", "fsdp_noise_update"):
            for name in ranks[0]["fsdp_after_1"] if key != "fsdp_noise_update" else [None]:
                a, b = (ranks[0][key], r[key]) if name is None else (ranks[0][key][name], r[key][name])
                assert torch.equal(a, b)


def test_noise_is_added_once_over_the_ranks(ranks):
    _check_noise_std(ranks[0]["noise_update"])
    assert torch.equal(ranks[0]["noise_update"], _one_process_noise(NOISE_SHAPE))  # rank 0's draw, nobody else's


def test_process_group_false_and_ddp_refusal(ranks):
    for rank, r in enumerate(ranks):
        assert torch.equal(r["local"], torch.full((3,), -float(rank + 1), dtype=torch.float64))
        assert r["ddp_error"] is not None and "DistributedDataParallel" in r["ddp_error"]
        assert "ddp.module" in r["ddp_error"]
        assert r["scaler_error"] is not None and "GradScaler with data-parallel" in r["scaler_error"]


def test_adaptive_clipping_counts_over_the_ranks_as_one_process_on_the_union_batch(ranks):
    x, y = _data().tensors
    thresholds, params = _adaptive_steps([(x[:12], y[:12]), (x[12:], y[12:])])
    assert len(set(thresholds + [0.4])) == 3  # R moved at each step
    for r in ranks:
        got_thresholds, got_params = r["adaptive"]
        assert got_thresholds == pytest.approx(thresholds, rel=1e-12, abs=0)  # a rank's own count would differ
        for got, want in zip(got_params[-1], params[-1]):
            assert (got - want).abs().max() <= 1e-10


def test_fully_sharded_equals_one_process_on_the_union_batch(ranks):
    norms, after_1, after_2 = _sharded_reference()
    world = len(ranks)
    for rank, r in enumerate(ranks):
        idx, got = r["fsdp_norms"]  # per-sample norms over the unsharded parameters
        assert (got - norms[idx]).abs().max() <= 1e-10
        for name, want in after_1.items():
            assert (r["fsdp_after_1"][name] - want).abs().max() <= 1e-10
            rows = -(-want.shape[0] // world)  # the rank's shard: its rows of Shard(0)
            torch.testing.assert_close(r["fsdp_local_after_1"][name], want[rank * rows:(rank + 1) * rows], rtol=0, atol=1e-10)
        for name, want in after_2.items():  # ranks 1 (empty batch) and 2 (no forward) added nothing
            assert (r["fsdp_after_2"][name] - want).abs().max() <= 1e-10
    assert ranks[-1]["fsdp_local_after_1"]["2.weight"].shape[0] == (0 if world == 3 else 1)
    assert all((after_2[n] - after_1[n]).abs().max() > 1e-3 for n in after_1)


@pytest.mark.compiled
def test_fully_sharded_under_torch_compile_equals_one_process(ranks):
    norms, after_1, _ = _sharded_reference()
    for r in ranks:
        idx, got = r["compiled_fsdp_norms"]
        assert (got - norms[idx]).abs().max() <= 1e-10
        for name, want in after_1.items():
            assert (r["compiled_fsdp_after_1"][name] - want).abs().max() <= 1e-10


def test_fully_sharded_noise_is_added_once(ranks):
    _check_noise_std(ranks[0]["fsdp_noise_update"])
    assert torch.equal(ranks[0]["fsdp_noise_update"], _one_process_noise(SHARDED_NOISE_SHAPE))


def test_fully_sharded_refusals(ranks):
    for r in ranks:
        assert "fully_shard was applied after bkfx.compile" in r["late_error"]
        assert "process_group=False" in r["local_error"]
        assert "Build the optimizer on the sharded parameters" in r["unsharded_error"]
        assert "Shard(0) on a 1-D mesh" in r["hybrid_error"]


@pytest.mark.parametrize("world", WORLDS)
def test_distributed_poisson_loader_covers_examples_at_rate_q(world):
    n, q, steps = 2000, 0.05, 40
    whole = list(PoissonSampler(n, q, steps=steps, seed=7))
    indices = torch.utils.data.TensorDataset(torch.arange(n))
    shards = [[batch.tolist() for (batch,) in poisson_loader(indices, q, steps=steps, seed=7, rank=r, world_size=world)]
              for r in range(world)]
    counts = torch.zeros(n)
    for k in range(steps):
        parts = [shards[r][k] for r in range(world)]
        assert sorted(i for part in parts for i in part) == whole[k]  # the ranks partition the global batch
        for r, part in enumerate(parts):
            assert all(i % world == r for i in part)
        for part in parts:
            counts[part] += 1
    # every example at rate q: the total over n · steps Bernoulli(q) draws, within 5 standard deviations
    total, trials = float(counts.sum()), n * steps
    assert abs(total - q * trials) < 5 * math.sqrt(trials * q * (1 - q))
    assert counts.max() < steps * q + 8 * math.sqrt(steps * q)  # no example drawn far too often
    assert PoissonSampler(n, q, seed=7, rank=1, world_size=world).expected_batch_size == q * n  # global


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
