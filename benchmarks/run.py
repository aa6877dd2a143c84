"""Side-by-side DP training benchmarks: non-private vs bkfx vs Opacus vs torch.func vmap.

    python benchmarks/run.py                      # all models, CPU defaults: about 6 minutes on 2 cores
    python benchmarks/run.py --models gpt2 --vocab 50257      # GPT-2 with its real vocabulary
    python benchmarks/run.py --models gpt2-124m --seq 512 --vocab 50257 --max-batch 256   # a GPU: GPT-2 small

Step time: every method trains the same model (same initial weights, same batch) in one
process, the methods taking turns step by step; medians over --steps after --warmup.
Ratios are to non-private training measured in that same run. Step memory: a fresh
subprocess per (model, method) warms up, then measures what one step needs above the
resting state: on CPU the peak RSS (kernel peak reset first) minus the RSS before the
step, on GPU `torch.cuda.max_memory_allocated` minus the allocated memory before it.
With --max-batch, each method's largest batch that runs (a subprocess per try, doubling
then bisecting). Results go to benchmarks/results/ (markdown, JSON, PNG).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import workload  # noqa: E402

METHODS = [
    "non-private", "bkfx", "bkfx ghost", "bkfx explicit", "bkfx layer-wise",
    "opacus hooks", "opacus ghost", "vmap dp-sgd",
]
# torch.compile of forward+loss / the compiled BK step / forward+loss with the DP model in one torch.compile
COMPILED_METHODS = ["non-private compiled", "bkfx compiled", "bkfx torch.compile"]
R, SIGMA, LR = 1.0, 1.0, 1e-3
COMPILE = {"mode": None}  # torch.compile's mode for the compiled methods (--compile-mode; "reduce-overhead": CUDA graphs)


class Trainer:
    """One training method on its own copy of the model."""

    def __init__(self, method, factory, inputs, targets, loss_fn, device, amp=None):
        """`amp`: a low-precision dtype (torch.bfloat16) to run forward and loss under
        `torch.autocast(device)`, or None for the model's own precision."""
        torch.manual_seed(0)
        self.model = factory().to(device)
        self.x, self.y, self.loss_fn, self.method = inputs.to(device), targets.to(device), loss_fn, method
        self.device, self.amp = device, amp
        B = inputs.shape[0]
        params = [p for p in self.model.parameters() if p.requires_grad]
        sgd = torch.optim.SGD(params, lr=LR)
        if method == "non-private":
            self.forward, self.opt = self.model, sgd
        elif method == "non-private compiled":
            self.forward, self.opt = self.model, sgd  # compiled with the loss, below
        elif method.startswith("bkfx"):
            import bkfx

            options = {"ghost": {"norm_mode": "ghost"}, "explicit": {"norm_mode": "explicit"},
                       "layer-wise": {"style": "layer-wise"}}.get(method.partition(" ")[2], {})
            self.forward = bkfx.compile(self.model, max_grad_norm=R, **options)
            if method == "bkfx compiled":
                self.forward.compile(mode=COMPILE["mode"])
            self.opt = bkfx.DPOptimizer(sgd, noise_multiplier=SIGMA, max_grad_norm=self.forward.max_grad_norms,
                                        expected_batch_size=B, model=self.forward, seed=0)
        elif method == "opacus hooks":
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            self.forward = _batch_positions(GradSampleModule(self.model), self.model, inputs)
            self.opt = DPOptimizer(sgd, noise_multiplier=SIGMA, max_grad_norm=R, expected_batch_size=B)
        elif method == "opacus ghost":
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

            wrapped = GradSampleModuleFastGradientClipping(self.model, max_grad_norm=R, use_ghost_clipping=True)
            self.opt = DPOptimizerFastGradientClipping(sgd, noise_multiplier=SIGMA, max_grad_norm=R, expected_batch_size=B)
            self.criterion = DPLossFastGradientClipping(wrapped, self.opt, _Criterion(loss_fn), loss_reduction="mean")
            self.forward = _batch_positions(wrapped, self.model, inputs)
        elif method == "vmap dp-sgd":
            self.forward, self.opt = self.model, sgd
        else:
            raise ValueError(method)
        self.loss = self._loss
        if method in ("non-private compiled", "bkfx torch.compile"):  # the model and the loss: one graph
            self.loss = torch.compile(self._loss, fullgraph=True, dynamic=True, mode=COMPILE["mode"])

    def _loss(self, x, y):
        out = self.forward(x)
        return self.criterion(out, y) if self.method == "opacus ghost" else self.loss_fn(out, y)

    def step(self, split: bool = False):
        """One training step: forward, loss, backward, optimizer step (noise for DP methods),
        zero_grad. With `split`, the seconds from the start to the end of backward (the device
        synchronised there)."""
        if self.method == "vmap dp-sgd":
            return self._vmap_step()
        t0 = time.perf_counter()
        self.backward()
        if split:
            _sync(self.device)
            forward_backward = time.perf_counter() - t0
        self.opt.step()
        self.opt.zero_grad()
        return forward_backward if split else None

    def backward(self):
        """Forward, loss and backward: the step's gradients in `.grad` (the clipped sums, for bkfx)."""
        with torch.autocast(self.device, dtype=self.amp, enabled=self.amp is not None):
            loss = self.loss(self.x, self.y)
        loss.backward()

    def _vmap_step(self):
        from torch.func import functional_call, grad, vmap

        params = {n: p.detach() for n, p in self.model.named_parameters()}
        one = lambda p, x, y: self.loss_fn(functional_call(self.model, p, (x[None],)), y[None])  # noqa: E731
        grads = vmap(grad(one), in_dims=(None, 0, 0))(params, self.x, self.y)
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
        c = (R / norms.clamp(min=R))
        B = self.x.shape[0]
        for n, p in self.model.named_parameters():
            summed = torch.tensordot(c, grads[n], dims=1)
            p.grad = (summed + torch.randn_like(summed) * SIGMA * R) / B
        self.opt.step()
        self.opt.zero_grad()


def _batch_positions(wrapped, model, inputs):
    """Opacus's hooks take every layer's input to be batch-first, but HF GPT-2 looks its position
    embedding up with ids of shape [1, T]; give them per sample (the same values, contiguous,
    as Opacus's embedding norm sampler views them flat)."""
    if getattr(getattr(model, "config", None), "model_type", None) != "gpt2":
        return wrapped
    positions = torch.arange(inputs.shape[1], device=next(model.parameters()).device)
    return lambda x: wrapped(x, position_ids=positions.repeat(x.shape[0], 1))  # any batch size (largest-batch search)


class _Criterion(torch.nn.Module):
    """Per-sample losses `[B]` (token losses averaged per sequence) for Opacus's ghost-clipping
    loss wrapper, which sets `reduction` to "none" while it calls the criterion."""

    def __init__(self, loss_fn):
        super().__init__()
        self.loss_fn, self.reduction = loss_fn, "mean"

    def forward(self, out, y):
        logits = out.logits if hasattr(out, "logits") else out
        flat = logits.reshape(-1, logits.shape[-1]) if logits.dim() > 2 else logits
        target = y.reshape(-1)
        per_token = torch.nn.functional.cross_entropy(flat, target, reduction="none")
        return per_token.reshape(y.shape[0], -1).mean(1)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, for a table cell."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


def fresh_dynamo():
    """Forget dynamo's compiled code before a workload's trainers. Every trainer's `_loss` is one
    code object; dynamo guards on a DP model's operator handle (a constant), so each DP model
    recompiles it, and under fullgraph=True the ninth recompilation is an error."""
    torch._dynamo.reset()


def make_trainers(methods, factory, x, y, loss_fn, device, amp=None):
    """Trainers that took one step (capture, lazy buffers), and why the others failed."""
    trainers, failures = {}, {}
    for method in methods:
        try:
            t = Trainer(method, factory, x, y, loss_fn, device, amp)
            t.step()
            trainers[method] = t
        except Exception as e:  # a peer that cannot train this model is reported, not fatal
            failures[method] = first_line(e)
            if device == "cuda":
                torch.cuda.empty_cache()
    return trainers, failures


def time_trainers(trainers, device, warmup, steps, split=False, memory=False):
    """Median step seconds per method, the methods taking turns step by step. With `split`,
    also the median forward+backward seconds; with `memory` (CUDA), each method's peak
    `torch.cuda.max_memory_allocated` during its steps and that peak minus the memory allocated
    before the step (what the step itself needs). A method that fails mid-way is dropped and
    reported."""
    times = {m: [] for m in trainers}
    parts = {m: [] for m in trainers}
    peak, step_peak, failures = {}, {}, {}
    for i in range(warmup + steps):
        for method, t in list(trainers.items()):
            _sync(device)
            if memory:
                resting = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                fb = t.step(split=split)
            except Exception as e:
                failures[method] = first_line(e)
                del trainers[method]
                continue
            _sync(device)
            if i >= warmup:
                times[method].append(time.perf_counter() - t0)
                if split:
                    parts[method].append(fb)
            if memory:
                top = torch.cuda.max_memory_allocated()
                peak[method] = max(peak.get(method, 0), top)
                step_peak[method] = max(step_peak.get(method, 0), top - resting)
    out = {"median_s": {m: statistics.median(v) for m, v in times.items() if v}, "failed": failures}
    if split:
        out["forward_backward_s"] = {m: statistics.median(v) for m, v in parts.items() if v}
    if memory:
        out["peak_bytes"], out["step_bytes"] = peak, step_peak
    return out


def time_methods(model_name, args, device):
    factory, x, y, loss_fn = workload(model_name, args.batch, args.seq, args.vocab)
    fresh_dynamo()
    trainers, failures = make_trainers(args.methods, factory, x, y, loss_fn, device)
    timed = time_trainers(trainers, device, args.warmup, args.steps)
    return timed["median_s"], {**failures, **timed["failed"]}


def memory_probe(model_name, method, args, device):
    """MiB one training step needs above the resting state (model, optimizer, interpreter)."""
    from group_memory import peak_rss_bytes, reset_peak, rss_bytes

    factory, x, y, loss_fn = workload(model_name, args.batch, args.seq, args.vocab)
    t = Trainer(method, factory, x, y, loss_fn, device)
    t.step()  # the capture and every lazily allocated buffer
    if device == "cuda":
        torch.cuda.synchronize()
        resting = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t.step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - resting) / 2**20
    resting = rss_bytes()
    reset_peak()
    t.step()
    return (peak_rss_bytes() - resting) / 2**20


def _child(flag, model_name, method, batch, args) -> list[str]:
    """The command line of a child run of this script (`--probe` or `--fits`) on one workload."""
    return [sys.executable, __file__, flag, model_name, method, "--batch", str(batch), "--seq", str(args.seq),
            "--vocab", str(args.vocab), "--device", args.device]


def measure_memory(model_name, method, args):
    cmd = _child("--probe", model_name, method, args.batch, args)
    # glibc's fixed 64 KiB mmap threshold returns freed tensors at once, so resting RSS is what is live
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    lines = [l for l in done.stdout.splitlines() if l.startswith("PEAK_MIB ")]
    return float(lines[-1].split()[1]) if lines else None


def batch_fits(model_name, method, batch, args) -> bool:
    """Whether one training step at `batch` runs (a fresh subprocess: an out-of-memory error
    there leaves this process clean)."""
    done = subprocess.run(_child("--fits", model_name, method, batch, args), capture_output=True, text=True)
    return done.returncode == 0 and "FITS" in done.stdout


def largest_batch(model_name, method, args) -> int:
    """The largest batch (up to --max-batch) whose step runs: doubling from --batch, then bisection."""
    if not batch_fits(model_name, method, args.batch, args):
        return 0
    fits, fails = args.batch, None
    while fails is None and fits < args.max_batch:
        trial = min(2 * fits, args.max_batch)
        if batch_fits(model_name, method, trial, args):
            fits = trial
        else:
            fails = trial
    while fails is not None and fails - fits > max(1, fits // 16):  # to within 1/16
        mid = (fits + fails) // 2
        fits, fails = (mid, fails) if batch_fits(model_name, method, mid, args) else (fits, mid)
    return fits


def measure_memories(model_name, methods, args) -> dict:
    """Step memory of each method, two subprocesses at a time (each one's peak is its own)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = 1 if args.device == "cuda" else 2
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(methods, pool.map(lambda m: measure_memory(model_name, m, args), methods)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "vit", "gpt2"])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192, help="GPT-2 vocabulary (its real one is 50257)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled methods "
                    f"({', '.join(COMPILED_METHODS)}); reduce-overhead: CUDA graphs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--max-batch", type=int, default=0,
                    help="also search each method's largest batch that fits, up to this (meant for a GPU)")
    ap.add_argument("--probe", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--fits", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    COMPILE["mode"] = args.compile_mode
    if args.probe:
        print(f"PEAK_MIB {memory_probe(*args.probe, args, args.device):.1f}")
        return
    if args.fits:
        factory, x, y, loss_fn = workload(args.fits[0], args.batch, args.seq, args.vocab)
        Trainer(args.fits[1], factory, x, y, loss_fn, args.device).step()
        print("FITS")
        return
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    results = {"machine": machine, "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "vocab": args.vocab,
               "steps": args.steps, "models": {}}
    for model_name in args.models:
        print(f"[{model_name}] timing {len(args.methods)} methods ...", flush=True)
        medians, failures = time_methods(model_name, args, args.device)
        memory = {} if args.no_memory else measure_memories(model_name, list(medians), args)
        largest = {m: largest_batch(model_name, m, args) for m in medians} if args.max_batch else {}
        results["models"][model_name] = {"median_s": medians, "failed": failures, "peak_mib": memory,
                                         "largest_batch": largest}
        base = medians.get("non-private")
        for m, s in medians.items():
            mem = memory.get(m)
            print(f"  {m:16s} {s:8.4f}s  {s / base if base else float('nan'):5.2f}x"
                  + (f"  step memory {mem:8.1f} MiB" if mem else "")
                  + (f"  largest batch {largest[m]}" if m in largest else ""), flush=True)
        for m, why in failures.items():
            print(f"  {m:16s} failed: {why}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    tag = "gpu" if args.device == "cuda" else "cpu"
    with open(os.path.join(args.out, f"results-{tag}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, f"results-{tag}.md"), "w") as f:
        f.write(markdown(results, args))
    plot(results, os.path.join(args.out, f"results-{tag}.png"))
    print(markdown(results, args))


def markdown(results, args) -> str:
    searched = any(r.get("largest_batch") for r in results["models"].values())
    lines = [
        f"Machine: {results['machine']}; torch {results['torch']}; batch {results['batch']}, "
        f"GPT-2 seq {results['seq']}, vocabulary {results['vocab']}; median of {results['steps']} steps after warm-up.\n",
        f"Command: `{' '.join(['python benchmarks/run.py'] + sys.argv[1:])}`\n",
        "| model | method | median step (s) | time vs non-private | Opacus ghost time / this | step memory (MiB) "
        "| memory vs non-private |" + (" largest batch |" if searched else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if searched else ""),
    ]
    for model, r in results["models"].items():
        base_t, base_m = r["median_s"].get("non-private"), r["peak_mib"].get("non-private")
        ghost = r["median_s"].get("opacus ghost")
        for m, s in r["median_s"].items():
            mem = r["peak_mib"].get(m)
            lines.append(
                f"| {model} | {m} | {s:.4f} | {s / base_t:.2f}x | {f'{ghost / s:.2f}x' if ghost else '-'} | "
                f"{f'{mem:.1f}' if mem else '-'} | {f'{mem / base_m:.2f}x' if mem and base_m else '-'} |"
                + (f" {r.get('largest_batch', {}).get(m, '-')} |" if searched else "")
            )
        for m, why in r["failed"].items():
            lines.append(f"| {model} | {m} | failed: {why} | - | - | - | - |" + (" - |" if searched else ""))
    return "\n".join(lines) + "\n"


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = list(results["models"])
    methods = [m for m in METHODS if any(m in results["models"][k]["median_s"] for k in models)]
    fig, ax = plt.subplots(figsize=(1.8 * len(models) + 3, 4))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        ratios = []
        for k in models:
            r = results["models"][k]["median_s"]
            ratios.append(r[m] / r["non-private"] if m in r and "non-private" in r else 0)
        ax.bar([i + j * width for i in range(len(models))], ratios, width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))], models)
    ax.set_ylabel("step time / non-private")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_title(f"DP training step time ({results['machine']})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
