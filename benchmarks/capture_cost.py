"""What bkfx's capture-time soundness checks cost: capture (torch.export), the sample-dimension
analysis (sample rules) and the numerical probe, against the rest of compilation.

    python benchmarks/capture_cost.py --models gpt2 vit --batch 16

Each phase is timed on its own, in one process, median of `--repeat` compilations of a fresh
compiled model; the probe's share is what the fail-closed checks add beyond the rules.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import workload  # noqa: E402
from passes.annotate import annotate  # noqa: E402
from passes.capture import capture  # noqa: E402
from passes.cost_model import cost_model  # noqa: E402
from passes.probe import probe  # noqa: E402
from passes.rewrite import rewrite  # noqa: E402
from passes.sample_dim import probed_nodes, sample_dim  # noqa: E402


def phases(model, x) -> dict[str, float]:
    out = {}
    t = time.perf_counter()
    captured = capture(model, (x,), {})
    out["capture (torch.export)"] = time.perf_counter() - t
    t = time.perf_counter()
    gm = sample_dim(captured.graph_module)
    out["sample rules"] = time.perf_counter() - t
    t = time.perf_counter()
    gm = probe(gm, *captured.example)
    out["probe (per-op and whole model)"] = time.perf_counter() - t
    t = time.perf_counter()
    names = {id(p): n for n, p in model.named_parameters()}
    gm = rewrite(cost_model(annotate(gm, names)))
    out["annotate, cost model, rewrite"] = time.perf_counter() - t
    out["_probed"] = len(probed_nodes(gm))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2", "vit"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, batch {args.batch}, median of {args.repeat}")
    print("| model | phase | median (s) | share of compile |\n|---|---|---|---|")
    for name in args.models:
        factory, x, _, _ = workload(name, args.batch)
        model = factory()
        runs = [phases(model, x) for _ in range(args.repeat)]
        keys = [k for k in runs[0] if not k.startswith("_")]
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        total = sum(med.values())
        for k in keys:
            print(f"| {name} | {k} | {med[k]:.3f} | {100 * med[k] / total:.0f}% |")
        print(f"| {name} | total (ops probed: {runs[0]['_probed']}) | {total:.3f} | 100% |")


if __name__ == "__main__":
    main()
