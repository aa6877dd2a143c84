"""Checks of bkfx's device paths, one PASS/FAIL line each, for the lent GPU (about a minute
on an H100). `--device cpu` is the dry run this machine can do.

    PYTHONPATH=. python tests/gpu_checks.py --device cuda [--out $OUT]

1. pytest: every device-parametrised test (the `device` fixture) on this device: the
   contract and rules tests, bf16 autocast and fp16 + GradScaler against the reference.
2. Noise on the device: `DPOptimizer.add_noise` for 124M parameters draws on the device
   with no host-to-device copy (torch.profiler), reproducibly from a seed; its time.
3. Gram strategy: on a GPU one bmm per Gram (no blocks), and it is faster than the CPU's
   blocked lower triangle on the device (GPT-2's c_fc site: B 16, T 512, 768 -> 3072).
4. GPT-2 (4 layers, d 256, T 256, B 16) under bf16 autocast: bkfx's step time over
   non-private's, and its gradients close to the float32 reference (informational ratio).
5. The compiled BK step (inductor; with mode="reduce-overhead" bkfx's CUDA graphs) against the
   eager step through a sequence that exercises graph replay: repeated and new batch sizes,
   gradient accumulation, a retained backward run again after a later call replayed the graph.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=5, warmup=2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def check_pytest(device: torch.device) -> None:
    import pytest

    tests = [os.path.join(ROOT, "tests", f) for f in ("test_mixed_precision.py", "test_noise_device.py", "test_contract.py", "test_rules.py")]
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-W", "ignore", "-k", device.type, *tests])
    report(f"pytest device-parametrised tests on {device.type}", rc == 0, f"exit code {int(rc)}")


def check_noise(device: torch.device, params: int) -> None:
    import bkfx
    from torch.profiler import ProfilerActivity, profile

    shapes = [(params // 8 // 768, 768)] * 8
    weights = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]

    def optimizer(seed):
        opt = bkfx.DPOptimizer(torch.optim.SGD(weights, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                               expected_batch_size=1, seed=seed)
        for w in weights:
            w.grad = torch.zeros_like(w)
        return opt

    draws = []
    for seed in (3, 3, 4):
        opt = optimizer(seed)
        opt.add_noise()
        draws.append(torch.cat([w.grad[:2].flatten() for w in weights]).clone())
    report("noise reproducible from a seed", torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2]))
    grads = torch.cat([w.grad.flatten() for w in weights])
    std = grads.std().item()
    report("noise has std sigma*R", abs(std - 1.0) < 0.01, f"std {std:.4f} over {grads.numel():,} entries")
    opt = optimizer(5)
    report("noise generator on the parameters' device", opt.generator_for(device).device.type == device.type)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        opt.add_noise()
        sync(device)
    copies = [e for e in prof.events() if "Memcpy HtoD" in e.name]
    report("no host-to-device copies while adding noise", not copies, f"{len(copies)} Memcpy HtoD events")
    ms = 1e3 * timed(opt.add_noise, device, repeat=3, warmup=1)
    report(f"noise for {sum(w.numel() for w in weights) / 1e6:.0f}M parameters", True, f"{ms:.1f} ms per step")


def check_grams(device: torch.device, small: bool) -> None:
    from bkfx.rules.factors import Dense, Factored, gram_block_count, inner, self_inner

    B, T, m, n = (2, 256, 96, 32) if small else (16, 512, 3072, 768)
    expected_blocks = 1 if device.type != "cpu" else 4
    report("Gram blocks per device", gram_block_count(512, device) == expected_blocks,
           f"{gram_block_count(512, device)} block(s) at T=512 on {device.type}")
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=device).manual_seed(0)
        piece = Factored(Dense(torch.randn(B, T, m, device=device, generator=g).to(dtype)),
                         Dense(torch.randn(B, T, n, device=device, generator=g).to(dtype)))
        exact = torch.bmm(piece.L.t.double().transpose(1, 2), piece.R.t.double()).flatten(1).pow(2).sum(1)
        single = inner(piece, piece, (m, n))  # the device's strategy
        err = ((single.double() - exact).abs().max() / exact.max()).item()
        tol = 1e-5 if dtype == torch.float32 else 4e-3
        report(f"ghost norm accuracy ({dtype}, T={T})", single.dtype == torch.float32 and err <= tol,
               f"relative error {err:.2e} <= {tol:g}")
        if device.type == "cuda":
            import bkfx.rules.factors as factors

            t_single = timed(lambda: inner(piece, piece, (m, n)), device)
            original = factors.gram_block_count
            factors.gram_block_count = lambda T, device: max(1, min(4, T // 64))  # the CPU's blocks, forced
            try:
                t_blocked = timed(lambda: self_inner(piece), device)
            finally:
                factors.gram_block_count = original
            report(f"one bmm per Gram faster than blocks on the GPU ({dtype})", t_single <= t_blocked,
                   f"single {1e3 * t_single:.2f} ms, blocked {1e3 * t_blocked:.2f} ms")


def check_gpt2(device: torch.device, small: bool) -> None:
    import copy

    import torch.nn.functional as F
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    import bkfx
    from bkfx.testing import clipped_sum_reference, per_sample_gradients

    transformers.logging.set_verbosity_error()
    vocab = 512
    layers, d, T, B = (2, 64, 32, 4) if small else (4, 256, 256, 16)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=d, n_head=4, vocab_size=vocab, n_positions=T,
                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, use_cache=False)
    model = GPT2LMHeadModel(config).to(device)
    ids = torch.randint(0, vocab, (B, T), device=device)
    targets = torch.randint(0, vocab, (B, T), device=device)

    def loss_fn(out, y):
        return F.cross_entropy(out.logits.reshape(-1, vocab).float(), y.reshape(-1))

    def step(m):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(m(ids), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    dp = bkfx.compile(model, max_grad_norm=1.0)
    plain_t, dp_t = timed(lambda: step(model), device), timed(lambda: step(dp), device)
    report("GPT-2 bf16 autocast step (bkfx / non-private)", True,
           f"{1e3 * dp_t:.1f} ms / {1e3 * plain_t:.1f} ms = {dp_t / plain_t:.2f}x ({layers}x{d}, T {T}, B {B})")

    # accuracy on a few samples: bkfx under bf16 autocast vs the float64 reference
    n = 4
    exact = copy.deepcopy(model).double()
    grads = per_sample_gradients(exact, loss_fn, (ids[:n],), targets[:n], method="loop")
    expected, norms = clipped_sum_reference(grads, max_grad_norm=1.0)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss_fn(dp(ids[:n]), targets[:n]).backward()
    err = max(((p.grad.double() - expected[k]).abs().max() / expected[k].abs().max()).item()
              for k, p in model.named_parameters())
    norm_err = ((dp.per_sample_norms.double() - norms).abs().max() / norms.max()).item()
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss_fn(model(ids[:n]), targets[:n]).backward()
    plain = max(((p.grad.double() - grads[k].mean(0)).abs().max() / grads[k].mean(0).abs().max()).item()
                for k, p in model.named_parameters())
    model.zero_grad(set_to_none=True)
    report("GPT-2 bf16: bkfx's .grad error within 3x autocast's own", err <= 3 * plain,
           f"bkfx {err:.2e}, non-private autocast {plain:.2e}; norms {norm_err:.2e}")


def check_compiled_step(device: torch.device, small: bool) -> None:
    import copy

    import torch.nn.functional as F
    from torch import nn

    import bkfx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)
    g = torch.Generator().manual_seed(1)
    batches = {b: (torch.randn(b, 32, generator=g).to(device), torch.randint(0, 10, (b,), generator=g).to(device))
               for b in (8, 5)}

    def sequence(dp):
        """.grad after each stage of a sequence of calls (copied), and the per-sample norms."""
        out, params = [], list(dp.module.parameters())

        def snap():
            out.append([p.grad.clone() for p in params])
            dp.module.zero_grad(set_to_none=True)

        for b in (8, 8, 5, 8):  # first capture, replay, another graph, back
            F.cross_entropy(dp(batches[b][0]), batches[b][1]).backward()
            out.append([dp.per_sample_norms.clone()])
            snap()
        for b in (8, 8):  # accumulation
            F.cross_entropy(dp(batches[b][0] * 0.5), batches[b][1]).backward()
        snap()
        loss_a = F.cross_entropy(dp(batches[8][0]), batches[8][1])
        loss_a.backward(retain_graph=True)
        F.cross_entropy(dp(batches[8][0] + 1.0), batches[8][1]).backward()  # replays the graph A saved into
        loss_a.backward()
        snap()
        return out

    for mode in (None, "reduce-overhead"):
        eager = bkfx.compile(copy.deepcopy(model), max_grad_norm=0.1)
        compiled = bkfx.compile(copy.deepcopy(model), max_grad_norm=0.1)
        compiled.compile(mode=mode)
        t0 = time.perf_counter()
        want, got = sequence(eager), sequence(compiled)
        worst = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
                    for w, c in zip(want, got) for a, b in zip(w, c))
        graphs = compiled._last_program.graphs
        report(f"compiled step (mode={mode}) vs eager through graph replays", worst < 1e-4,
               f"max relative difference {worst:.2e}; CUDA graphs: "
               f"{'none' if graphs is None else f'{len(graphs._forward)} forward, {len(graphs._backward)} backward'}; "
               f"{time.perf_counter() - t0:.1f} s")

    # torch.compile around the DP model (bkfx's operator): the user's mode reaches bkfx's step
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        eager = bkfx.compile(copy.deepcopy(model), max_grad_norm=0.1)
        compiled = bkfx.compile(copy.deepcopy(model), max_grad_norm=0.1)
        step = torch.compile(lambda x, y: F.cross_entropy(compiled(x), y), fullgraph=True, dynamic=True, mode=mode)
        worst, t0 = 0.0, time.perf_counter()
        for b in (8, 8, 5, 8):
            for dp, run in ((eager, lambda x, y: F.cross_entropy(eager(x), y)), (compiled, step)):
                dp.module.zero_grad(set_to_none=True)
                run(*batches[b]).backward()
            worst = max(worst, *[((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
                                 for p, q in zip(eager.module.parameters(), compiled.module.parameters())])
        graphs = compiled._last_program.graphs
        report(f"torch.compile(fullgraph=True, mode={mode}) around the DP model vs eager", worst < 1e-4
               and (graphs is not None) == (mode == "reduce-overhead" and device.type == "cuda"),
               f"max relative difference {worst:.2e}; bkfx's CUDA graphs: "
               f"{'none' if graphs is None else f'{len(graphs._forward)} forward, {len(graphs._backward)} backward'}; "
               f"{time.perf_counter() - t0:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--only", nargs="+", default=None, help="run only these checks (noise grams gpt2 compiled pytest)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_checks.txt")
    args = parser.parse_args()
    device = torch.device(args.device)
    small = device.type == "cpu"
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    checks = {
        "noise": lambda: check_noise(device, 4_000_000 if small else 124_000_000),
        "grams": lambda: check_grams(device, small),
        "gpt2": lambda: check_gpt2(device, small),
        "compiled": lambda: check_compiled_step(device, small),
    }
    if not args.skip_pytest:
        checks["pytest"] = lambda: check_pytest(device)
    checks = [c for name, c in checks.items() if args.only is None or name in args.only]
    for check in checks:
        try:
            check()
        except Exception as e:  # a crash is a failed check; go on with the others
            import traceback

            traceback.print_exc()
            report(getattr(check, "__name__", "check"), False, f"{type(e).__name__}: {e}")
    failed = [r for r in RESULTS if not r[1]]
    summary = f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed"
    print(summary, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_checks.txt"), "w") as f:
            f.writelines(f"{'PASS' if ok else 'FAIL'} {name}: {detail}\n" for name, ok, detail in RESULTS)
            f.write(summary + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
