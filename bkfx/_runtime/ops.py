"""The BK operation: what a parametric site runs in the rewritten graph.

`site(op, id, *args)` runs `op` with its parameter operands detached, so autograd
computes input gradients only (ghost differentiation: no `∂L/∂W` at all), and taps the
output gradient `g`: the site's `Record` turns it into per-sample pieces that the ledger
book-keeps until the clip factors are known.

The tap is a tensor hook when the output already requires grad (free, and it sees the
gradient of the value before any later in-place op such as `relu_`); when it does not
(the first layer on raw inputs, an embedding of token ids), the op runs inside a custom
autograd Function whose backward records `g`, so the output is a fresh tensor that
later in-place ops may modify. An op with several outputs (an RNN, an embedding bag) runs
inside `_SeveralOutputs`, whose backward receives every output's gradient at once.
"""
from __future__ import annotations

import torch

from bkfx._ir.plan import get_path, set_path
from bkfx._runtime import ledger
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
    if plan.out_layouts is not None:
        return _several_outputs(record, run, call_args, kwargs, params)
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


# ---- sites with several outputs (an RNN's output and final states, an embedding bag) ----------------


def _several_outputs(record, run, args, kwargs, params):
    """A site whose op returns several tensors: its record needs all their gradients at once."""
    inputs = [t for t in _tensors(args) if t.requires_grad]
    return _SeveralOutputs.apply(record, run, args, kwargs, len(params), *params, *inputs)


class _SeveralOutputs(torch.autograd.Function):
    """Runs a site with several outputs; its backward gets every output's gradient together (None
    for integer outputs and unused ones, e.g. an RNN's final states), records them, and pulls them
    back to the inputs that need gradients through the op's own graph, built in the forward on
    detached copies of those inputs (hooks on each output could not tell when the last gradient
    has arrived, and one on an output later modified in place as a view would not fire)."""

    @staticmethod
    def forward(ctx, record, run, args, kwargs, n_params, *tensors):
        ctx.record, ctx.n_params = record, n_params
        ctx.set_materialize_grads(False)
        inputs = tensors[n_params:]
        ctx.leaves = [t.detach().requires_grad_() for t in inputs]
        if inputs:
            args = _substituted(args, {id(t): leaf for t, leaf in zip(inputs, ctx.leaves)})
            with torch.enable_grad():
                outs, record.saved = run(args, kwargs)
        else:
            outs, record.saved = run(args, kwargs)
        ctx.outs = outs
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.record.backward(grads)
        input_grads = [None] * len(ctx.leaves)
        pairs = [(o, g) for o, g in zip(ctx.outs, grads) if g is not None and o.requires_grad]
        keep = ledger._keeping_graph()  # retain_graph=True: a second backward pulls back again
        if ctx.leaves and pairs:
            input_grads = torch.autograd.grad(
                [o for o, _ in pairs], ctx.leaves, [g for _, g in pairs], allow_unused=True, retain_graph=keep
            )
        if not keep:
            ctx.outs = ctx.leaves = ()
        return (None,) * (5 + ctx.n_params) + tuple(input_grads)


def _substituted(args, leaves: dict):
    """`args` with the tensors `leaves` names (by id) replaced, also inside lists."""
    def swap(a):
        if isinstance(a, torch.Tensor):
            return leaves.get(id(a), a)
        if isinstance(a, (list, tuple)):
            return type(a)(swap(x) for x in a)
        return a

    return tuple(swap(a) for a in args)
