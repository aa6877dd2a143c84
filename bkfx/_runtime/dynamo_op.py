"""The DP model as one operator in torch.compile's graph: `torch.compile(dp_model, fullgraph=True)`.

A DP model's forward is Python state (the model guard, the capture cache, the tapes and the
compiled BK step of `bkfx._runtime.step`), which dynamo cannot trace. Under dynamo the forward is
instead one call of the custom operator `bkfx::forward`, opaque to dynamo, AOTAutograd and
inductor, so that the code around the model (the loss, other modules) compiles into the same
graph, with no graph break:

- **Tracing** (dynamo, AOTAutograd): the operator's fake implementation runs the original
  module on fake tensors for the outputs' shapes (the batch size stays symbolic, so one graph
  serves every batch size; an FSDP2-sharded model's parameters at their whole shapes, its
  hooks set aside). It notes the call's autocast state, and whether inductor was asked
  for CUDA graphs (`mode="reduce-overhead"`, read while AOTAutograd traces under inductor's
  options): the user's mode then reaches bkfx's compiled step.
- **Running**: the operator runs the DP model's own forward (`DPModel._forward`: the compiled BK
  step, or the eager step where `bkfx._runtime.step.eager_reason` says so) with autograd on and the
  dispatcher as at top level, keeps its outputs' autograd graph under a ticket (an int64
  tensor output), and returns the outputs detached.
- **Backward**: the operator's autograd formula calls `bkfx::backward` with the ticket, which
  runs the kept graph's backward: the clipped sums reach the parameters' `.grad` exactly as in
  an eager step, and the inputs' gradients are returned to the outer graph.

The parameters are not the operator's inputs (they are written by the inner backward, not by
the outer graph's). The model's "anchor", a scalar tensor that requires grad, is: it makes the
outputs require grad, keeps `bkfx::backward` in the compiled backward (its gradient is a
zero), and tells the operator which DP model it runs. The graph holds no model: dynamo guards
on the model's architecture (`architecture_key`), so every DP model of one architecture runs
through one graph, and each call's outputs are checked against the shapes, dtypes and devices
the graph was traced for. The operator is tagged `cudagraph_unsafe`, so that inductor's CUDA
graphs never record it.

Each forward call is followed by its backward before the next forward call (gradient
accumulation works); the graph of a call whose backward has not run is dropped at the next
call, and a late backward through it is refused.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import weakref
from dataclasses import dataclass, field

import sympy
import torch

from bkfx._runtime.guards import PlainAttributes
from bkfx._runtime.ledger import _keeping_graph
from bkfx._torch import assume_constant_result, compiling_for_cuda_graphs, detect_fake_mode, pytree, top_level_dispatch
from bkfx.errors import BkfxError
from bkfx.rules.precision import AUTOCAST_DEVICES, AutocastState

# the dispatcher's thread-local state at top level: an operator's implementation runs below
# autograd (and under AOTAutograd's modes); the DP model's own forward and backward need it as
# a user's code has it
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()

_models: dict[int, "_ModelState"] = {}
_model_ids = itertools.count(1)
_calls: dict[int, "_Call"] = {}
_call_ids = itertools.count(1)
_tickets = itertools.count(1)


_INPUT, _GRAD_INPUT = "<bkfx tensor>", "<bkfx tensor requiring grad>"


def _is_tensor_slot(leaf) -> bool:
    return isinstance(leaf, str) and leaf in (_INPUT, _GRAD_INPUT)


@dataclass
class _Call:
    """One call site as dynamo traced it: which model, the inputs' structure with the
    non-tensor values, what the outputs look like, and the state the call runs under."""

    architecture: int  # `architecture_key` of the models the call serves
    in_spec: object
    leaves: list  # the flat inputs: _INPUT / _GRAD_INPUT where a tensor goes, the value otherwise
    grad: bool  # whether autograd records the call (torch.no_grad: no ticket, no backward)
    autocast: AutocastState  # as the call was traced (the operator's implementations run with autocast off)
    outputs: tuple | None = None  # `_describe` of the output structure, set by the fake implementation
    cuda_graphs: bool = False  # inductor was asked for CUDA graphs (mode="reduce-overhead")
    traced: tuple | None = None  # (input size symbols -> (input, dim), outputs' (shape, dtype, device)) as traced
    expected: dict = field(default_factory=dict)  # the inputs' shapes -> the outputs' (shape, dtype, device)

    @property
    def wants_grad(self) -> list[int]:
        """The tensor inputs (after the anchor) that take a gradient."""
        tensors = [leaf for leaf in self.leaves if _is_tensor_slot(leaf)]
        return [k for k, leaf in enumerate(tensors) if leaf == _GRAD_INPUT]

    def unflatten(self, tensors):
        it = iter(tensors)
        flat = [next(it) if _is_tensor_slot(leaf) else leaf for leaf in self.leaves]
        return pytree.tree_unflatten(flat, self.in_spec)


@dataclass
class _Kept:
    """A call's outputs with their autograd graph, and its input leaves, until its backward."""

    outputs: list
    inputs: list


@dataclass
class _ModelState:
    model: weakref.ref
    kept: dict = field(default_factory=dict)  # ticket -> _Kept: calls whose backward may come
    superseded: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))  # recent tickets dropped


def register(model) -> torch.Tensor:
    """The anchor of `model` (a DPModel): the operator's first input, by which it finds the model
    at run time. The compiled graph does not hold the model itself, so that every DP model of
    one architecture runs through the same graph (dynamo guards on `architecture_key`)."""
    handle = next(_model_ids)
    _models[handle] = _ModelState(weakref.ref(model))
    weakref.finalize(model, _models.pop, handle, None)
    anchor = torch.zeros((), requires_grad=True)
    anchor._bkfx_model = handle
    return anchor


def architecture_key(model: torch.nn.Module, attributes: PlainAttributes) -> int:
    """What decides a model's outputs' structure, shapes and dtypes besides its inputs: every
    submodule's class, every parameter's and buffer's name, shape, dtype, device and whether it
    is trained, the plain attributes its forward may read (`attributes`, the model guard's: a
    config flag); the operator also checks each call's outputs against its trace."""
    return hash((
        tuple((name, type(m).__module__, type(m).__qualname__) for name, m in model.named_modules()),
        tuple((n, tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()),
        tuple((n, tuple(b.shape), b.dtype, b.device) for n, b in model.named_buffers()),
        tuple(attributes.labels), attributes.values(),
    ))


def call(model, anchor: torch.Tensor, args: tuple, kwargs: dict):
    """`model(*args, **kwargs)` as dynamo traces it: one `bkfx::forward` call."""
    if not torch.compiler.is_dynamo_compiling():  # dynamo gave the call up (a graph break in it): run it as is
        return model._forward(args, kwargs, model.step_options_under_compile(False))
    flat = pytree.tree_leaves((args, kwargs))
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    skeleton = pytree.tree_map(
        lambda x: (_GRAD_INPUT if x.requires_grad else _INPUT) if isinstance(x, torch.Tensor) else x, (args, kwargs))
    autocast = tuple((d, torch.get_autocast_dtype(d)) for d in AUTOCAST_DEVICES if torch.is_autocast_enabled(d))
    site = _call_site(model._architecture, skeleton, torch.is_grad_enabled(), autocast)
    outs = torch.ops.bkfx.forward(site, [anchor] + tensors)
    return _build(_outputs_of(site), iter(outs[:-1]))


@assume_constant_result
def _call_site(architecture: int, skeleton, grad: bool, autocast: tuple) -> int:
    leaves, spec = pytree.tree_flatten(skeleton)
    site = next(_call_ids)
    _calls[site] = _Call(architecture, spec, leaves, grad, AutocastState(autocast))
    return site


@assume_constant_result
def _outputs_of(site: int):
    return _calls[site].outputs


# -- the output structure as constants dynamo keeps -------------------------------------------
# A TreeSpec is an object dynamo cannot keep as a constant of its graph; its description in
# tuples, strings and indices into `_types` it can, and `_build` (traced) rebuilds the outputs.
_types: list = []


def _type_index(t) -> int:
    if t not in _types:
        _types.append(t)
    return _types.index(t)


def _describe(spec) -> tuple | None:
    if spec.is_leaf():
        return None
    context = spec.context
    if isinstance(context, type):
        context = ("type", _type_index(context))
    elif isinstance(context, list):
        context = ("list", tuple(context))
    children = tuple(_describe(spec.child(k)) for k in range(spec.num_children))
    return (_type_index(spec.type), context, children)


def _build(description, tensors):
    if description is None:
        return next(tensors)
    kind, context, children = description
    if isinstance(context, tuple) and len(context) == 2 and context[0] == "type":
        context = _types[context[1]]
    elif isinstance(context, tuple) and len(context) == 2 and context[0] == "list":
        context = list(context[1])
    values = [_build(c, tensors) for c in children]
    return pytree.SUPPORTED_NODES[_types[kind]].unflatten_fn(values, context)


# -- the operators ----------------------------------------------------------------------------
@contextlib.contextmanager
def _top_level(autocast: AutocastState):
    """Run as a user's code runs: the dispatcher's top-level keys (autograd on, no AOTAutograd
    mode), gradients recorded, under the autocast state the call was traced in."""
    with top_level_dispatch(), torch.enable_grad(), autocast.apply():
        yield


def _model_of(anchor: torch.Tensor):
    """The DP model an anchor belongs to, with its operator state."""
    state = _models.get(getattr(anchor, "_bkfx_model", None))
    model = state.model() if state is not None else None
    if model is None:
        raise BkfxError("a compiled graph called a DP model that no longer exists; compile the new model again")
    return state, model


def _template(call_: _Call):
    """A live DP model of the call's architecture, for the fake implementation's shapes."""
    for state in reversed(list(_models.values())):
        model = state.model()
        if model is not None and model._architecture == call_.architecture:
            return model
    raise BkfxError("torch.compile traced a DP model that no longer exists; compile the new model again")


@torch.library.custom_op("bkfx::forward", mutates_args=(), tags=_TAGS)
def _forward(site: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    call_ = _calls[site]
    state, model = _model_of(tensors[0])
    wants = set(call_.wants_grad)
    with _top_level(call_.autocast):
        inputs = [x.detach().requires_grad_() if k in wants else x for k, x in enumerate(tensors[1:])]
        args, kwargs = call_.unflatten(inputs)
        options = model.step_options_under_compile(call_.cuda_graphs)
        if call_.grad:
            out = model._forward(args, kwargs, options)
        else:
            with torch.no_grad():
                out = model._forward(args, kwargs, options)
    tensors_out = _flat_outputs(call_, out)
    _check_outputs(call_, tensors, tensors_out)
    state.superseded.extend(state.kept)  # their backward did not come before this call: dropped
    state.kept.clear()
    ticket = 0
    if call_.grad:
        ticket = next(_tickets)
        state.kept[ticket] = _Kept(tensors_out, inputs)
    return _detached(tensors_out, tensors) + [torch.tensor(ticket)]


def _detached(outs: list, inputs: list) -> list:
    """The outputs as the operator returns them: contiguous (the strides the fake implementation
    promised), and never sharing memory with an input or another output (an operator's outputs
    may not alias)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    result = []
    for o in outs:
        o = o.detach().contiguous()
        ptr = o.untyped_storage().data_ptr()
        if o.numel() and ptr in seen:
            o = o.clone()
        seen.add(o.untyped_storage().data_ptr())
        result.append(o)
    return result


@_forward.register_fake
def _(site: int, tensors):
    call_ = _calls[site]
    call_.cuda_graphs = call_.cuda_graphs or _asks_for_cuda_graphs()
    fake_mode = detect_fake_mode(tensors)
    template = _template(call_)
    module = template.module
    sharded = {id(p) for p in template.shards.sharded.values()} if template.shards is not None else set()
    state = {n: _fake_state(t, fake_mode, id(t) in sharded)
             for n, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]}
    args, kwargs = call_.unflatten(tensors[1:])
    # FSDP2: the step runs on the unsharded parameters (`DPModel._forward` all-gathers them), so the
    # fake run takes their whole shapes, with FSDP's forward hooks (its collectives) turned off
    hooks_off = _without_hooks(template.shards.modules) if template.shards is not None else contextlib.nullcontext()
    with torch.no_grad(), call_.autocast.apply(), hooks_off:
        out = torch.func.functional_call(module, state, args, kwargs, tie_weights=False)
    outs = [torch.empty(o.shape, dtype=o.dtype, device=o.device) for o in _flat_outputs(call_, out)]
    call_.traced, call_.expected = (_size_symbols(tensors), [(_sizes(o), o.dtype, o.device) for o in outs]), {}
    return outs + [torch.empty((), dtype=torch.int64)]


@contextlib.contextmanager
def _without_hooks(modules: list):
    """The modules' forward hooks set aside: FSDP2's all-gather and reshard, which a fake run
    must not reach (the step itself runs on parameters `DPModel._forward` unsharded)."""
    saved = [(m, m._forward_pre_hooks, m._forward_hooks) for m in modules]
    for m in modules:
        m._forward_pre_hooks, m._forward_hooks = collections.OrderedDict(), collections.OrderedDict()
    try:
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post


def _fake_state(t: torch.Tensor, fake_mode, sharded: bool) -> torch.Tensor:
    """A parameter or buffer as the fake run reads it: a sharded parameter (FSDP2's DTensor) as a
    plain tensor of its whole shape, as the step sees it unsharded."""
    if sharded:
        with fake_mode:
            return torch.empty(t.shape, dtype=t.dtype, device=t.device, requires_grad=t.requires_grad)
    return fake_mode.from_tensor(t, static_shapes=True)


def _size_symbols(tensors) -> dict:
    """Each input size that is a symbol of the trace -> (input, dimension)."""
    out = {}
    for k, t in enumerate(tensors):
        for d, size in enumerate(t.shape):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                out.setdefault(size.node.expr, (k, d))
    return out


def _sizes(t) -> tuple:
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in t.shape)


def _check_outputs(call_: _Call, inputs: list, outs: list) -> None:
    """The outputs are what the trace promised the compiled graph (it reads them as laid out then):
    shapes at these input sizes, dtypes, devices. A model changed after the trace (a dtype, a
    size-deciding attribute) or one that runs differently on fake tensors is refused."""
    if call_.traced is None:
        return
    key = tuple(tuple(t.shape) for t in inputs)
    expected = call_.expected.get(key)
    if expected is None:
        symbols, traced = call_.traced
        values = {sym: sympy.Integer(inputs[k].shape[d]) for sym, (k, d) in symbols.items()}
        expected = call_.expected[key] = [
            (tuple(_value(s, values) for s in shape), dtype, device) for shape, dtype, device in traced]
    for k, (o, (shape, dtype, device)) in enumerate(zip(outs, expected)):
        if o.dtype != dtype or o.device != device or len(o.shape) != len(shape) or any(
                want is not None and got != want for got, want in zip(o.shape, shape)):
            raise BkfxError(
                f"the DP model's output {k} is {tuple(o.shape)} {o.dtype} on {o.device}, but torch.compile traced "
                f"{tuple('?' if w is None else w for w in shape)} {dtype} on {device} for this call: the model "
                "changed after torch.compile traced it (a dtype, a device, an attribute that decides a size), or it "
                "runs differently on fake tensors\n  what to do: call it again (a change to the model's parameters or "
                "modules is traced anew), or torch._dynamo.reset() after changing anything else the model's outputs "
                "depend on"
            )


def _value(size, values: dict):
    """A traced size at these input sizes (None: not decided by them)."""
    if isinstance(size, int):
        return size
    value = size.xreplace(values)
    return int(value) if value.is_number else None


def _asks_for_cuda_graphs() -> bool:
    """Whether the torch.compile tracing this call was asked for CUDA graphs (`bkfx._torch`)."""
    return compiling_for_cuda_graphs()


def _flat_outputs(call_: _Call, out) -> list:
    """The model's outputs as the operator's flat list of tensors; their structure is the call's
    (set by the first trace, or by the first run where dynamo ran the call eagerly)."""
    outs, spec = pytree.tree_flatten(out)
    constants = [o for o in outs if not isinstance(o, torch.Tensor)]
    if constants:
        raise BkfxError(
            f"torch.compile of a DP model whose outputs hold values that are not tensors ({constants[:3]}): "
            "bkfx's operator in the compiled graph returns tensors only\n  what to do: return tensors only (a "
            "ModelOutput of tensors is fine; HF: use_cache=False), or call the DP model outside torch.compile"
        )
    described = _describe(spec)
    if call_.outputs is None:
        call_.outputs = described
    elif described != call_.outputs:
        raise BkfxError(
            "torch.compile of a DP model whose output structure changed from call to call (the compiled graph "
            "rebuilds the structure it traced)\n  what to do: return the same structure on every call, or call "
            "the DP model outside torch.compile"
        )
    return outs


@torch.library.custom_op("bkfx::backward", mutates_args=(), tags=_TAGS)
def _backward(site: int, ticket: torch.Tensor, grads: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    call_ = _calls[site]
    state, _ = _model_of(inputs[0])
    key = int(ticket)
    kept = state.kept.get(key)
    if kept is None:
        raise BkfxError(
            "backward through a compiled DP model call whose graph is gone: "
            + ("another forward call of the model came before this call's backward" if key in state.superseded else
               "its backward already ran (call backward(retain_graph=True) the first time to run it twice)")
            + "\n  what to do: under torch.compile, call backward() after each forward call of the DP model "
            "(gradient accumulation works), and run forward calls that are not trained on under torch.no_grad()"
        )
    keep = _keeping_graph()
    pairs = [(o, g) for o, g in zip(kept.outputs, grads) if o.requires_grad]
    with _top_level(call_.autocast):
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], retain_graph=keep)
    result = [torch.zeros_like(inputs[0])]
    for k in call_.wants_grad:
        grad = kept.inputs[k].grad
        result.append(torch.zeros_like(inputs[1 + k]) if grad is None else grad)
        kept.inputs[k].grad = None
    if not keep:
        del state.kept[key]
    return result


@_backward.register_fake
def _(site: int, ticket, grads, inputs):
    return [torch.empty_like(inputs[0])] + [torch.empty_like(inputs[1 + k]) for k in _calls[site].wants_grad]


def _setup_context(ctx, inputs, output):
    site, tensors = inputs
    ctx.site = site
    ctx.outputs = [(o.shape, o.dtype, o.device) for o in output[:-1]]
    ctx.save_for_backward(output[-1], *tensors)


def _backward_formula(ctx, grads):
    ticket, *tensors = ctx.saved_tensors
    grads = [g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
             for g, (shape, dtype, device) in zip(grads[:-1], ctx.outputs)]
    results = torch.ops.bkfx.backward(ctx.site, ticket, grads, tensors)
    gradients = [None] * len(tensors)
    gradients[0] = results[0]
    for k, g in zip(_calls[ctx.site].wants_grad, results[1:]):
        gradients[1 + k] = g
    return None, gradients


_forward.register_autograd(_backward_formula, setup_context=_setup_context)
