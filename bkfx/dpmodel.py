"""`bkfx.compile`, the public entry point, and `DPModel`, the compiled model.

The module is `bkfx.dpmodel`, so `bkfx.compile` names one thing: the function.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from bkfx._ir.meta import META_PROBE, META_SITES
from bkfx._ir.node import original_op_name
from bkfx._ir.plan import Site
from bkfx._runtime import dynamo_op as compile_operator
from bkfx._runtime import ops
from bkfx._runtime import step as compiled_step
from bkfx._runtime.clipping import CLIPPINGS, groups_for, thresholds
from bkfx._runtime.guards import ModelGuard
from bkfx._runtime.ledger import ClipConfig, Tape, recording, tied_parameters
from bkfx._runtime.live_models import _COMPILED
from bkfx._runtime.receipts import zero_sums_on_backward
from bkfx._torch import pytree
from bkfx.errors import BkfxError, NotCapturedError
from bkfx.rules.precision import AutocastState
from bkfx.training.data import current_padding
from bkfx.training.distributed import FSDPShards, check_not_sharded_after_compile
from passes.annotate import annotate
from passes.capture import batch_dims_of, batch_size, capture, signature
from passes.cost_model import MODES, cost_model
from passes.probe import probe
from passes.rewrite import rewrite
from passes.sample_dim import sample_dim

__all__ = ["REDUCTIONS", "Rewritten", "compile", "DPModel"]

REDUCTIONS = ("mean", "sum")
_EAGER = object()  # `_forward_compiled`: run this call with the eager BK step


@dataclass
class Rewritten:
    """One capture: the rewritten GraphModule and its plan."""

    graph_module: torch.fx.GraphModule
    sites: list[Site]
    batch_symbol: object
    example_batch: int
    tied: frozenset  # parameters more than one site uses
    programs: dict = field(default_factory=dict)  # compiled steps (`bkfx._runtime.step`): options -> traces
    step_failures: dict = field(default_factory=dict)  # options -> why the compiled step could not be built


def compile(
    model: nn.Module,
    *,
    max_grad_norm=1.0,
    clipping: str = "abadi",
    style="all-layer",
    loss_reduction: str = "mean",
    norm_mode="auto",
    gamma: float = 0.01,
    grad_scaler=None,
    memory_budget=None,
    batch_dim=0,
) -> "DPModel":
    """Compile `model` so that one `loss.backward()` leaves clipped per-sample gradient sums in `.grad`.

    max_grad_norm: clipping threshold R (a list gives one per group of `style`).
    clipping: "abadi" (`min(1, R/‖G_i‖)`) or "automatic" (`R/(‖G_i‖+gamma)`).
    style: "all-layer", "layer-wise", "param-wise", a list of lists of parameter names,
        or a callable from parameter name to group key.
    loss_reduction: how the loss reduces over samples, "mean" or "sum".
    norm_mode: "auto" (cost model), "ghost", "explicit", or a dict from site node name or
        parameter name to "ghost"/"explicit".
    grad_scaler: the `torch.amp.GradScaler` that scales the loss (fp16 autocast), or None.
        Its scale S multiplies every recorded output gradient, so the per-sample norms are
        divided by S before clipping (`C_i = clip(‖S G_i‖ / S)`); `.grad` then holds S times
        the clipped sum, which `scaler.step(optimizer)` unscales and checks for inf/NaN as
        usual. Also settable later: `dp_model.grad_scaler = scaler`.
    memory_budget: bytes the training step may use for activations and explicit per-sample
        gradients, which the cost model's plan must fit (default: 90% of the free memory of a
        CUDA device, 50% of the available RAM; `explain()` shows it). Read at capture.
    batch_dim: which dimension of the inputs is the batch: an int for every input (default 0;
        1 for sequence-first `[T, B, ...]` inputs), or a dict from forward argument name to
        an int (None: the argument is not batched); unnamed arguments use dim 0.

    Forward calls made before one backward are joined: sample i of each call is the same
    sample (two views of it), so its per-sample gradient, norm and clip factor are over
    all the calls together. Gradient accumulation (forward, backward, forward, backward)
    clips each backward's samples on their own.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bkfx.compile takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, DPModel):
        raise BkfxError(
            "bkfx.compile got a model that bkfx.compile already compiled (a DPModel)\n"
            "  what to do: use it as it is, or compile its original module (dp_model.module) again with other options"
        )
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise BkfxError(
            "bkfx.compile got a DistributedDataParallel model: bkfx's sites detach the parameters, so DDP's reducer "
            "would never see a gradient. Drop the wrapper and compile the module itself (ddp.module); DPOptimizer "
            "sums the clipped gradients over the process group and adds the noise once"
        )
    if clipping not in CLIPPINGS:
        raise ValueError(f"clipping must be one of {CLIPPINGS}, got {clipping!r}")
    if loss_reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}")
    _check_norm_mode(norm_mode)
    if not _finite(gamma) or gamma <= 0:
        raise ValueError(f"gamma (automatic clipping's stabiliser in R/(‖G_i‖+gamma)) must be finite and > 0, got {gamma!r}")
    _check_batch_dim(batch_dim)
    dp_model = DPModel(model, max_grad_norm, clipping, style, loss_reduction, norm_mode, gamma, batch_dim)
    _COMPILED.add(dp_model)
    dp_model.grad_scaler = grad_scaler
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
                                      or not memory_budget > 0):
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    dp_model.memory_budget = memory_budget
    return dp_model


class DPModel(nn.Module):
    """A model whose backward pass leaves the (mean or sum of) clipped per-sample gradients in `.grad`.

    Its parameters and state_dict are the original model's. It captures lazily, on the
    first call and again only for a new input signature (not a new batch size).
    """

    def __init__(self, model, max_grad_norm, clipping, style, loss_reduction, norm_mode, gamma, batch_dim=0):
        super().__init__()
        self.module = model
        self.loss_reduction = loss_reduction
        self.norm_mode = norm_mode
        self.batch_dim = batch_dim
        self._style, self._max_grad_norm = style, max_grad_norm
        self._clip = ClipConfig([], [], clipping, loss_reduction, gamma)
        self._last_tape: Tape | None = None
        self._open: Tape | None = None  # the tape of forward calls still awaiting their backward
        self._step_options: compiled_step.StepOptions | None = None  # set by `compile()`: the compiled BK step
        self._pending = None  # weakref to the last compiled call's `_Pending`
        self._threshold_values = None  # (thresholds, device, their 0-dim tensors): `threshold_tensors`
        self.unclipped_count = None  # adaptive clipping's `bkfx.training.adaptive.UnclippedCount`, set by DPOptimizer
        self._call_mask = None  # the padding mask of the call in progress (`_padding_mask`)
        self._call_units = None  # user-level privacy: the rows per user of the call in progress
        self.privacy_unit = ("example", 1)  # what one clipped unit is: ("user", k) once user batches ran
        self.truncation_probability = 0.0  # the largest per-step truncation probability of the batches seen
        self._last_program: compiled_step.Program | None = None
        self.compiled_step_failure: str | None = None  # why the last compiled step that failed to build did
        self.shards = FSDPShards.of(model)  # FSDP2: bkfx all-gathers and reduce-scatters itself (bkfx.training.distributed)
        self._anchor = compile_operator.register(self)  # torch.compile: the model as `bkfx::forward` (bkfx._runtime.dynamo_op)
        self._track_parameters()

    def _track_parameters(self) -> None:
        """(Re)read the trainable parameters, their clipping groups and thresholds, and forget
        every capture: at compile, and whenever the guard sees the model change."""
        model = self.module
        check_not_sharded_after_compile(self)
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        groups = groups_for(self._style, list(self._params))
        self._clip.groups, self._clip.thresholds = groups, _thresholds(self._max_grad_norm, groups)
        self._guard = ModelGuard(model)
        self._architecture = compile_operator.architecture_key(model, self._guard.attributes)  # dynamo guards on it
        self._captures: dict[tuple, Rewritten] = {}
        self._last: Rewritten | None = None

    # -- the original model's parameters and state, unprefixed --------------------------
    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.module.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.module.named_buffers(prefix, recurse, remove_duplicate)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    # -- running ------------------------------------------------------------------------
    # Under torch.compile the DP model's forward is one opaque operator in dynamo's graph
    # (`bkfx._runtime.dynamo_op`): its guards, capture cache and tapes are Python state that dynamo does not
    # trace. The operator runs `_forward` with the compiled BK step (`bkfx._runtime.step`), which bkfx
    # compiles itself, while the code around the model (the loss) is compiled by torch.compile.
    def forward(self, *args, **kwargs):
        if torch.compiler.is_dynamo_compiling():
            return compile_operator.call(self, self._anchor, args, kwargs)
        return self._forward(args, kwargs, compiled_step.StepOptions() if torch.compiler.is_compiling() else None)

    def step_options_under_compile(self, cuda_graphs: bool) -> compiled_step.StepOptions:
        """The compiled step's options for a call from torch.compile's graph: `dp_model.compile`'s,
        else inductor's defaults, with CUDA graphs when the graph was compiled for them."""
        if self._step_options is not None:
            return self._step_options
        return compiled_step.StepOptions(mode="reduce-overhead" if cuda_graphs else None)

    def compile(self, *args, backend="inductor", mode=None, options=None, **unknown) -> None:
        """Run the BK step compiled (`bkfx._runtime.step`): the forward and the BK backward (input
        gradients, per-sample norms, clip factors, clipped sums) each as one program compiled by
        `torch.compile(backend=, mode=, options=)` with a dynamic batch size. `mode="reduce-overhead"`
        gives CUDA graphs. `torch.compile(dp_model)` compiles the step with the defaults.
        The eager BK step stays the reference: `dp_model.compile(backend=None)` returns to it."""
        if args:
            raise TypeError("DPModel.compile takes keyword arguments only (backend=, mode=, options=)")
        if unknown:
            raise TypeError(f"DPModel.compile takes backend=, mode= and options= only, got {sorted(unknown)}: bkfx "
                            "compiles its own forward and BK backward programs; torch.compile(dp_model) for the rest")
        self._step_options = None if backend is None else compiled_step.StepOptions(
            backend, mode, tuple(sorted((options or {}).items())))

    @torch.compiler.disable
    def _forward(self, args, kwargs, default_options: compiled_step.StepOptions | None):
        """One call: the compiled BK step with `dp_model.compile`'s options, else with
        `default_options` (from torch.compile), else (None) the eager BK step."""
        if self.shards is not None:
            self.shards.unshard()  # the graph runs on, and the ledger clips over, the unsharded parameters
        modes = self._guard.check()
        if modes is None:
            self._recapture_after_change()
            modes = self._guard.check()
        batched = batch_dims_of(self.batch_dim, args, kwargs, self.module.forward)
        key = (modes, signature(self.module, args, kwargs, batched))
        batch = batch_size(batched)
        self._call_mask = self._padding_mask(batched, batch)
        compiled = self._captures.get(key)
        if compiled is None and batch == 0:
            return self._empty_before_capture(args, kwargs)
        if compiled is None:
            compiled = self._captures[key] = self._capture(args, kwargs, batch)
        self._last = compiled
        options = self._step_options or default_options
        if options is not None and compiled_step.eager_reason(self, batch) is None:
            out = self._forward_compiled(compiled, options, args, kwargs, batched, batch)
            if out is not _EAGER:
                return out
        tape = self._open if self._open is not None and self._open.awaiting_backward() else None
        if tape is not None and tape.batch != batch:
            tape.superseded, tape = True, None  # not the same samples: its backward, if any, is refused
        if tape is None:
            tape = Tape(compiled.sites, self._params, self._clip, batch, compiled.tied, on_finalise=self._finalised,
                        mask=self._call_mask, rows_per_unit=self._call_units)
        else:
            tape.join(compiled.sites)
        self._open = tape
        with recording(tape):
            return compiled.graph_module(*args, **kwargs)

    def _empty_before_capture(self, args, kwargs):
        """An empty batch with no capture of its signature yet (a Poisson batch at a small rate can
        be the first): there is no sample to capture from, and nothing to clip. The module runs on
        it with its parameters detached, so its outputs have their usual types and shapes, and a
        backward of a loss of them writes the clipped sum of no samples, zero, into every trainable
        parameter's `.grad` with a receipt: the step then adds the noise and is accounted, as after
        an empty batch of a captured model. Nothing is cached; the first non-empty batch captures."""
        if self.shards is not None:
            raise BkfxError(
                "the first call of an FSDP2-sharded bkfx model got an empty batch: there is no sample to capture the "
                "graph from\n  what to do: skip the forward and backward of an empty batch and call "
                "optimizer.step(empty_batch=True) (the noise is added and the step accounted)"
            )
        detached = {n: p.detach() for n, p in self.module.named_parameters()}
        out = torch.func.functional_call(self.module, detached, tuple(args), dict(kwargs), strict=False)
        flat, spec = pytree.tree_flatten(out)
        floats = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        for i, t in zip(floats, zero_sums_on_backward(list(self._params.values()), [flat[i] for i in floats])):
            flat[i] = t
        return pytree.tree_unflatten(flat, spec)

    def _forward_compiled(self, compiled: Rewritten, options, args, kwargs, batched, batch: int):
        """One call through the compiled BK step: the trace that admits this batch size, or a new one."""
        # the thresholds are inputs of the programs (`threshold_tensors`), not part of the key: a new R
        # (adaptive clipping) runs the same programs
        key = (options, self._clip.sum_output, self._clip.clipping, self._clip.gamma,
               AutocastState.current(), self._call_mask is not None)  # the trace bakes in autocast's casts
        if key in compiled.step_failures:
            return _EAGER
        programs = compiled.programs.setdefault(key, [])
        program = next((p for p in programs if p.admits(batch)), None)
        if program is None:
            try:
                program = compiled_step.build(self, compiled, args, kwargs, batched, options)
            except BkfxError:
                raise
            except Exception as e:  # torch's tracing or compilation failed: the eager step is exact, only slower
                if isinstance(e, _INTERNAL_ERRORS) and not _raised_by_torch(e):
                    raise  # bkfx's own invariant or code broke: a bug, never hidden behind a fallback
                lines = str(e).strip().splitlines()
                reason = f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
                compiled.step_failures[key] = self.compiled_step_failure = reason
                warnings.warn(
                    f"bkfx: the compiled BK step could not be built for this model ({reason}); it runs the eager BK "
                    "step (the same gradients, not compiled). dp_model.compiled_step_failure keeps the reason.",
                    stacklevel=4,
                )
                return _EAGER
            programs.append(program)
        self._last_program = program
        if self._open is not None and self._open.awaiting_backward():
            self._open.superseded = True  # an eager call of another batch size awaits its backward
        previous = self._pending() if self._pending is not None else None
        pending, out = compiled_step.run(program, self, args, kwargs)
        if previous is not None and not previous.done:
            previous.joined = pending.joined = True
        self._pending = weakref.ref(pending)
        return out

    def _compiled_backward_done(self, program, norms, mask=None) -> None:
        self._last_tape = compiled_step.StepRecord(program, norms, len(self._clip.groups))
        self._after_backward(self._last_tape, mask)

    def _after_backward(self, record, mask=None) -> None:
        """What a backward pass's norms feed besides inspection: adaptive clipping's count."""
        if self.unclipped_count is not None and record.per_sample_norms is not None:
            self.unclipped_count.add(record.group_norms, self._clip.thresholds, record.per_sample_norms.shape[0], mask)

    def _padding_mask(self, batched, batch: int):
        """The padding of this call's batch (`bkfx.training.data.current_padding`, set by a padded
        `poisson_loader`): `[B]` bool on the inputs' device, or None. A mark of another batch size is
        not this batch's. The truncation probability it carries is kept for the accountant."""
        padding = current_padding()
        self._call_units = None
        if padding is None or padding.mask.shape[0] != batch:
            return None
        if padding.rows_per_unit is not None:  # user-level: runs of k rows are clipped as one user
            self._call_units = padding.rows_per_unit
            self.privacy_unit = ("user", padding.rows_per_unit)
        self.truncation_probability = max(self.truncation_probability, padding.truncation_probability)
        device = batched[0][0].device if batched else padding.mask.device
        return padding.mask.to(device)

    def _recapture_after_change(self) -> None:
        change = self._guard.describe_change()
        if self._open is not None and self._open.awaiting_backward():
            raise BkfxError(
                f"the model changed ({change}) between a forward call and its backward pass\n"
                "  what to do: change parameters, requires_grad, submodules, dtypes, devices or attributes between steps, "
                "after backward()"
            )
        try:
            self._track_parameters()
        except ValueError as e:
            raise BkfxError(
                f"the model changed after compile ({change}), and its clipping options no longer fit: {e}\n"
                "  what to do: compile the changed model again with matching style= and max_grad_norm="
            ) from e

    def _capture(self, args, kwargs, batch: int) -> Rewritten:
        """A capture whose run of the forward left the Python state it read as it found it.
        torch.export runs the forward's Python once and cannot replay its side effects: a state
        changed by the capture's run outside the model's attributes is read by a second capture; an
        attribute the forward assigns (a counter, a cache it fills) is refused: export restores
        module attributes after its trace, so the capture would run with the traced value."""
        for _ in range(2):
            with self.shards.capturing() if self.shards is not None else contextlib.nullcontext(), \
                    self._guard.watching_the_trace() as assigned:
                compiled = self._capture_and_rewrite(args, kwargs, batch)
            change = assigned[0] if assigned else self._guard.changed_since()
            if change is None:
                return compiled
            if assigned:  # export restored what the forward assigned: a second trace would assign it again
                break
            self._track_parameters()  # the earlier captures, too, read the state before the change
        raise BkfxError(
            f"the model's forward changes Python state that bkfx guards each time it runs ({change}), so no "
            "capture of it stays valid\n"
            "  what to do: keep state the forward updates out of the model (or in a buffer it updates in place), "
            "compute per-call values from the inputs, and fill a cache before compiling (one call of the model)"
        )

    def _capture_and_rewrite(self, args, kwargs, batch: int) -> Rewritten:
        captured = capture(self.module, args, kwargs, self.batch_dim)
        gm = sample_dim(captured.graph_module)
        gm = probe(gm, *captured.example)
        gm = annotate(gm, self._names)
        gm = cost_model(gm, self.norm_mode, getattr(self, "memory_budget", None))
        sites = gm.meta[META_SITES]
        _check_norm_mode_keys(self.norm_mode, sites, self._params)
        gm = rewrite(gm, ops.site)
        return Rewritten(gm, sites, captured.batch, max(batch, 2), tied_parameters(sites))

    def _finalised(self, tape: Tape) -> None:
        self._last_tape = tape
        self._after_backward(tape, tape.unit_mask)

    # -- inspection -----------------------------------------------------------------------
    @property
    def per_sample_norms(self) -> torch.Tensor | None:
        """`[B]` unclipped per-sample gradient norms (over all parameters) of the last backward."""
        return None if self._last_tape is None else self._last_tape.per_sample_norms

    @property
    def sum_clipped_gradients(self) -> bool:
        """When True, backward leaves `Σ_i C_i G_i` in `.grad` whatever `loss_reduction` is
        (what `bkfx.DPOptimizer` adds noise to); the per-sample gradients are unchanged."""
        return self._clip.sum_output

    @sum_clipped_gradients.setter
    def sum_clipped_gradients(self, value: bool) -> None:
        self._clip.sum_output = bool(value)

    @property
    def grad_scaler(self):
        """The `torch.amp.GradScaler` whose loss scale the backward pass divides out of the norms."""
        return self._clip.grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler) -> None:
        if scaler is not None and not (hasattr(scaler, "is_enabled") and hasattr(scaler, "scale")):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        self._clip.grad_scaler = scaler

    @property
    def probed_operations(self) -> list[str]:
        """The ATen operations of the last capture that no sample rule covers: each was checked
        at capture by the numerical separability probe (`passes.probe`) instead of a proof."""
        gm = self._require_capture().graph_module
        return [original_op_name(n) for n in gm.graph.nodes if n.meta.get(META_PROBE)]

    @property
    def clip_groups(self) -> list[list[str]]:
        """The clipping groups of the style, as lists of parameter names."""
        return [list(g) for g in self._clip.groups]

    @property
    def max_grad_norms(self) -> list[float]:
        """The clipping threshold of each group."""
        return list(self._clip.thresholds)

    @property
    def max_grad_norm(self):
        """The clipping threshold R the next backward clips at: a number (one group) or a list (one
        per group). Settable between steps (adaptive clipping sets it after every step): a value read
        at run time by the eager ledger and an input of the compiled step's programs, so a new R
        neither recaptures nor recompiles."""
        values = list(self._clip.thresholds)
        return values[0] if len(values) == 1 else values

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        if isinstance(value, (list, tuple)) and len(self._clip.groups) == 1 and len(value) == 1:
            value = value[0]
        self._clip.thresholds = _thresholds(value, self._clip.groups)
        self._max_grad_norm = value if isinstance(value, (int, float)) else list(value)  # kept by a recapture

    def threshold_tensors(self, device) -> list[torch.Tensor]:
        """The thresholds as 0-dim float64 tensors on `device`, the compiled step's inputs (made
        again only when R changes, so CUDA graphs copy a new value into their static input)."""
        values = tuple(self._clip.thresholds)
        cached = self._threshold_values
        if cached is None or cached[0] != values or cached[1] != device:
            dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
            tensors = [torch.tensor(r, dtype=dtype, device=device) for r in values]
            cached = self._threshold_values = (values, device, tensors)
        return cached[2]

    @property
    def compiled_step_count(self) -> int:
        """How many compiled BK steps (`bkfx._runtime.step`: a traced and compiled forward/backward pair)
        the captures hold: one per batch-size range and option set, not one per clipping threshold."""
        return sum(len(programs) for c in self._captures.values() for programs in c.programs.values())

    @property
    def capture_count(self) -> int:
        """How many captures this model holds: one per input signature and mode it was called
        with since it was compiled or last changed (a change to the model starts over)."""
        return len(self._captures)

    @property
    def per_group_norms(self) -> list | None:
        return None if self._last_tape is None else self._last_tape.group_norms

    def _require_capture(self) -> Rewritten:
        if self._last is None:
            raise NotCapturedError("the model has not been called yet; call it once on a batch, then inspect it")
        return self._last

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self._require_capture().graph_module

    @property
    def code(self) -> str:
        """The rewritten program of the last capture."""
        return self.graph_module.code

    @property
    def compiled_code(self) -> tuple[str, str]:
        """The compiled BK step's (forward, backward) programs of the last compiled call, as code."""
        if self._last_program is None:
            raise NotCapturedError("no compiled step has run: call dp_model.compile() (or torch.compile it), then "
                                   "call it on a batch of at least 2 samples")
        return self._last_program.forward_graph.code, self._last_program.backward_graph.code

    @property
    def sites(self) -> list[Site]:
        return self._require_capture().sites

    def plan(self, batch: int | None = None) -> list[dict]:
        """The plan as records (one per site and parameter operand), numbers at `batch`."""
        from bkfx.tools.explain import plan_records

        return plan_records(self._require_capture(), batch)

    def explain(self, batch: int | None = None) -> str:
        """The plan as a table: site, op, source, parameters, T, p, d, mode and why, costs."""
        from bkfx.tools.explain import explain

        return explain(self._require_capture(), batch)


_INTERNAL_ERRORS = (AssertionError, NameError, ImportError)  # a broken invariant or code, not a limit of tracing
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _raised_by_torch(e: BaseException) -> bool:
    """Whether the innermost frame of `e`'s traceback is torch's code (its tracing or compilers), not bkfx's."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_TORCH)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _thresholds(max_grad_norm, groups) -> list[float]:
    """The clipping threshold of each group, each finite and > 0 (0 would divide by zero, a
    negative one flip the gradient, NaN or inf clip nothing)."""
    values = [max_grad_norm] if isinstance(max_grad_norm, (int, float)) else list(max_grad_norm) \
        if isinstance(max_grad_norm, (list, tuple)) else None
    if values is None:
        raise ValueError(f"max_grad_norm must be a number or a list of numbers, got {max_grad_norm!r}")
    bad = [r for r in values if not _finite(r) or r <= 0]
    if bad:
        raise ValueError(f"max_grad_norm must be finite and > 0 (per group too), got {max_grad_norm!r}")
    return thresholds(max_grad_norm, groups)


_SITE_MODES = ("ghost", "explicit")


def _check_norm_mode(norm_mode) -> None:
    if isinstance(norm_mode, str):
        if norm_mode not in MODES:
            raise ValueError(f"norm_mode must be one of {MODES} or a dict, got {norm_mode!r}")
        return
    if not isinstance(norm_mode, dict):
        raise ValueError(f"norm_mode must be one of {MODES} or a dict from site or parameter name to a mode, got {norm_mode!r}")
    bad = {k: v for k, v in norm_mode.items() if v not in _SITE_MODES}
    if bad:
        raise ValueError(f"norm_mode values must be one of {_SITE_MODES}, got {bad}")


def _check_norm_mode_keys(norm_mode, sites: list[Site], params: dict) -> None:
    """Every key of a norm_mode dict must name a site node or a trainable parameter."""
    if not isinstance(norm_mode, dict):
        return
    valid = {s.node for s in sites} | {n for s in sites for n in s.params}
    unknown = sorted(set(norm_mode) - valid)
    if unknown:
        raise ValueError(
            f"norm_mode names {unknown}, which are neither sites nor trainable parameters of this model's sites; "
            f"sites: {sorted(s.node for s in sites)}; parameters: {sorted(n for s in sites for n in s.params)}"
        )


def _check_batch_dim(batch_dim) -> None:
    values = batch_dim.values() if isinstance(batch_dim, dict) else [batch_dim]
    for v in values:
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise ValueError(f"batch_dim must be an int or a dict from argument name to int or None, got {batch_dim!r}")
