"""The GPU benchmark of issue 12, in one command: `bash benchmarks/gpu.sh` (see its header).

Workloads (each in its own forked child with a time limit, so a crash or a hang loses
only that workload; the parent never touches CUDA, so forking is safe):

- GPT-2 124M (HF GPT2Config sizes, random weights, vocabulary 50257, untied head so that
  Opacus ghost clipping can train it, dropout off), seq 512, batch 16, fp32 and bf16 autocast;
- ViT-B/16 (HF ViTConfig defaults, 224 px, 1000 classes), batch 32, bf16 autocast;
- WideResNet-16-4 with GroupNorm, 32x32 images, batch 256, fp32.

Methods: non-private, bkfx (auto: the cost model's plan), Opacus ghost clipping (when
opacus is installed), and for GPT-2 fp32 also bkfx with every site forced ghost / explicit
(what the cost model chooses between). A step is forward + loss + backward + optimizer step
(noise for the DP methods) + zero_grad; the methods take turns step by step in one process
(`run.time_trainers`), medians over the steps after warm-up. Also reported: forward+backward
alone (the device synchronised after backward), the peak of `torch.cuda.max_memory_allocated`
and that peak minus the memory allocated before the step. Then GPT-2 fp32's largest batch
per method: one child per method captures once and tries batches in-process (doubling from
the benchmark batch, then bisection to within 1/8), an out-of-memory error ending a try;
each child has a time cap, and the table says where the search stopped.

    python benchmarks/gpu.py              # on a GPU: results to $OUT and benchmarks/results/
    python benchmarks/gpu.py --cpu        # dry run: tiny sizes on the CPU, < 60 s
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import re
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402
from models import workload  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BASE_METHODS = ["non-private", "bkfx", "opacus ghost"]
MODE_METHODS = ["bkfx ghost", "bkfx explicit"]  # GPT-2 fp32 only: the cost model's two candidates


def plans(cpu: bool) -> dict:
    """Workloads, searches and limits: the GPU run, or its tiny CPU stand-in (same code path)."""
    if cpu:
        return {
            "workloads": [
                # (label, model, batch, seq, vocab, autocast dtype, extra methods, time limit s)
                ("GPT-2 (tiny) fp32", "gpt2-tiny", 4, 32, 512, None, MODE_METHODS, 60),
                ("GPT-2 (tiny) bf16", "gpt2-tiny", 4, 32, 512, "bfloat16", [], 60),
                ("ViT (tiny) bf16", "vit-tiny", 4, 0, 0, "bfloat16", [], 60),
                ("WRN-16-1 fp32", "wrn16-1", 4, 0, 0, None, [], 60),
            ],
            "warmup": 1, "steps": 2,
            # model, seq, vocab, amp, start, cap, seconds per method (bkfx: a capture first)
            "search": ("gpt2-tiny", 32, 512, None, 2, 16, {"bkfx": 15, "other": 10}),
        }
    return {
        "workloads": [
            ("GPT-2 124M seq 512 fp32", "gpt2-124m", 16, 512, 50257, None, MODE_METHODS, 150),
            ("GPT-2 124M seq 512 bf16", "gpt2-124m", 16, 512, 50257, "bfloat16", [], 100),
            ("ViT-B/16 224px bf16", "vit-b16", 32, 0, 0, "bfloat16", [], 100),
            ("WRN-16-4 GroupNorm 32px fp32", "wrn16-4", 256, 0, 0, None, [], 90),
        ],
        "warmup": 3, "steps": 10,
        "search": ("gpt2-124m", 512, 50257, None, 16, 1024, {"bkfx": 45, "other": 30}),
    }


# ---- children ------------------------------------------------------------------------------


def _device_facts(device: str) -> dict:
    if device == "cuda":
        return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    return {"device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__}


def time_workload(send, device, model, batch, seq, vocab, amp, methods, warmup, steps):
    """Child: the methods' trainers on one workload, timed side by side."""
    send(("facts", _device_facts(device)))
    factory, x, y, loss_fn = workload(model, batch, seq, vocab)
    dtype = getattr(torch, amp) if amp else None
    trainers, failures = run.make_trainers(methods, factory, x, y, loss_fn, device, dtype)
    for m, why in failures.items():
        print(f"    {m}: crashed: {why}", flush=True)
    timed = run.time_trainers(trainers, device, warmup, steps, split=True, memory=device == "cuda")
    timed["failed"] = {**failures, **timed["failed"]}
    send(("timed", timed))


def _fits(trainer, device) -> bool:
    """One step at the trainer's batch; False on an out-of-memory error (cleaned up after)."""
    try:
        trainer.step()
        run._sync(device)
        return True
    except torch.OutOfMemoryError:
        pass
    except RuntimeError as e:  # cuBLAS/cuDNN report their failed allocations as RuntimeErrors
        if not re.search(r"out of memory|ALLOC_FAILED", str(e)):
            raise
    # outside the except block: the traceback's frames (and their tensors) are gone
    for p in trainer.model.parameters():
        p.grad = None
    if device == "cuda":
        torch.cuda.empty_cache()
    return False


def search_batch(send, device, method, model, seq, vocab, amp, start, cap):
    """Child: the largest batch whose step runs, doubling from `start` then bisecting to within
    1/8; each result is sent as it comes so that a time cap keeps what was found."""
    dtype = getattr(torch, amp) if amp else None
    factory, x, y, loss_fn = workload(model, start, seq, vocab)
    trainer = run.Trainer(method, factory, x, y, loss_fn, device, dtype)

    def attempt(b):
        nonlocal trainer
        _, xb, yb, _ = workload(model, b, seq, vocab)
        trainer.x, trainer.y = xb.to(device), yb.to(device)
        ok = _fits(trainer, device)
        if not ok and not method.startswith("bkfx"):
            # Opacus keeps per-module activations that a failed step leaves behind: start afresh
            # (bkfx's ledger is per forward call, and its capture is worth keeping)
            trainer = None
            if device == "cuda":
                torch.cuda.empty_cache()
            trainer = run.Trainer(method, factory, xb, yb, loss_fn, device, dtype)
        send(("try", b, ok))
        print(f"    {method}: batch {b} {'fits' if ok else 'out of memory'}", flush=True)
        return ok

    fits, fails = 0, None
    b = start
    while fails is None and b <= cap:
        if attempt(b):
            fits, b = b, 2 * b
        else:
            fails = b
    while fails is not None and fits and fails - fits > max(1, fits // 8):
        mid = (fits + fails) // 2
        fits, fails = (mid, fails) if attempt(mid) else (fits, mid)


def _child_main(send, fn, args):
    import warnings

    # Opacus's ghost clipping warns on every step that its full backward hooks see no input gradients
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        fn(send.send, *args)
    except BaseException as e:  # reported to the parent as the workload's crash
        send.send(("error", run.first_line(e), traceback.format_exc()))
    finally:
        send.close()


def in_child(fn, args, limit_s):
    """Run `fn(send, *args)` in a forked child for at most `limit_s` seconds: (messages, status),
    status "ok", "crashed: <first line>" or "timed out after N s"."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(send, fn, args))
    child.start()
    send.close()
    messages, status, deadline = [], None, time.monotonic() + limit_s
    while status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            child.kill()
            status = f"timed out after {limit_s} s"
        elif recv.poll(min(left, 1.0)):
            try:
                messages.append(recv.recv())
            except EOFError:
                status = "ok"
    child.join(10)
    errors = [m for m in messages if m[0] == "error"]
    if errors:
        print(errors[-1][2], file=sys.stderr, flush=True)
        status = f"crashed: {errors[-1][1]}"
    elif status == "ok" and child.exitcode:
        status = f"crashed: exit code {child.exitcode}" + (" (a signal)" if child.exitcode < 0 else "")
    return messages, status


# ---- the run ---------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run: tiny sizes on the CPU")
    ap.add_argument("--out", default=os.environ.get("OUT") or None, help="also write the results here ($OUT)")
    ap.add_argument("--no-search", action="store_true", help="skip the largest-batch search")
    args = ap.parse_args(argv)
    cpu = args.cpu or os.environ.get("BKFX_GPU_DRY_RUN") == "1"
    device = "cpu" if cpu else "cuda"
    plan = plans(cpu)
    have_opacus = importlib.util.find_spec("opacus") is not None
    # children fork from here: what they all import is imported once (CUDA stays untouched)
    import bkfx  # noqa: F401
    import transformers  # noqa: F401

    if have_opacus:
        import opacus  # noqa: F401
    base = [m for m in BASE_METHODS if have_opacus or not m.startswith("opacus")]
    results = {"device": None, "torch": torch.__version__, "dry_run": cpu, "opacus": have_opacus,
               "warmup": plan["warmup"], "steps": plan["steps"], "workloads": [], "largest_batch": None}
    started = time.monotonic()
    for label, model, batch, seq, vocab, amp, extra, limit in plan["workloads"]:
        print(f"[{time.monotonic() - started:5.0f}s] {label}, batch {batch}: {', '.join(base + extra)}", flush=True)
        messages, status = in_child(
            time_workload, (device, model, batch, seq, vocab, amp, base + extra, plan["warmup"], plan["steps"]), limit)
        entry = {"label": label, "model": model, "batch": batch, "seq": seq or None, "amp": amp, "status": status,
                 "methods": base + extra}
        for kind, *payload in messages:
            if kind == "facts":
                results["device"] = results["device"] or payload[0]["device"]
                results["facts"] = payload[0]
            elif kind == "timed":
                entry.update(payload[0])
        results["workloads"].append(entry)
        _print_workload(entry)
    if not args.no_search:
        model, seq, vocab, amp, start, cap, limits = plan["search"]
        search = {"model": model, "seq": seq, "start": start, "cap": cap, "limit_s": limits, "methods": {}}
        for method in base:
            limit = limits["bkfx" if method.startswith("bkfx") else "other"]
            print(f"[{time.monotonic() - started:5.0f}s] largest batch: {method} (at most {limit} s)", flush=True)
            messages, status = in_child(search_batch, (device, method, model, seq, vocab, amp, start, cap), limit)
            tries = [(b, ok) for kind, *rest in messages if kind == "try" for b, ok in [rest]]
            search["methods"][method] = {"tries": tries, "status": status, **_bounds(tries, cap)}
        results["largest_batch"] = search
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    text = markdown(results)
    print(text, flush=True)
    _write(results, text, args.out, cpu)


def _bounds(tries, cap) -> dict:
    fit = [b for b, ok in tries if ok]
    fail = [b for b, ok in tries if not ok]
    largest = max(fit) if fit else 0
    above = min((b for b in fail if b > largest), default=None)
    return {"largest": largest, "first_failing": above, "cap_reached": largest >= cap}


def _print_workload(entry):
    print(f"    status: {entry['status']}", flush=True)
    base = entry.get("median_s", {}).get("non-private")
    for m, s in entry.get("median_s", {}).items():
        print(f"    {m:14s} {1e3 * s:8.1f} ms  {s / base if base else float('nan'):5.2f}x", flush=True)
    for m, why in entry.get("failed", {}).items():
        print(f"    {m:14s} crashed: {why}", flush=True)


def _ms(s):
    return "-" if s is None else f"{1e3 * s:.1f}"


def _gib(b):
    return "-" if b is None else f"{b / 2**30:.2f}"


def markdown(results) -> str:
    facts = results.get("facts", {})
    lines = [
        f"# bkfx GPU benchmark{' (CPU dry run: tiny sizes, not a measurement)' if results['dry_run'] else ''}",
        "",
        f"Device: {results['device'] or 'unknown (no workload started)'}"
        + (f", {facts['memory_gib']} GiB" if "memory_gib" in facts else "")
        + f"; torch {results['torch']}; median of {results['steps']} steps after {results['warmup']} warm-up"
        f"; {results['elapsed_s']} s in all.",
        "",
        "Command: `bash benchmarks/gpu.sh" + (" --cpu" if results["dry_run"] else "") + "`. A step is forward + loss + "
        "backward + optimizer step (noise for DP methods) + zero_grad; fwd+bwd stops the clock after backward. "
        "Peak: `torch.cuda.max_memory_allocated` during the method's steps; step memory: that peak minus the "
        "memory allocated before the step." + ("" if results["opacus"] else " Opacus is not installed: no Opacus rows."),
        "",
        "| workload | method | step (ms) | vs non-private | Opacus ghost / this | fwd+bwd (ms) | fwd+bwd vs non-private "
        "| peak (GiB) | step memory (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in results["workloads"]:
        med, fb = w.get("median_s", {}), w.get("forward_backward_s", {})
        peak, step = w.get("peak_bytes", {}), w.get("step_bytes", {})
        base, base_fb, ghost = med.get("non-private"), fb.get("non-private"), med.get("opacus ghost")
        name = f"{w['label']}, B={w['batch']}"
        for m in w["methods"]:
            if m in med:
                s = med[m]
                lines.append(
                    f"| {name} | {m} | {_ms(s)} | {f'{s / base:.2f}x' if base else '-'} | "
                    f"{f'{ghost / s:.2f}x' if ghost else '-'} | {_ms(fb.get(m))} | "
                    f"{f'{fb[m] / base_fb:.2f}x' if base_fb and m in fb else '-'} | {_gib(peak.get(m))} | "
                    f"{_gib(step.get(m))} |")
            else:
                why = w.get("failed", {}).get(m) or w["status"]
                why = why if why.startswith(("crashed", "timed out")) else f"crashed: {why}"
                lines.append(f"| {name} | {m} | {why.replace('|', '/')} | - | - | - | - | - | - |")
    search = results.get("largest_batch")
    if search:
        lines += [
            "",
            f"Largest batch that fits, {search['model']} seq {search['seq']} fp32 (one child per method, "
            f"at most {search['limit_s']['bkfx']} s for bkfx (its capture included), {search['limit_s']['other']} s "
            f"for the others: doubling from {search['start']} up to {search['cap']}, then "
            "bisection to within 1/8 of the largest fitting batch, or fewer tries when the time cap stops it):",
            "",
            "| method | largest batch | smallest failing batch | vs non-private | tries | search |",
            "|---|---|---|---|---|---|",
        ]
        base = search["methods"].get("non-private", {}).get("largest")
        for m, r in search["methods"].items():
            ratio = f"{r['largest'] / base:.2f}x" if base else "-"
            stop = "cap reached" if r["cap_reached"] else r["status"]
            tried = ", ".join(f"{b}{'' if ok else '✗'}" for b, ok in r["tries"])
            lines.append(f"| {m} | {r['largest']} | {r['first_failing'] or '-'} | {ratio} | {tried} | {stop} |")
    return "\n".join(lines) + "\n"


def _write(results, text, out, cpu):
    slug = re.sub(r"[^a-z0-9]+", "-", (results["device"] or "unknown").lower()).strip("-")
    name = f"results-gpu-{'dryrun-cpu' if cpu else slug}"
    targets = [out] if out else []
    if not cpu:  # the dry run is no measurement: it never replaces committed results
        targets.append(RESULTS)
    for folder in targets:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name + ".md"), "w") as f:
            f.write(text)
        with open(os.path.join(folder, name + ".json"), "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {os.path.join(folder, name)}.md/.json", flush=True)


if __name__ == "__main__":
    main()
