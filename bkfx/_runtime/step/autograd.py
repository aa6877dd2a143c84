"""Stage 4 of the compiled BK step, run: `_Step`, an autograd Function, runs the forward program and
saves its values; its backward runs the backward program, adds the clipped sums to the parameters'
`.grad` as the eager ledger does, with the receipts `DPOptimizer.step()` checks
(`bkfx._runtime.receipts`), and returns the inputs' gradients. `eager_reason` says which calls stay
eager; `StepRecord` is what a compiled backward leaves for inspection."""
from __future__ import annotations

import weakref

import torch

from bkfx._runtime.ledger import _keeping_graph
from bkfx._runtime.receipts import add_clipped_sum
from bkfx._runtime.step.program import Program
from bkfx._torch import pytree
from bkfx.errors import BkfxError


def eager_reason(dp_model, batch: int) -> str | None:
    """Why this call runs the eager BK step rather than the compiled one (None: compiled)."""
    if not torch.is_grad_enabled():
        return "no gradient is recorded (torch.no_grad): there is no backward to compile"
    if batch < 2:
        return "batch size below 2 (the compiled step's trace specialises 0 and 1)"
    scaler = dp_model.grad_scaler
    if scaler is not None and scaler.is_enabled():
        return "a GradScaler's loss scale"
    if dp_model.shards is not None:
        return "FSDP2-sharded parameters (bkfx.training.distributed drives the shards around the eager step)"
    if getattr(dp_model, "_call_units", None) is not None:
        return "user-level units (a user's rows clipped as one: the eager ledger reshapes them per batch)"
    return None


def run(program: Program, owner, args, kwargs):
    """One compiled step's forward: `(pending, outputs)`; the outputs' backward is the compiled BK
    backward, and `pending` says whether it has run."""
    pending = _Pending(owner)
    inputs = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    mask = [owner._call_mask] if program.masked else []
    pending.mask = owner._call_mask
    outs = _Step.apply(program, pending, *program.state, *inputs, *owner.threshold_tensors(program.threshold_device), *mask)
    return pending, _unflatten(program, outs)


def _unflatten(program: Program, tensors):
    it = iter(tensors)
    total = program.n_outputs + len(program.out_constants)
    leaves = [program.out_constants[k] if k in program.out_constants else next(it) for k in range(total)]
    return pytree.tree_unflatten(leaves, program.out_spec)


class _Pending:
    """One compiled call awaiting its backward (held by the autograd graph through `_Step`'s ctx)."""

    def __init__(self, owner):
        self.owner = weakref.ref(owner)
        self.done = False
        self.joined = False  # another compiled call was made before this one's backward
        self.saved = None  # the forward program's saved values, until the backward has used them
        self.graph_key = None  # with CUDA graphs: the forward graph that ran this call
        self.mask = None  # the call's padding mask (`bkfx.training.data.Padding`), for adaptive clipping's count

    def __repr__(self):
        return f"_Pending(done={self.done}, joined={self.joined})"


class _Step(torch.autograd.Function):
    """The compiled forward program; its backward is the compiled BK backward program."""

    @staticmethod
    def forward(ctx, program, pending, *primals):
        n = program.n_outputs
        if program.graphs is not None:
            results = program.graphs.forward(program, primals, pending)
        else:
            results = program.forward(*primals)
        pending.saved = list(results[n:])
        ctx.program, ctx.pending = program, pending
        outs = tuple(results[:n])
        ctx.outputs = [(o.shape, o.dtype, o.device) for o in outs]
        ctx.mark_non_differentiable(*[o for k, o in enumerate(outs) if k not in program.differentiable])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        program, pending = ctx.program, ctx.pending
        if pending.joined:
            raise BkfxError(
                "backward through compiled forward calls made before one backward: eagerly, bkfx joins such calls as "
                "views of the same samples (their per-sample norms are over all the calls), but each compiled step "
                "clips only its own call\n"
                "  what to do: call backward() after each forward call (gradient accumulation works), run forward "
                "passes that are not trained on under torch.no_grad(), or run the joined calls eagerly (a DP model "
                "that is not compiled)"
            )
        if pending.saved is None:
            raise BkfxError(
                "backward through a compiled DP step a second time, but its saved values were released after the "
                "first backward; call backward(retain_graph=True) the first time"
            )
        saved = [pending.saved[k] for k in program.saved_order]
        tangents = [grads[k] if grads[k] is not None and k in program.differentiable else _zeros(ctx.outputs[k])
                    for k in program.tangents]  # an unused or non-differentiable output's tangent is zero
        if program.graphs is not None:
            results = program.graphs.backward(program, saved + tangents, pending)
        else:
            results = program.backward(*saved, *tangents)
        if not _keeping_graph():
            pending.saved = None
        gradients = [None] * (2 + program.n_primals)
        n_state = len(program.state)
        for j, g in zip(program.grad_primals, results):
            if j < n_state:  # a parameter's clipped sum: into .grad here, with its receipt (`bkfx._runtime.receipts`)
                add_clipped_sum(program.state[j], g)
            else:  # an input's gradient: autograd passes it on
                gradients[2 + j] = g
        norms = results[len(program.grad_primals):]
        pending.done = True
        owner = pending.owner()
        if owner is not None:
            owner._compiled_backward_done(program, norms, pending.mask)
        return tuple(gradients)


def _zeros(meta) -> torch.Tensor:
    shape, dtype, device = meta
    return torch.zeros(shape, dtype=dtype if dtype.is_floating_point else torch.float32, device=device)


class StepRecord:
    """What a compiled backward leaves for inspection: the eager tape's per-sample and group norms."""

    def __init__(self, program: Program, norms, groups: int):
        values = dict(zip(program.norms, [n.detach() for n in norms]))
        self.per_sample_norms = values.get("total")
        self.group_norms = [values.get(g) for g in range(groups)] if values else None
