"""The compiled DP step (issue 13) side by side: non-private and bkfx, each eager and compiled.

    python benchmarks/compiled.py                 # CPU: the 30x16 and 6x512 MLPs, GPT-2 4x256 (~3 min, 2 cores)
    python benchmarks/compiled.py --device cuda --compile-mode reduce-overhead     # a GPU, CUDA graphs

Per workload, four trainers on the same model, weights and batch: `non-private` (eager),
`non-private compiled` (`torch.compile(model, mode=...)`), `bkfx` (the eager BK step) and
`bkfx compiled` (`dp_model.compile(mode=...)`: forward and BK backward each one inductor
program). Each step is forward, loss, backward, optimizer step (noise for bkfx), zero_grad;
the trainers take turns step by step; medians over --steps after --warmup, of the whole step
and of forward+backward alone (the clock stopped after backward, the device synchronised). The first step of
each trainer (capture, trace, compile) is timed on its own: "first step". The ratio that
matters is `bkfx compiled / non-private compiled` (the equally compiled non-private step).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402
from models import workload  # noqa: E402

METHODS = ["non-private", "non-private compiled", "bkfx", "bkfx compiled"]
CPU_WORKLOADS = [  # (label, model, batch, seq, vocab)
    ("MLP 30 x Linear(16,16)", "mlp30x16", 32, 0, 0),
    ("MLP 6 x 512", "mlp6x512", 256, 0, 0),
    ("GPT-2 4x256 seq 64", "gpt2", 8, 64, 8192),
]
GPU_WORKLOADS = [
    ("MLP 30 x Linear(16,16)", "mlp30x16", 32, 0, 0),
    ("MLP 784-1024x3", "mlp", 64, 0, 0),
    ("GroupNorm CNN", "cnn", 64, 0, 0),
    ("ViT 4x256 32px", "vit", 64, 0, 0),
    ("GPT-2 124M seq 512 fp32", "gpt2-124m", 8, 512, 50257),
]


def agreement(factory, x, y, loss_fn, device) -> float:
    """Max difference of `.grad`, relative to the largest gradient entry, (one backward, same weights and batch) between the compiled
    BK step and the eager one: rounding only (the tests check both against the reference in float64)."""
    import bkfx

    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = factory().to(device)
        dp = bkfx.compile(model, max_grad_norm=run.R)
        if compiled:
            dp.compile(mode=run.COMPILE["mode"])
        loss_fn(dp(x.to(device)), y.to(device)).backward()
        grads.append([p.grad.float() for p in model.parameters() if p.grad is not None])
    scale = max(b.abs().max().item() for b in grads[0])  # over all parameters: some are ~0 (attention key biases)
    return max((a - b).abs().max().item() for a, b in zip(*grads)) / scale


def measure(label, model, batch, seq, vocab, args) -> dict:
    factory, x, y, loss_fn = workload(model, batch, seq or 128, vocab or 50257)
    try:
        agree = agreement(factory, x, y, loss_fn, args.device)
    except Exception as e:  # reported with the timings (the traceback on stderr)
        import traceback

        traceback.print_exc(limit=-12)
        agree = run.first_line(e)
    trainers, first, failed = {}, {}, {}
    for method in args.methods:
        try:
            t = run.Trainer(method, factory, x, y, loss_fn, args.device)
            run._sync(args.device)
            t0 = time.perf_counter()
            t.step()
            run._sync(args.device)
            first[method] = time.perf_counter() - t0
            trainers[method] = t
        except Exception as e:  # reported, not fatal
            failed[method] = run.first_line(e)
    timed = run.time_trainers(trainers, args.device, args.warmup, args.steps, split=True)
    failed.update(timed["failed"])
    out = {"label": label, "model": model, "batch": batch, "seq": seq, "median_s": timed["median_s"],
           "forward_backward_s": timed["forward_backward_s"],
           "first_step_s": first, "failed": failed, "compiled_vs_eager_grad": agree}
    m = out["median_s"]
    print(f"[{label}] batch {batch}; compiled vs eager bkfx .grad: max difference / max |grad| {agree}", flush=True)
    for method, s in m.items():
        base = m.get("non-private compiled" if method.endswith("compiled") else "non-private")
        fb = out["forward_backward_s"].get(method)
        fb_base = out["forward_backward_s"].get("non-private compiled" if method.endswith("compiled") else "non-private")
        print(f"  {method:22s} {s * 1e3:9.2f} ms  {s / base if base else float('nan'):5.2f}x its non-private  "
              f"(forward+backward {fb * 1e3:.2f} ms, {fb / fb_base if fb_base else float('nan'):.2f}x)  "
              f"first step {first[method]:7.2f} s", flush=True)
    for method, why in failed.items():
        print(f"  {method:22s} failed: {why}", flush=True)
    return out


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}; torch {results['torch']}; compile mode {results['mode']}; "
        f"median of {results['steps']} steps after {results['warmup']} warm-up.\n",
        f"Command: `{results['command']}`\n",
        "| workload | batch | non-private (ms) | non-private compiled (ms) | bkfx (ms) | bkfx compiled (ms) "
        "| bkfx / non-private | **bkfx compiled / non-private compiled** | forward+backward only: compiled ratio "
        "| first step: np compiled / bkfx compiled (s) | .grad compiled vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in results["workloads"]:
        m, f = w["median_s"], w["first_step_s"]
        ms = lambda k: f"{m[k] * 1e3:.2f}" if k in m else "failed"  # noqa: E731
        ratio = lambda a, b: f"{m[a] / m[b]:.2f}x" if a in m and b in m else "-"  # noqa: E731
        firsts = " / ".join(f"{f[k]:.1f}" if k in f else "-" for k in ("non-private compiled", "bkfx compiled"))
        lines.append(f"| {w['label']} | {w['batch']} | {ms('non-private')} | {ms('non-private compiled')} | {ms('bkfx')} "
                     f"| {ms('bkfx compiled')} | {ratio('bkfx', 'non-private')} "
                     f"| **{ratio('bkfx compiled', 'non-private compiled')}** | {fb_ratio(w)} | {firsts} | {_agree(w)} |")
        for k, why in w["failed"].items():
            lines.append(f"| {w['label']} | {w['batch']} | {k} failed: {why} | | | | | | | | |")
    return "\n".join(lines) + "\n"


def fb_ratio(w) -> str:
    fb = w.get("forward_backward_s", {})
    a, b = fb.get("bkfx compiled"), fb.get("non-private compiled")
    return f"{a / b:.2f}x" if a and b else "-"


def _agree(w) -> str:
    a = w["compiled_vs_eager_grad"]
    return f"{a:.1e}" if isinstance(a, float) else f"failed: {a}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=None, help="model names of benchmarks/models.py (default: per device)")
    ap.add_argument("--batch", type=int, default=None, help="one batch size for every --models workload")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled methods")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run.COMPILE["mode"] = args.compile_mode
    workloads = GPU_WORKLOADS if args.device == "cuda" else CPU_WORKLOADS
    if args.models:
        known = {w[1]: w for w in CPU_WORKLOADS + GPU_WORKLOADS}
        workloads = [known.get(m, (m, m, args.batch or 16, 128, 8192)) for m in args.models]
    if args.batch:
        workloads = [(label, m, args.batch, seq, vocab) for label, m, _, seq, vocab in workloads]
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} cores, {torch.get_num_threads()} threads"
    results = {"machine": machine, "torch": torch.__version__, "mode": args.compile_mode, "steps": args.steps,
               "warmup": args.warmup, "command": " ".join(["python benchmarks/compiled.py"] + sys.argv[1:]),
               "workloads": [measure(*w, args) for w in workloads]}
    os.makedirs(args.out, exist_ok=True)
    tag = "gpu" if args.device == "cuda" else "cpu"
    with open(os.path.join(args.out, f"compiled-{tag}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, f"compiled-{tag}.md"), "w") as f:
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
