"""The BK operation: what a parametric site runs in the rewritten graph.

`site(op, id, *args)` runs `op` with its parameter operands detached, so autograd
computes input gradients only (ghost differentiation: no `∂L/∂W` at all), and taps the
output gradient `g`: the site's `Record` turns it into per-sample pieces that the ledger
book-keeps until the clip factors are known.

The tap is a tensor hook when the output already requires grad (free, and it sees the
gradient of the value before any later in-place op such as `relu_`); when it does not
(the first layer on raw inputs, an embedding of token ids), the op runs inside a custom
autograd Function whose backward records `g`, so the output is a fresh tensor that
later in-place ops may modify.
"""
from __future__ import annotations

import torch

from bkfx import ledger
from bkfx.plan import get_path, set_path
from bkfx.rules import runner


def site(op, site_id: int, *args, _chain=None, **kwargs):
    tape = ledger.current()
    if tape is None:
        return op(*args, **kwargs)
    plan = tape.sites[site_id]
    call_args = args
    for operand in plan.operands:
        call_args = set_path(call_args, operand.path, get_path(args, operand.path).detach())
    params = [tape.params[name] for name in plan.params]
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in params):
        return op(*call_args, **kwargs)
    record = tape.record(plan, call_args, kwargs, _chain or {})
    run = runner(op)
    if any(a.requires_grad for a in _tensors(call_args)):
        out, record.saved = run(call_args, kwargs)
        out.register_hook(record.backward)
        return out
    return _Seed.apply(record, run, call_args, kwargs, *params)


def _tensors(args):
    """The tensors among an op's arguments, also inside lists (cat, index): ATen arguments nest no deeper."""
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


class _Seed(torch.autograd.Function):
    """Runs a site whose inputs need no gradient; its backward only records `g`."""

    @staticmethod
    def forward(ctx, record, run, args, kwargs, *params):
        ctx.record = record
        ctx.n_params = len(params)
        out, record.saved = run(args, kwargs)
        return out

    @staticmethod
    def backward(ctx, g):
        ctx.record.backward(g)
        return (None, None, None, None) + (None,) * ctx.n_params
