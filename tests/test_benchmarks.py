"""The benchmark harness keeps working: its trainers step, its search and table are right.
(Speed itself is measured by benchmarks/run.py, never asserted here.)"""
from __future__ import annotations

import os
import sys
import time
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import run  # noqa: E402
from models import workload  # noqa: E402


@pytest.mark.parametrize("method", ["non-private", "bkfx", "bkfx layer-wise", "vmap dp-sgd"])
def test_every_bkfx_and_reference_method_trains_the_mlp(method):
    factory, x, y, loss_fn = workload("mlp", 4)
    trainer = run.Trainer(method, factory, x, y, loss_fn, "cpu")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.step()
    assert all(p.grad is None for p in trainer.model.parameters())  # zero_grad after the step
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("limit", [0, 16, 17, 100, 999, 5000])
def test_largest_batch_search(monkeypatch, limit):
    monkeypatch.setattr(run, "batch_fits", lambda model, method, batch, args: batch <= limit)
    found = run.largest_batch("mlp", "bkfx", types.SimpleNamespace(batch=16, max_batch=4096))
    if limit < 16:
        assert found == 0
    else:
        best = min(limit, 4096)
        assert best - best // 16 <= found <= best


def test_table_gives_ratios_to_non_private_and_to_opacus_ghost():
    results = {"machine": "m", "torch": "t", "batch": 4, "seq": 8, "vocab": 16, "steps": 3, "models": {"mlp": {
        "median_s": {"non-private": 0.1, "bkfx": 0.12, "opacus ghost": 0.3},
        "peak_mib": {"non-private": 10.0, "bkfx": 11.0}, "failed": {"opacus hooks": "Error: x"}}}}
    table = run.markdown(results, None)
    assert "| mlp | bkfx | 0.1200 | 1.20x | 2.50x | 11.0 | 1.10x |" in table
    assert "| mlp | opacus hooks | failed: Error: x |" in table


def test_gpu_benchmark_dry_run_on_the_cpu(tmp_path):
    """`bash benchmarks/gpu.sh --cpu`: every workload and the largest-batch search run end to end at
    tiny sizes (Opacus's rows only where opacus is installed: it is a bench extra, not a test one)."""
    import importlib.util
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["bash", os.path.join(root, "benchmarks", "gpu.sh"), "--cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("results-gpu-dryrun-cpu.json")
    results = json.loads(result.read_text())
    methods = ["non-private", "bkfx"] + (["opacus ghost"] if importlib.util.find_spec("opacus") else [])
    assert [w["model"] for w in results["workloads"]] == ["gpt2-tiny", "gpt2-tiny", "vit-tiny", "wrn16-1"]
    for w in results["workloads"]:
        assert w["status"] == "ok", w
        assert set(methods) <= set(w["median_s"]) | set(w["failed"])
        assert "non-private" in w["median_s"] and all(s > 0 for s in w["median_s"].values())
        assert set(w["forward_backward_s"]) == set(w["median_s"])
    fp32 = results["workloads"][0]
    assert {"bkfx", "bkfx ghost", "bkfx explicit"} <= set(fp32["median_s"])  # the cost model's candidates run
    search = results["largest_batch"]["methods"]
    assert set(search) == set(methods)
    for r in search.values():  # nothing runs out of memory at these sizes: the search doubles up to its cap
        assert r["largest"] == results["largest_batch"]["cap"] and all(ok for _, ok in r["tries"]), r
    table = (tmp_path / "results-gpu-dryrun-cpu.md").read_text()
    assert "CPU dry run" in table and "| GPT-2 (tiny) fp32, B=4 | bkfx |" in table
    assert "Largest batch that fits" in table


def test_a_crashing_workload_is_recorded_not_fatal():
    import gpu

    def boom(send):
        send(("facts", {"device": "d"}))
        raise RuntimeError("first line\nsecond line")

    messages, status = gpu.in_child(boom, (), 30)
    assert messages[0] == ("facts", {"device": "d"}) and status == "crashed: RuntimeError: first line"
    messages, status = gpu.in_child(lambda send: time.sleep(30), (), 1)
    assert status == "timed out after 1 s"


@pytest.mark.compiled
def test_compiled_benchmark_runs_end_to_end(tmp_path):
    """`benchmarks/compiled.py` at tiny sizes: every method (the eager, dp_model.compile and
    torch.compile(fullgraph=True) bkfx steps, non-private eager and compiled) is timed, the first
    step apart; each compiled bkfx step's `.grad` agrees with the eager one; the compiled bkfx
    steps' ratios are to the compiled non-private step."""
    import json
    import subprocess

    import compiled

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "compiled.py"), "--models", "mlp30x16", "--batch", "4",
         "--steps", "2", "--warmup", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
        # this checkout's bkfx (the script's own folder, not the root, is on its path)
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (w,) = json.loads((tmp_path / "compiled-cpu.json").read_text())["workloads"]
    assert "bkfx torch.compile" in compiled.METHODS
    assert set(w["median_s"]) == set(compiled.METHODS) and not w["failed"], w["failed"]
    assert set(w["forward_backward_s"]) == set(w["median_s"])
    assert all(w["first_step_s"][m] > 0 for m in compiled.METHODS)
    assert set(w["grad_vs_eager"]) == {"bkfx compiled", "bkfx torch.compile"}
    assert all(isinstance(d, float) and d < 1e-5 for d in w["grad_vs_eager"].values()), w["grad_vs_eager"]
    table = (tmp_path / "compiled-cpu.md").read_text()
    m = w["median_s"]
    for method in ("bkfx compiled", "bkfx torch.compile"):
        assert f"**{method} / non-private compiled**" in table
        assert f"**{m[method] / m['non-private compiled']:.2f}x**" in table
    assert f"| {m['bkfx'] / m['non-private']:.2f}x |" in table  # the eager step's ratio is to the eager base
