"""The public API refuses misuse with a message saying what to do (issue: a newcomer's first tries)."""
import pytest
import torch
from torch import nn

import bkfx


def _dp():
    return bkfx.compile(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double())


def test_compiling_a_compiled_model_says_so():
    dp = _dp()
    with pytest.raises(bkfx.BkfxError, match=r"(?s)already compiled.*dp_model\.module"):
        bkfx.compile(dp)


def test_dp_model_compile_refuses_unknown_keywords():
    dp = _dp()
    with pytest.raises(TypeError, match=r"fullgraph"):
        dp.compile(fullgraph=True)
    with pytest.raises(TypeError, match=r"keyword arguments only"):
        dp.compile("inductor")


def test_internal_errors_are_not_hidden_behind_the_eager_fallback(monkeypatch):
    """A failure inside bkfx's own code while building the compiled step raises; only torch's
    tracing or compilation failures fall back to the eager step with a warning."""
    from bkfx._runtime import step as compiled_step

    def broken_build(*args, **kwargs):
        raise AssertionError("an internal invariant")

    monkeypatch.setattr(compiled_step, "build", broken_build)
    dp = _dp()
    dp.compile(backend="aot_eager")
    with pytest.raises(AssertionError, match="internal invariant"):
        dp(torch.randn(4, 3, dtype=torch.float64))


def test_torch_failures_still_fall_back_to_the_eager_step(monkeypatch):
    from bkfx._runtime import step as compiled_step

    def torch_fails(*args, **kwargs):
        def data_dependent(x):
            return x if x.sum() > 0 else -x

        torch.fx.symbolic_trace(data_dependent)  # torch's tracer raises a TraceError

    monkeypatch.setattr(compiled_step, "build", torch_fails)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    dp = bkfx.compile(model)
    dp.compile(backend="aot_eager")
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="could not be built"):
        out = dp(x)
    assert torch.equal(out, model(x))
    assert dp.compiled_step_failure.startswith("TraceError")
