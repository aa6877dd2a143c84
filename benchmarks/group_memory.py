"""Peak memory of one training step: non-private vs bkfx all-layer vs layer-wise clipping, HF GPT-2.

    python benchmarks/group_memory.py                      # 4 layers x 256, vocab 50257, batch 16, seq 64
    python benchmarks/group_memory.py --methods all-layer layer-wise param-wise --repeats 5

With all-layer clipping no clip factor is known until the whole backward pass has
produced every site's per-sample norm, so every site's book-kept factors (output
gradients, activations, explicit per-sample gradients) stay alive to the end. With
layer-wise clipping a layer's group is finalised as soon as its sites are done, and its
book-kept tensors are freed while backward goes on (DESIGN.md: "groups finalised early").

Each measurement runs in a fresh subprocess (so one method's allocator state cannot
hide another's peak): build the model, warm up, then measure one step — forward, loss,
backward, optimizer step (a DPOptimizer adding noise for the private methods), zero_grad.
Peak RSS is `resource.getrusage(RUSAGE_SELF).ru_maxrss`; before the measured step the
kernel's peak is reset to the current RSS (`/proc/self/clear_refs` ← 5, Linux) so the
peak is the step's own, and "step" is that peak minus the resting RSS just before it
(parameters, optimizer state and the interpreter excluded). The subprocesses run with
glibc's mmap threshold fixed at 64 KiB, so freed tensors leave RSS at once and the resting
RSS is what is live, not what an earlier step once used. Medians over `--repeats`
subprocesses; ratios are to non-private.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

METHODS = ("non-private", "all-layer", "layer-wise", "param-wise")


def rss_bytes() -> int:
    """Current resident set size, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM, which `reset_peak` resets. (getrusage's ru_maxrss is not
    reset, and after fork + exec it starts from the parent's resident size.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak() -> bool:
    """Reset the kernel's peak RSS of this process to its current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build(args):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    cfg = GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=args.heads, vocab_size=args.vocab, n_positions=args.positions,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def worker(args) -> dict:
    """One method in this process: warm up, then the peak RSS of one step."""
    import bkfx

    model = build(args)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4)
    if args.worker == "non-private":
        run, optimizer = model, sgd
    else:
        run = bkfx.compile(model, max_grad_norm=1.0, style=args.worker, norm_mode=args.norm_mode)
        optimizer = bkfx.DPOptimizer(sgd, noise_multiplier=1.0, expected_batch_size=args.batch, model=run, seed=0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step():
        logits = run(x).logits
        F.cross_entropy(logits.reshape(-1, args.vocab), x.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    resting = rss_bytes()
    reset = reset_peak()
    step()
    peak = peak_rss_bytes()
    return {"peak": peak, "resting": resting, "reset": reset}


def measure(args, method: str) -> dict:
    """Run `worker` for `method` in a fresh interpreter and read its JSON line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method] + [
        f"--{k}={v}" for k, v in (
            ("layers", args.layers), ("width", args.width), ("heads", args.heads), ("vocab", args.vocab),
            ("positions", args.positions), ("batch", args.batch), ("seq", args.seq), ("warmup", args.warmup),
            ("norm-mode", args.norm_mode),
        )
    ]
    # glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so RSS would
    # remember warm-up's peak; a fixed 64 KiB threshold returns every tensor's memory on free.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--positions", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--norm-mode", default="auto")
    ap.add_argument("--methods", nargs="+", default=["non-private", "all-layer", "layer-wise"], choices=METHODS)
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    methods = ["non-private"] + [m for m in args.methods if m != "non-private"]
    runs = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:  # interleaved, so that every method sees the same machine state
            runs[m].append(measure(args, m))
    mib = 2**20
    peak = {m: statistics.median(r["peak"] for r in runs[m]) / mib for m in methods}
    step = {m: statistics.median(r["peak"] - r["resting"] for r in runs[m]) / mib for m in methods}
    reset = all(r["reset"] for rs in runs.values() for r in rs)
    params = sum(p.numel() for p in build(args).parameters())
    print(f"HF GPT-2 {args.layers} layers x {args.width} wide, {args.heads} heads, vocab {args.vocab} "
          f"({params / 1e6:.1f}M params), batch {args.batch}, seq {args.seq}; one step (forward, loss, backward, "
          f"optimizer step, zero_grad) after {args.warmup} warm-up, median of {args.repeats} fresh processes; "
          f"torch {torch.__version__}, CPU" + ("" if reset else "; peak not resettable here: peaks are lifetime peaks"))
    print()
    print("| method | peak RSS (MiB) | step above resting RSS (MiB) | peak / non-private | step / non-private |")
    print("|---|---|---|---|---|")
    for m in methods:
        print(f"| {m} | {peak[m]:.0f} | {step[m]:.0f} | {peak[m] / peak['non-private']:.2f}x | "
              f"{step[m] / step['non-private']:.2f}x |")


if __name__ == "__main__":
    main()
