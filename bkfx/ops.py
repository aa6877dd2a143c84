"""The BK operation: what a parametric site runs in the rewritten graph.

`site(op, id, *args)` runs `op` with its parameter operands detached, so autograd
computes input gradients only (ghost differentiation: no `∂L/∂W` at all), and taps the
output: its backward hands the output gradient `g` to the ledger, which asks the
site's rules for the per-sample pieces and book-keeps them until the clip factors are
known.
"""
from __future__ import annotations

import torch

from bkfx import ledger
from bkfx.plan import get_path, set_path


def site(op, site_id: int, *args, _chain=None, **kwargs):
    tape = ledger.current()
    if tape is None:
        return op(*args, **kwargs)
    plan = tape.sites[site_id]
    call_args = args
    for operand in plan.operands:
        call_args = set_path(call_args, operand.path, get_path(args, operand.path).detach())
    out = op(*call_args, **kwargs)
    params = [tape.params[name] for name in plan.params]
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in params):
        return out
    record = tape.record(plan, call_args, kwargs, _chain or {})
    return _Tap.apply(record, out, *params)


class _Tap(torch.autograd.Function):
    """Identity on the site's output; its backward records `g` and passes it on."""

    @staticmethod
    def forward(ctx, record, out, *params):
        ctx.record = record
        ctx.n_params = len(params)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        ctx.record.backward(g)
        return (None, g if ctx.needs_input_grad[1] else None) + (None,) * ctx.n_params
