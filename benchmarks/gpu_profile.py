"""Where a bkfx step's time goes on a GPU: device-busy time vs wall time, kernel counts, and the
top kernels and CPU-side operations, bkfx vs non-private on the same model and batch.

    python benchmarks/gpu_profile.py --models vit-b16 gpt2-124m --amp bfloat16

A step whose wall time is far above its kernels' busy time is launch- or Python-bound (the
CPU cannot feed the GPU); one whose busy time grew is compute-bound. `--device cpu` with the
tiny stand-ins (`--models vit-tiny gpt2-tiny`) is the dry run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bkfx  # noqa: E402,F401
from models import workload  # noqa: E402
from run import Trainer  # noqa: E402

SIZES = {"vit-b16": (32, 0, 0), "gpt2-124m": (16, 512, 50257), "wrn16-4": (256, 0, 0), "gpt2": (16, 256, 512),
         "vit-tiny": (4, 0, 0), "gpt2-tiny": (4, 32, 512), "wrn16-1": (4, 0, 0)}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(trainer, device, steps):
    for _ in range(2):
        trainer.step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    sync(device)
    wall = (time.perf_counter() - t) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.step()
        sync(device)
    events = prof.key_averages()
    if device == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e3 / steps  # ms
        count = len(kernels) / steps
    else:
        busy, count = float("nan"), float("nan")
    return wall * 1e3, busy, count, events


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["vit-b16", "gpt2-124m"])
    parser.add_argument("--amp", default="bfloat16", choices=["bfloat16", "none"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--python", action="store_true", help="also cProfile bkfx's steps (Python time per function)")
    args = parser.parse_args(argv)
    amp = None if args.amp == "none" else getattr(torch, args.amp)
    for name in args.models:
        batch, seq, vocab = SIZES[name]
        factory, x, y, loss_fn = workload(name, batch, seq=seq or 128, vocab=vocab or 50257)
        print(f"\n## {name}, batch {batch}, amp {args.amp}, {args.device}", flush=True)
        for method in ("non-private", "bkfx"):
            trainer = Trainer(method, factory, x, y, loss_fn, args.device, amp)
            wall, busy, count, events = measure(trainer, args.device, args.steps)
            print(f"{method}: wall {wall:.1f} ms/step, kernels busy {busy:.1f} ms/step, {count:.0f} kernels/step", flush=True)
            if method == "bkfx" and args.python:
                import cProfile
                import pstats

                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(args.steps):
                    trainer.step()
                sync(args.device)
                profiler.disable()
                pstats.Stats(profiler).sort_stats("cumtime").print_stats("bkfx|passes", args.top)
                pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
            if method == "bkfx":
                sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
                print(events.table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
                print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
            del trainer
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
