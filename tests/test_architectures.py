"""Property tests over whole architectures drawn by `bkfx.testing.strategies`: after one
`loss.backward()` every trainable parameter's `.grad` and the per-sample norms match the
`torch.func.vmap` reference (`bkfx.testing.assert_matches_reference`, at its tolerances:
1e-6 relative in float64, 1e-4 in float32), frozen parameters and parameters the loss does
not reach keep `.grad is None` exactly where an ordinary backward leaves it, and the
compiled forward returns exactly the model's output.
"""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from bkfx.testing.strategies import compile_options, functional_models, mlps, sequence_models, tied_models

REDUCTIONS = st.sampled_from(["mean", "sum"])


def drawn(family, **options):
    """`family`'s architectures under either loss reduction."""
    return REDUCTIONS.flatmap(lambda reduction: family(loss_reduction=reduction, **options))


def sequences(**options):
    return drawn(sequence_models, frozen=True, position_ranks=(2, 3), **options)


def check(arch, options: dict):
    model, inputs, targets = arch.model, arch.inputs, arch.targets
    dtype = next(model.parameters()).dtype
    # which parameters an ordinary backward reaches: bkfx must leave None exactly where torch does
    arch.loss_fn(model(*inputs), targets).backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None}
    dp, errors = arch.check(**options)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen parameter {name} received a gradient"
        elif name not in reached:
            assert p.grad is None, f"{name} does not reach the loss but received a gradient"
        else:
            assert name in errors, f"{name} was not compared"
            assert p.grad is not None and p.grad.dtype == dtype and p.grad.shape == p.shape, name
    assert dp.per_sample_norms.shape == (targets.shape[0],)
    with torch.no_grad():
        assert torch.equal(dp(*inputs), model(*inputs)), "the compiled forward differs from the model's"


@given(arch=drawn(mlps), options=compile_options())
def test_mlp(arch, options):
    check(arch, options)


@given(arch=sequences(), options=compile_options())
def test_sequence_model(arch, options):
    check(arch, options)


@given(arch=drawn(functional_models), options=compile_options())
def test_functional_calls(arch, options):
    check(arch, options)


@given(arch=drawn(tied_models), options=compile_options())
def test_tied_sites(arch, options):
    check(arch, options)


# LayerNorm over 2 features maps every input to about (-1, 1) or (1, -1); its backward is then
# float32 cancellation noise, as far from the float64 truth in the reference as in bkfx. The
# float64 properties above cover those widths.
@given(
    arch=drawn(mlps, dtype=torch.float32) | sequences(dtype=torch.float32, min_width=3)
    | drawn(functional_models, dtype=torch.float32) | drawn(tied_models, dtype=torch.float32),
    options=compile_options(),
)
def test_float32(arch, options):
    check(arch, options)
