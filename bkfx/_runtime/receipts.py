"""Receipts: which `.grad` tensors hold clipped sums that bkfx wrote, so the optimizer steps on nothing else.

`DPOptimizer` must only noise and apply `Σ_i C_i G_i`. A backward through the *original* model
(a one-word slip) accumulates unclipped gradients into the same `.grad`, and a `step()` with no
backward since the last one would take a noise-only step and count it. So every place that writes
a clipped sum into a parameter's `.grad` (the eager ledger, the compiled BK step; the operator of
`torch.compile(dp_model)` runs one of the two) goes through `add_clipped_sum`, which leaves a
receipt: the `.grad` tensor object and its `_version` after the write. At `step()`, `check` wants,
for every parameter with a `.grad`, a receipt of the same tensor object at the same version:

- an extra backward through the original model adds into that tensor in place (its version
  moves) or, when `.grad` was None, puts a tensor of its own there (no receipt);
- `p.grad = t` puts another object there; `p.grad.mul_(2)` moves the version.

A clipped sum added onto a `.grad` that holds no matching receipt (and is not all zeros) would
mix clipped and unclipped gradients: the receipt it gets is spoiled, and `check` refuses it too.
`zero_grad(set_to_none=False)` of the DP optimizer leaves "zero" receipts (a clean start, not a
backward). The optimizer consumes the receipts of the parameters it steps (`consume`).

What bkfx itself does to `.grad` between the backward and the step needs no new receipt: the
optimizer checks first, then noises, all-reduces or reduce-scatters (`bkfx.training.distributed`) and
divides. A `GradScaler`'s `unscale_` (between the backward and `step()`) runs the in-place kernel
`_amp_foreach_non_finite_check_and_unscale_`, which does not move a tensor's version, so the
receipts stay valid through it (`tests/test_receipts.py` checks this).

Limits: a write through `.data` (`p.grad.data.mul_(2)`) shares no version counter with `.grad`
and goes unseen; receipts see which tensor was written and whether it changed since, not its values.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from bkfx._torch import is_view
from bkfx.errors import UnclippedGradientError

CLIPPED, ZERO, SPOILED = "clipped", "zero", "spoiled"

_receipts = WeakIdKeyDictionary()  # parameter -> its Receipt (the parameter's lifetime, not longer)


@dataclass
class Receipt:
    grad: weakref.ref  # the `.grad` tensor written (weak: a `.grad` dropped elsewhere is freed)
    version: int  # its `_version` after the write
    kind: str  # CLIPPED: a clipped sum; ZERO: zeroed by the DP optimizer; SPOILED: added onto foreign values

    def matches(self, grad: torch.Tensor) -> bool:
        return self.grad() is grad and grad._version == self.version


def add_clipped_sum(p: torch.Tensor, grad: torch.Tensor, *, receipt: bool = True) -> None:
    """`p.grad += grad` (or `p.grad = grad`, cast to p's dtype, when it is None), with a receipt
    (none for a trace's leaf: `receipt=False`)."""
    if not receipt:
        if p.grad is None:
            p.grad = grad if grad.dtype == p.dtype else grad.to(p.dtype)
        else:
            p.grad.add_(grad)
        return
    if p.grad is None:
        # a view (the small parameters' sums split from one tensor) shares its base's version
        # counter with its siblings; `.data` aliases the same memory with a counter of its own
        p.grad = grad.to(p.dtype) if grad.dtype != p.dtype else grad.data if is_view(grad) else grad
        kind = CLIPPED
    else:
        receipt = _receipts.get(p)
        if receipt is not None and receipt.matches(p.grad):
            kind = SPOILED if receipt.kind == SPOILED else CLIPPED
        else:  # values bkfx did not write: harmless only if they are zeros (a foreign zero_grad(set_to_none=False))
            kind = CLIPPED if not bool(p.grad.any()) else SPOILED
        p.grad.add_(grad)
    _receipts[p] = Receipt(weakref.ref(p.grad), p.grad._version, kind)


class _ZeroSums(torch.autograd.Function):
    """Passes outputs through; its backward writes the clipped sum of no samples, zero, into each
    parameter's `.grad` with a receipt (the empty-batch step of a model not captured yet)."""

    @staticmethod
    def forward(ctx, params, anchor, *outputs):
        ctx.params = params
        return tuple(o.clone() for o in outputs)  # new tensors: the Function's outputs, not views of inputs

    @staticmethod
    def backward(ctx, *grads):
        for p in ctx.params:
            add_clipped_sum(p, torch.zeros_like(p))
        return (None, None, *grads)


def zero_sums_on_backward(params: list, outputs: list) -> list:
    """`outputs` (tensors of an empty batch) made part of a graph whose backward writes receipted
    zero sums into `params`' `.grad`: outputs computed with detached parameters have no graph to
    parameters (nor, with inputs that need none, any graph), and a loss of them must still lead to
    the step's receipts. Gradients to the outputs' own graph (the inputs) pass through unchanged."""
    anchor = torch.zeros((), requires_grad=True)
    return list(_ZeroSums.apply(params, anchor, *outputs))


def receipt_zeroed(p: torch.Tensor) -> None:
    """`p.grad` was just zeroed in place by the DP optimizer: a clean start, not a clipped sum."""
    if p.grad is not None:
        _receipts[p] = Receipt(weakref.ref(p.grad), p.grad._version, ZERO)


def consume(params) -> None:
    """Forget the receipts of `params` (the step used their gradients, or zero_grad dropped them)."""
    for p in params:
        _receipts.pop(p, None)


def check(targets, *, empty_batch: bool) -> None:
    """Refuse (`UnclippedGradientError`) unless every `(name, parameter)` in `targets` whose `.grad`
    is not None holds a matching receipt of a clipped sum, and, unless `empty_batch`, at least
    one does (a step with no backward through the compiled model since the last one is refused)."""
    problems, clipped = [], 0
    for name, p in targets:
        grad = p.grad
        if grad is None:
            continue  # frozen or unused this step: it gets the noise alone, as always
        receipt = _receipts.get(p)
        if receipt is None:
            problems.append(f"{name}: .grad was not written by the compiled model's backward")
        elif receipt.grad() is not grad:
            problems.append(f"{name}: .grad was replaced by another tensor after the compiled model's backward")
        elif grad._version != receipt.version:
            problems.append(f"{name}: .grad was modified in place after the compiled model's backward "
                            "(another backward, through the original model, adds into it)")
        elif receipt.kind == SPOILED:
            problems.append(f"{name}: the compiled model's backward added its clipped sum onto gradients it did not "
                            "write (a backward through the original model before it, or no zero_grad() after a step)")
        elif receipt.kind == CLIPPED:
            clipped += 1
    if problems:
        shown = "\n    ".join(problems[:5]) + (f"\n    ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UnclippedGradientError(
            "DPOptimizer.step() refused: these gradients are not (only) the clipped sums bkfx wrote, so the noise "
            f"would not cover them\n    {shown}\n"
            "  what to do: call backward() on a loss computed by the compiled model (dp_model(x), not the original "
            "module), leave .grad alone between backward() and step(), and call optimizer.zero_grad() after each "
            "step. Parameters, optimizer state and the accountant are unchanged"
        )
    if not clipped and not empty_batch:
        raise UnclippedGradientError(
            "DPOptimizer.step() refused: no backward through the compiled model wrote a clipped sum since the last "
            "step, so this step would be noise only and still be counted by the accountant\n"
            "  what to do: call backward() on a loss of the compiled model before step(). For an empty Poisson batch, "
            "either run the model on it (the 0-row batch poisson_loader yields; its backward writes zero sums) or "
            "call optimizer.step(empty_batch=True). Parameters, optimizer state and the accountant are unchanged"
        )
