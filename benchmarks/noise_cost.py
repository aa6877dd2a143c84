"""Time of DPOptimizer's noise (add_noise) with and without secure_mode, for one model size.

    python benchmarks/noise_cost.py --params 10_000_000 --dtype float32 --repeats 7

Median seconds per add_noise over `repeats`, both modes in one process on the same tensors.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import bkfx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=10_000_000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    # a model-like split: one big matrix, a few mid-sized ones, small vectors
    sizes = [args.params // 2, args.params // 4, args.params // 8, args.params // 8 - 4096, 4096]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=getattr(torch, args.dtype), device=args.device)) for s in sizes]
    print(f"{sum(sizes):,} {args.dtype} parameters on {args.device}, {torch.get_num_threads()} threads")
    results = {}
    for secure in (False, True):
        opt = bkfx.DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                               expected_batch_size=1, secure_mode=secure, seed=None if secure else 0)
        times = []
        for _ in range(args.repeats + 1):  # the first warms up
            for p in params:
                p.grad = torch.zeros_like(p)
            if args.device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.add_noise()
            if args.device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[secure] = statistics.median(times[1:])
        print(f"secure_mode={secure!s:5}  {results[secure] * 1e3:8.1f} ms per step")
    print(f"secure / standard: {results[True] / results[False]:.1f}x")


if __name__ == "__main__":
    main()
