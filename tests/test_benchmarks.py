"""The benchmark harness keeps working: its trainers step, its search and table are right.
(Speed itself is measured by benchmarks/run.py, never asserted here.)"""
from __future__ import annotations

import os
import sys
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
