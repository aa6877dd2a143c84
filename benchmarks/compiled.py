"""The compiled DP step (issue 13) side by side: non-private and bkfx, eager and compiled.

    python benchmarks/compiled.py                 # CPU: the 30x16 and 6x512 MLPs, GPT-2 4x256 (~5 min, 2 cores)
    python benchmarks/compiled.py --device cuda --compile-mode reduce-overhead     # a GPU, CUDA graphs

Per workload, five trainers on the same model, weights and batch: `non-private` (eager),
`non-private compiled` (forward and loss as one `torch.compile(fullgraph=True, dynamic=True,
mode=...)`), `bkfx` (the eager BK step), `bkfx compiled` (`dp_model.compile(mode=...)`: forward
and BK backward each one inductor program; the loss eager) and `bkfx torch.compile` (forward and
loss as one `torch.compile(fullgraph=True, dynamic=True, mode=...)` around the DP model, which is
one `bkfx::forward` operator in dynamo's graph and runs the compiled BK step inside). Each step
is forward, loss, backward, optimizer step (noise for bkfx), zero_grad; the trainers take turns
step by step; medians over --steps after --warmup, of the whole step and of forward+backward
alone (the clock stopped after backward, the device synchronised). The first step of each
trainer (capture, trace, compile) is timed on its own: "first step". The ratios that matter
are the compiled bkfx steps over `non-private compiled`, the non-private step compiled as the
bkfx torch.compile one is (and at least as much as bkfx compiled, whose loss runs eager).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402
from models import workload  # noqa: E402

METHODS = ["non-private", "non-private compiled", "bkfx", "bkfx compiled", "bkfx torch.compile"]
BASES = ("non-private", "non-private compiled")
COMPILED_BKFX = [m for m in run.COMPILED_METHODS if m.startswith("bkfx")]
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


def base_of(method: str) -> str:
    """The non-private step a method's ratio is taken to: the equally compiled one."""
    return "non-private compiled" if method in run.COMPILED_METHODS else "non-private"


def agreement(methods, factory, x, y, loss_fn, device) -> dict:
    """Per compiled bkfx method of `methods`, the max difference of `.grad` from the eager BK
    step's, relative to the largest gradient entry (one backward, same weights and batch):
    rounding only (the tests check each against the reference in float64). Where one fails, why."""

    def grads(method):
        trainer = run.Trainer(method, factory, x, y, loss_fn, device)
        trainer.backward()
        return [p.grad.float() for p in trainer.model.parameters() if p.grad is not None]

    checked = [m for m in methods if m in COMPILED_BKFX]
    if not checked:
        return {}
    eager = grads("bkfx")
    scale = max(g.abs().max().item() for g in eager)  # over all parameters: some are ~0 (attention key biases)
    out = {}
    for method in checked:
        try:
            out[method] = max((a - b).abs().max().item() for a, b in zip(grads(method), eager)) / scale
        except Exception as e:  # reported with the timings (the traceback on stderr)
            traceback.print_exc(limit=-12)
            out[method] = run.first_line(e)
    return out


def measure(label, model, batch, seq, vocab, args) -> dict:
    factory, x, y, loss_fn = workload(model, batch, seq or 128, vocab or 50257)
    run.fresh_dynamo()
    try:
        agree = agreement(args.methods, factory, x, y, loss_fn, args.device)
    except Exception as e:  # the eager step failed: reported with the timings (the traceback on stderr)
        traceback.print_exc(limit=-12)
        agree = dict.fromkeys([m for m in args.methods if m in COMPILED_BKFX], run.first_line(e))
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
    for method, t in trainers.items():  # a compiled step that could not be built ran the eager one
        why = getattr(t.forward, "compiled_step_failure", None)
        if why:
            failed[method] = f"ran the eager BK step: {why}"
    out = {"label": label, "model": model, "batch": batch, "seq": seq, "median_s": timed["median_s"],
           "forward_backward_s": timed["forward_backward_s"],
           "first_step_s": first, "failed": failed, "grad_vs_eager": agree}
    m, fbs = out["median_s"], out["forward_backward_s"]
    print(f"[{label}] batch {batch}; .grad vs the eager bkfx step, max difference / max |grad|: {agree}", flush=True)
    for method, s in m.items():
        base, fb, fb_base = m.get(base_of(method)), fbs.get(method), fbs.get(base_of(method))
        print(f"  {method:22s} {s * 1e3:9.2f} ms  {s / base if base else float('nan'):5.2f}x its non-private  "
              f"(forward+backward {fb * 1e3:.2f} ms, {fb / fb_base if fb_base else float('nan'):.2f}x)  "
              f"first step {first[method]:7.2f} s", flush=True)
    for method, why in failed.items():
        print(f"  {method:22s} failed: {why}", flush=True)
    return out


def markdown(results: dict) -> str:
    methods = results["methods"]
    ratios = [m for m in methods if m not in BASES and base_of(m) in methods]
    bold = [m for m in ratios if m in run.COMPILED_METHODS]  # the ratios that matter
    firsts = [m for m in methods if m in run.COMPILED_METHODS]
    checked = [m for m in methods if m in COMPILED_BKFX]
    header = (["workload", "batch"] + [f"{m} (ms)" for m in methods]
              + [f"**{m} / {base_of(m)}**" if m in bold else f"{m} / {base_of(m)}" for m in ratios]
              + [f"forward+backward only: {m} / {base_of(m)}" for m in bold]
              + [f"first step (s): {' / '.join(firsts)}"] * bool(firsts)
              + [f".grad vs eager bkfx: {' / '.join(checked)}"] * bool(checked))
    lines = [
        f"Machine: {results['machine']}; torch {results['torch']}; compile mode {results['mode']}; "
        f"median of {results['steps']} steps after {results['warmup']} warm-up.\n",
        f"Command: `{results['command']}`\n",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for w in results["workloads"]:
        m, fb, f = w["median_s"], w["forward_backward_s"], w["first_step_s"]
        ratio = lambda t, a: f"{t[a] / t[base_of(a)]:.2f}x" if a in t and base_of(a) in t else "-"  # noqa: E731
        cells = ([w["label"], str(w["batch"])] + [f"{m[k] * 1e3:.2f}" if k in m else "failed" for k in methods]
                 + [f"**{ratio(m, k)}**" if k in bold else ratio(m, k) for k in ratios]
                 + [ratio(fb, k) for k in bold]
                 + [" / ".join(f"{f[k]:.1f}" if k in f else "-" for k in firsts)] * bool(firsts)
                 + [" / ".join(_agree(w["grad_vs_eager"][k]) for k in checked)] * bool(checked))
        lines.append("| " + " | ".join(cells) + " |")
        for k, why in w["failed"].items():
            lines.append(f"| {w['label']} | {w['batch']} | {k} failed: {why} |" + " |" * (len(header) - 3))
    return "\n".join(lines) + "\n"


def _agree(a) -> str:
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
    results = {"machine": machine, "torch": torch.__version__, "mode": args.compile_mode, "methods": args.methods,
               "steps": args.steps,
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
