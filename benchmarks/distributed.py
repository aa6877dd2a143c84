"""Data-parallel DP-SGD on this machine (gloo, CPU): bytes reduced per step and step time, 1 → 2 processes.

    python benchmarks/distributed.py                       # MLP 784-1024x3-10, global batch 128
    python benchmarks/distributed.py --steps 30 --batch 256

Side by side on the same model and global batch: non-private training (one process; DDP over two),
bkfx with replicated parameters (DPOptimizer's all-reduce of the clipped sums) and bkfx with a
`fully_shard`ed (FSDP2) model. Bytes are those of the collectives one step runs (profiled:
every gloo collective's tensors; an all-reduce moves its tensor, a reduce-scatter its input, an
all-gather its output), time is the median wall time of a step (forward, backward, step) after
warm-up. One process uses both cores (2 threads); two processes use one thread each, so both
runs use the same cores. Times on a 2-core machine are noisy: read them as the medians they are.
Writes benchmarks/results/distributed-cpu.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bkfx from this checkout

import bkfx  # noqa: E402
from bkfx.training.distributed import all_reduce_sum_  # noqa: E402
from models import MLP  # noqa: E402  (benchmarks/models.py, beside this script)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = ("non-private", "bkfx", "bkfx-fsdp2")


def _build(mode: str, world: int, batch: int):
    """The model, what is called on a batch, and the optimizer, for `mode` in a world of `world`."""
    torch.manual_seed(0)
    model = MLP()
    if mode == "non-private":
        run = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        return model, run, torch.optim.SGD(model.parameters(), lr=0.01)
    if mode == "bkfx-fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in [*model.layers, model.out]:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    dp_model = bkfx.compile(model, max_grad_norm=1.0, loss_reduction="sum")
    optimizer = bkfx.DPOptimizer(torch.optim.SGD(dp_model.parameters(), lr=0.01), noise_multiplier=1.0,
                                 expected_batch_size=float(batch), model=dp_model, seed=0)
    return model, dp_model, optimizer


def _step(run, optimizer, x, y):
    F.cross_entropy(run(x), y, reduction="sum").backward()
    optimizer.step()
    optimizer.zero_grad()


def _collective_bytes(prof, world: int) -> dict[str, int]:
    """Bytes of each kind of gloo collective in a profile: the tensor an all-reduce or broadcast
    reduces, the output an all-gather fills (its input × world). Gloo runs a reduce-scatter as an
    all-reduce of the whole input (c10d's reduce-scatter then keeps this rank's part), so it counts
    as one."""
    out: dict[str, int] = {}
    for event in prof.events():
        if not event.name.startswith("gloo:") or not event.input_shapes or not event.input_shapes[0]:
            continue
        kind = event.name[len("gloo:"):]
        numel = torch.Size(event.input_shapes[0]).numel() * (world if kind == "all_gather" else 1)
        out[kind] = out.get(kind, 0) + 4 * numel  # float32 model
    return out


def _measure(rank: int, world: int, mode: str, steps: int, batch: int):
    local = batch // world
    g = torch.Generator().manual_seed(1 + rank)
    x, y = torch.randn(local, 784, generator=g), torch.randint(0, 10, (local,), generator=g)
    model, run, optimizer = _build(mode, world, batch)
    for _ in range(3):
        _step(run, optimizer, x, y)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _step(run, optimizer, x, y)
    sent = _collective_bytes(prof, world)
    times = []
    for _ in range(steps):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        _step(run, optimizer, x, y)
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())  # a DTensor's numel is the whole parameter's
    row = {"mode": mode, "world": world, "threads": torch.get_num_threads(), "median_s": statistics.median(times),
           "bytes": sent, "params": params}
    if mode == "bkfx" and world > 1:  # the all-reduce of the clipped sums alone: what overlap could hide at most
        sums = [torch.zeros_like(p) for p in model.parameters()]
        alone = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            all_reduce_sum_(sums, dist.group.WORLD)
            alone.append(time.perf_counter() - start)
        row["all_reduce_s"] = statistics.median(alone)
    return row


def _worker(rank: int, world: int, threads: int, store: str, out: str, steps: int, batch: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        rows = [_measure(rank, world, mode, steps, batch) for mode in MODES]
        torch.save(rows, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run(world: int, threads: int, steps: int, batch: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, threads, os.path.join(tmp, "store"), tmp, steps, batch), nprocs=world,
                           start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    rows = ranks[0]
    for k, row in enumerate(rows):  # a step is as slow as its slowest rank
        row["median_s"] = max(r[k]["median_s"] for r in ranks)
    return rows


def table(rows: list[dict], batch: int) -> str:
    by = {(r["mode"], r["world"], r["threads"]): r for r in rows}
    params = by[("non-private", 1, 1)]["params"]
    lines = [
        f"MLP 784-1024x3-10 ({params:,} float32 parameters, {4 * params / 1e6:.1f} MB), global batch {batch}, gloo on "
        f"{os.cpu_count()} CPU cores (torch {torch.__version__}).",
        "Bytes: one step's gloo collectives on rank 0 of 2 (all-reduce: its tensor; all-gather: its output; gloo runs "
        "a reduce-scatter as an all-reduce of the whole input). Time: median step (forward, backward, step; the "
        "slowest rank's), 1 process with 1 and 2 threads, 2 processes with 1 thread each (the same 2 cores).",
        "",
        "| mode | all-reduce MB | all-gather MB | total / parameter bytes | 1 process × 1 thread (ms) "
        "| 1 process × 2 threads (ms) | 2 processes × 1 thread (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        one, both, two = by[(mode, 1, 1)], by[(mode, 1, 2)], by[(mode, 2, 1)]
        sent = two["bytes"]
        lines.append(
            f"| {mode if mode != 'non-private' else 'non-private (DDP over 2)'} | {sent.get('all_reduce', 0) / 1e6:.2f} "
            f"| {sent.get('all_gather', 0) / 1e6:.2f} | {sum(sent.values()) / (4 * params):.2f} "
            f"| {1e3 * one['median_s']:.1f} | {1e3 * both['median_s']:.1f} | {1e3 * two['median_s']:.1f} |"
        )
    alone = by[("bkfx", 2, 1)]["all_reduce_s"]
    lines += ["", f"The all-reduce of bkfx's clipped sums alone (2 processes): {1e3 * alone:.1f} ms per step, the most "
              "that overlapping it with backward could save."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    rows = run(1, 1, args.steps, args.batch) + run(1, 2, args.steps, args.batch) + run(2, 1, args.steps, args.batch)
    text = table(rows, args.batch)
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "distributed-cpu.md"), "w") as f:
        f.write(f"`python benchmarks/distributed.py --steps {args.steps} --batch {args.batch}`\n\n{text}\n")
    with open(os.path.join(RESULTS, "distributed-cpu.json"), "w") as f:
        json.dump({"steps": args.steps, "batch": args.batch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
