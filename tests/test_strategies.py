"""`bkfx.testing.strategies`: the architectures it draws are valid models with matching data
(hypothesis's health checks on), built deterministically from their printed spec, and bkfx
matches the vmap reference on them in float64 — the property test users write with them."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from bkfx.testing.strategies import (
    CNNSpec, FunctionalSpec, MLPSpec, SequenceSpec, architectures, cnns, compile_options, functional_models, mlps,
    sequence_models,
)

# modest, with every health check on (the suite's profile silences some)
settings.register_profile("strategies", max_examples=12, deadline=None, suppress_health_check=())
STRATEGIES = settings.get_profile("strategies")

FAMILIES = {"mlp": (mlps, MLPSpec), "cnn": (cnns, CNNSpec), "sequence": (sequence_models, SequenceSpec),
            "functional": (functional_models, FunctionalSpec)}


def well_formed(arch):
    """Float64 parameters, inputs batched alike, a finite scalar loss, targets that fit the output."""
    B = arch.inputs[0].shape[0]
    assert all(p.dtype == torch.float64 for p in arch.model.parameters())
    assert any(p.requires_grad for p in arch.model.parameters())
    assert all(x.shape[0] == B for x in arch.inputs) and arch.targets.shape[0] == B
    with torch.no_grad():
        out = arch.model(*arch.inputs)
        loss = arch.loss_fn(out, arch.targets)
    assert out.shape[0] == B and loss.dim() == 0 and torch.isfinite(loss)
    if arch.targets.dtype == torch.long:  # class ids within the output's classes
        assert arch.targets.shape == out.shape[:-1] and int(arch.targets.max()) < out.shape[-1]
    else:
        assert arch.targets.shape == out.shape


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_matches_the_reference(family):
    strategy, spec_type = FAMILIES[family]

    @STRATEGIES
    @given(arch=strategy(), options=compile_options())
    def prop(arch, options):
        assert isinstance(arch.spec, spec_type)
        well_formed(arch)
        dp, errors = arch.check(**options)
        trained = {n for n, p in arch.model.named_parameters() if p.requires_grad}
        assert set(errors) == trained and max(errors.values()) <= 1e-6
        assert dp.per_sample_norms.shape == (arch.inputs[0].shape[0],)

    prop()


@STRATEGIES
@given(arch=architectures(loss_reduction="sum"))
def test_any_architecture_with_summed_loss(arch):
    well_formed(arch)
    assert arch.loss_reduction == "sum"
    arch.check(max_grad_norm=0.1)


@STRATEGIES
@given(arch=architectures())
def test_the_printed_spec_builds_the_same_model_and_data_and_torch_rng_is_left_alone(arch):
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    again = arch.spec.build(arch.loss_reduction)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert [n for n, _ in arch.model.named_parameters()] == [n for n, _ in again.model.named_parameters()]
    assert all(torch.equal(p, q) for p, q in zip(arch.model.parameters(), again.model.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(arch.inputs, again.inputs))
    assert torch.equal(arch.targets, again.targets)
    assert repr(arch).startswith(f"Architecture({arch.spec!r}")


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown architecture families"):
        architectures(["rnn"])
