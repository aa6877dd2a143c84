"""torch.autograd.Function under bkfx: torch.export inlines a Function's forward, so the capture
would differentiate that instead of the backward the Function defines. Every Function applied
during the capture (nested, inside a submodule, inside library code) is refused, naming its class
and the user's line; the ways out the refusal names (plain torch, a torch.library custom op,
non-reentrant checkpointing) get exactly the reference's gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import bkfx
from bkfx.testing import assert_matches_reference, per_sample_gradients

from helpers import marked_lines

f64 = torch.float64


line_of = marked_lines(__file__)  # line_of("x"): the line ending with the comment `# x`


class RoundSTE(torch.autograd.Function):
    """Straight-through estimator: round forward, identity backward (vmap-able, for the reference)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g


class MixingBackward(torch.autograd.Function):
    """Identity forward; its backward adds the batch mean of the gradient: it mixes samples."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g + g.mean(0, keepdim=True)


class ReverseGradient(torch.autograd.Function):
    """The gradient reversal layer of domain-adversarial training: identity forward, -λ g backward."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.lam * g, None


class SavedExp(torch.autograd.Function):
    """exp with its output saved for backward (the backward is the true derivative)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y


class Outer(torch.autograd.Function):
    """A Function whose forward applies another one."""

    @staticmethod
    def forward(ctx, x):
        return SavedExp.apply(x) * 2

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class Around(nn.Module):
    """Linear, a function of the hidden values, linear."""

    def __init__(self, fn):
        super().__init__()
        self.a, self.b, self.fn = nn.Linear(4, 5), nn.Linear(5, 3), fn

    def forward(self, x):
        return self.b(self.fn(self.a(x)))


class Quantiser(nn.Module):
    def forward(self, h):
        return RoundSTE.apply(h * 4) / 4  # applied in a submodule


def _refusal(model, x) -> str:
    with pytest.raises(bkfx.UnsupportedOperationError) as info:
        bkfx.compile(model)(x)
    message = str(info.value)
    for part in ("node:", "operation:", "source:", "what to do:"):
        assert part in message, message
    return message


CASES = [
    ("straight-through estimator", lambda: Around(lambda h: RoundSTE.apply(h)), "RoundSTE", "ste"),  # ste
    ("mixing backward", lambda: Around(lambda h: MixingBackward.apply(h)), "MixingBackward", "mix"),  # mix
    ("gradient reversal", lambda: Around(lambda h: ReverseGradient.apply(h, 0.5)), "ReverseGradient", "grl"),  # grl
    ("save_for_backward", lambda: Around(lambda h: SavedExp.apply(h)), "SavedExp", "saved"),  # saved
    ("nested Functions", lambda: Around(lambda h: Outer.apply(h)), "Outer", "outer"),  # outer
    ("in a submodule", lambda: nn.Sequential(nn.Linear(4, 5), Quantiser(), nn.Linear(5, 3)), "RoundSTE",
     "applied in a submodule"),
]


@pytest.mark.parametrize("name,make,cls,marker", CASES, ids=[c[0] for c in CASES])
def test_a_function_is_refused_naming_its_class_and_the_users_line(name, make, cls, marker):
    message = _refusal(make().double(), torch.randn(4, 4, dtype=f64))
    assert f"torch.autograd.Function {__name__}.{cls}" in message, message
    assert f"test_custom_function.py:{line_of(marker)}" in message, message
    assert "custom_op" in message  # what to do


def test_the_nested_function_is_named_too():
    message = _refusal(Around(lambda h: Outer.apply(h)).double(), torch.randn(3, 4, dtype=f64))
    assert "also applied" in message and "SavedExp" in message, message


def test_the_refusal_names_the_first_node_the_function_traced():
    message = _refusal(Around(lambda h: SavedExp.apply(h)).double(), torch.randn(3, 4, dtype=f64))
    assert "operation: exp" in message, message


def test_the_apply_hook_is_removed_after_the_capture():
    original = torch.autograd.Function.__dict__["apply"]
    _refusal(Around(lambda h: RoundSTE.apply(h)).double(), torch.randn(3, 4, dtype=f64))
    assert torch.autograd.Function.__dict__["apply"] is original


def test_the_vmap_reference_honours_the_functions_backward():
    """Why refusing matters: the reference's gradient through the estimator is the identity's,
    not round's zero."""
    torch.manual_seed(0)
    model = Around(lambda h: RoundSTE.apply(h)).double()
    x, y = torch.randn(4, 4, dtype=f64), torch.randint(0, 3, (4,))
    by_vmap = per_sample_gradients(model, F.cross_entropy, x, y)
    by_loop = per_sample_gradients(model, F.cross_entropy, x, y, method="loop")
    for name in by_vmap:
        torch.testing.assert_close(by_vmap[name], by_loop[name], rtol=1e-12, atol=1e-12)
    assert by_vmap["a.weight"].abs().sum() > 0


def test_checkpoint_with_reentrant_recomputation_is_refused_with_advice_and_without_matches():
    torch.manual_seed(1)

    def make(reentrant):
        return Around(lambda h: checkpoint(torch.tanh, h, use_reentrant=reentrant)).double()

    message = _refusal(make(True), torch.randn(3, 4, dtype=f64))
    assert "CheckpointFunction" in message and "use_reentrant=False" in message, message
    x, y = torch.randn(4, 4, dtype=f64), torch.randint(0, 3, (4,))
    assert_matches_reference(make(False), F.cross_entropy, x, y, method="loop", max_grad_norm=0.1)


@torch.library.custom_op("bkfx_test::round_ste", mutates_args=())
def round_ste(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)


@round_ste.register_fake
def _(x):
    return torch.empty_like(x)


round_ste.register_autograd(lambda ctx, g: g)


def test_a_custom_op_with_its_autograd_gets_exactly_its_backward():
    """The refusal's way out: the estimator as a torch.library custom op is one graph node, and
    its registered backward (the identity) is the gradient, equal to the reference's."""
    torch.manual_seed(2)
    model = Around(round_ste).double()
    x, y = torch.randn(5, 4, dtype=f64) * 3, torch.randint(0, 3, (5,))
    dp, _ = assert_matches_reference(model, F.cross_entropy, x, y, method="loop", max_grad_norm=0.2)
    assert model.a.weight.grad.abs().sum() > 0  # round's own derivative would leave zero


def test_plain_torch_straight_through_estimator_matches_the_reference():
    torch.manual_seed(3)
    model = Around(lambda h: h + (torch.round(h) - h).detach()).double()
    x, y = torch.randn(5, 4, dtype=f64) * 3, torch.randint(0, 3, (5,))
    assert_matches_reference(model, F.cross_entropy, x, y, max_grad_norm=0.2)
    assert model.a.weight.grad.abs().sum() > 0
