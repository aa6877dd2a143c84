"""capture: the model as an ATen GraphModule with a symbolic batch size.

`torch.export.export(strict=False)` traces the model with the sample dimension of every
batched tensor input (dim 0, or the input's `batch_dim`) marked dynamic (one shared `Dim`),
so one capture serves every batch size, 0 and 1 included. The unlifted module keeps the
original parameter names and the original Parameter objects.

The capture refuses what its graph cannot represent faithfully:
- a `torch.autograd.Function` applied during the trace (every `Function.apply` is recorded while
  torch.export runs): export inlines its forward, and differentiating that is not the backward the
  Function defines (a straight-through estimator's gradient would be 0). A subclass that overrides
  `apply` without calling `Function.apply` escapes the record;
- a trainable complex parameter (per-sample norms are of real gradients);
- a scalar output computed from the samples (a loss computed inside the model over the batch);
- a write into a buffer or parameter of a value computed from the samples' values or sizes
  (running statistics of private data would leave the step un-noised). Writes that do not read the
  samples (a step counter) stay. The writes are found on the graph itself: in-place ATen ops by
  their schemas' write annotations (through views, and inside `no_grad` regions), and the
  normalisations whose schemas do not annotate the running statistics they update
  (`_UNANNOTATED_WRITES`); `ExportedProgram.graph_signature` misses the latter.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import threading
import traceback
from dataclasses import dataclass

import sympy
import torch
from torch.export import Dim

from bkfx._ir.meta import META_BATCH, META_BATCH_DIMS
from bkfx._ir.node import arguments, attribute, op_name
from bkfx._ir.source import _OWN_DIRS, _TORCH_DIR, _frames, user_source_line
from bkfx._torch import pytree
from bkfx.errors import (
    CaptureError,
    SampleMixingError,
    StateWriteError,
    UnsupportedOperationError,
    located_error,
    node_error,
)

__all__ = ["Capture", "batch_dims_of", "batch_size", "signature", "capture"]



@dataclass
class Capture:
    graph_module: torch.fx.GraphModule
    batch: sympy.Symbol  # the symbolic batch size in every node's shapes
    example: tuple = ((), {})  # the (args, kwargs) traced, at least two samples (for passes.probe)


def batch_dims_of(batch_dim, args, kwargs, forward) -> list[tuple[torch.Tensor, int]]:
    """Every batched tensor input with its sample dimension: `(tensor, dim)`.

    `batch_dim` is an int for every input (default 0), or a dict from the forward's argument
    names to an int (None: the argument is not batched); arguments it does not name are
    batched along dim 0. Tensors of rank 0, and of rank <= dim, are not batched."""
    named = _bound(forward, args, kwargs)
    if isinstance(batch_dim, dict):
        unknown = set(batch_dim) - set(named)
        if unknown:
            raise CaptureError(
                f"batch_dim names {sorted(unknown)}, which the forward call does not pass; its arguments are {list(named)}"
            )
    out = []
    for name, value in named.items():
        dim = batch_dim.get(name, 0) if isinstance(batch_dim, dict) else batch_dim
        if dim is None:
            continue
        for t in pytree.tree_leaves(value):
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                if not -t.dim() <= dim < t.dim():
                    raise CaptureError(
                        f"batch_dim={dim} for argument {name!r}, but it has only {t.dim()} dimensions {list(t.shape)}"
                    )
                out.append((t, dim % t.dim()))
    return out


def batch_size(batched: list[tuple[torch.Tensor, int]]) -> int:
    """The batch size of a call, from its `batch_dims_of`: the size of the sample dimension."""
    return batched[0][0].shape[batched[0][1]] if batched else 0


_SIGNATURES: dict = {}  # (function, bound) -> inspect.Signature: reading one costs ~0.1 ms a call


def _signature(forward) -> inspect.Signature:
    function = getattr(forward, "__func__", forward)
    key = (function, hasattr(forward, "__self__"))
    sig = _SIGNATURES.get(key)
    if sig is None:
        sig = _SIGNATURES[key] = inspect.signature(forward)
    return sig


def _bound(forward, args, kwargs) -> dict:
    try:
        bound = _signature(forward).bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"the model's forward does not take these arguments: {e}") from e
    return dict(bound.arguments)


def signature(model: torch.nn.Module, args, kwargs, batched: list[tuple[torch.Tensor, int]]) -> tuple:
    """What a capture depends on: everything about the inputs but the batch size (`batched`: the
    call's `batch_dims_of`), and the mode."""
    dims = {id(t): d for t, d in batched}

    def key(leaf):
        if isinstance(leaf, torch.Tensor):
            d = dims.get(id(leaf))
            rest = tuple(s for k, s in enumerate(leaf.shape) if k != d)
            return ("tensor", leaf.dtype, leaf.device, leaf.dim(), d, rest, leaf.requires_grad)
        return ("value", repr(leaf))

    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (model.training, str(spec), tuple(key(x) for x in leaves))


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, batch_dim=0) -> Capture:
    """Export `model` on these example inputs with a dynamic sample dimension."""
    batched = batch_dims_of(batch_dim, args, kwargs, model.forward)
    if not batched:
        raise CaptureError(
            "bkfx.compile needs at least one tensor input with a batch dimension (dim 0, or batch_dim= of bkfx.compile)."
        )
    sizes = {t.shape[d] for t, d in batched}
    if len(sizes) != 1:
        raise CaptureError(
            f"every batched input's sample dimension must have the batch size, but they differ: {sorted(sizes)}. "
            "Pass per-batch constants as module buffers or Python values, or say which dimension of each input is "
            "the batch with batch_dim= (a dict from argument name to dimension, None for an unbatched argument)."
        )
    if sizes == {0}:
        raise CaptureError("a capture needs at least one sample, and this batch has none. A DP model runs an empty "
                           "batch before its first capture without one (its backward writes zero sums); to "
                           "capture, call with a non-empty batch.")
    dims = {id(t): d for t, d in batched}
    # torch.export specialises sizes 0 and 1; trace on two samples (the first repeated) when given one.
    if sizes == {1}:
        def twice(t):
            return torch.cat([t, t], dim=dims[id(t)]) if id(t) in dims else t

        args, kwargs = pytree.tree_map(twice, (args, kwargs))
        dims = {id(t): d for t, d in batch_dims_of(batch_dim, args, kwargs, model.forward)}
    batch = Dim("batch", min=0)
    bound = _bound(model.forward, args, kwargs)
    dynamic = {
        name: pytree.tree_map(lambda t: {dims[id(t)]: batch} if isinstance(t, torch.Tensor) and id(t) in dims else None, value)
        for name, value in bound.items()
    }
    def export():
        # grad mode on: a first call under torch.no_grad() would otherwise trace every region of
        # the forward as differentiable, losing its own `with torch.no_grad():` blocks
        with torch.enable_grad():
            return torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic, strict=False)

    applied: list[_Applied] = []
    try:
        with _functions_recorded(applied):
            exported = export()
    except Exception as e:  # torch.export raises many classes; all mean the same thing here
        if applied:  # the Function is refused whatever else failed after it
            raise _function_error(applied, None) from e
        raise CaptureError(_capture_failure(e, batch_dim, export)) from e
    gm = exported.module()
    if applied:
        raise _function_error(applied, gm)
    _share_original_parameters(gm, model)
    _refuse_complex_parameters(gm)
    symbol = _batch_symbol(gm)
    from_samples = _from_samples(gm, symbol, through_sizes=False)
    _refuse_reduced_outputs(gm, from_samples)
    _refuse_state_writes(gm, _from_samples(gm, symbol, through_sizes=True))
    gm.meta[META_BATCH] = symbol
    gm.meta[META_BATCH_DIMS] = _placeholder_batch_dims(gm, symbol)
    return Capture(gm, symbol, (tuple(args), dict(kwargs)))


def _placeholder_batch_dims(gm, symbol) -> dict:
    out = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            for k, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and s.node.expr == symbol:
                    out[node.name] = k
    return out


def _capture_failure(e: Exception, batch_dim=0, export=None) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    where = f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name}): {frames[-1].line}" if frames else "unknown"
    message = str(e).strip().splitlines()
    first = message[0] if message else type(e).__name__
    if "Constraints violated" in str(e) and "batch" in str(e):
        where = _specialising_line(export) or where
        return (
            f"torch.export could not keep the batch dimension dynamic: {first}\n"
            f"  source: {where}\n"
            f"  what to do: the model fixes the size of the dimension bkfx takes for the batch (batch_dim={batch_dim!r}): "
            "if an input is not batch-first (a sequence-first [T, B, ...] input of an RNN or of a Transformer layer "
            "with batch_first=False), pass bkfx.compile(model, batch_dim=1) (or a dict from argument name to dimension)."
        )
    return (
        f"torch.export could not capture the model: {type(e).__name__}: {first}\n"
        f"  source: {where}\n"
        "  what to do: make the forward pass traceable (no data-dependent Python control flow, "
        "no .item() on tensors, no caches of non-tensor objects, e.g. HF's use_cache=False), "
        "then compile again."
    )


def _specialising_line(export) -> str | None:
    """The user's line where the trace fixed the batch size: torch.export reports the violated
    constraint only after tracing, from its own frame, so trace again and note the user's frame
    of every shape guard as the shape environment logs it."""
    import logging

    if export is None:
        return None
    found: list[tuple[str, str]] = []

    class _Guards(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if "guard added" not in text and not text.startswith("set_replacement"):
                return
            for f in reversed(traceback.extract_stack()[:-1]):
                if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(logging.__file__.rpartition("/")[0]) \
                        and f.filename != __file__:
                    found.append((text, f"{f.filename}:{f.lineno} ({f.name}): {f.line}"))
                    return

    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    handlers, level, propagate = logger.handlers, logger.level, logger.propagate
    logger.handlers = [_Guards()]  # the records are for this search, not for the user's console
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        export()
    except Exception:  # noqa: BLE001 - the same failure again; only the logged guards matter
        pass
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)
    fixing = [where for text, where in found if "Eq(" in text or text.startswith("set_replacement")]
    return (fixing or [where for _, where in found] or [None])[0]


def _share_original_parameters(gm: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    """Make the captured module hold the very Parameter objects of `model`."""
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        try:
            holder = gm.get_submodule(owner) if owner else gm
        except AttributeError:
            continue  # not used by the graph
        if getattr(holder, leaf, None) is not None and getattr(holder, leaf) is not p:
            holder.register_parameter(leaf, p)


def _batch_symbol(gm: torch.fx.GraphModule) -> sympy.Symbol:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                for s in val.shape:
                    if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                        return s.node.expr
    raise CaptureError("torch.export kept no symbolic batch size; the model may ignore its batched inputs.")


# ---- torch.autograd.Function ---------------------------------------------------------------------


@dataclass
class _Applied:
    function: type  # the torch.autograd.Function subclass
    source: str  # the innermost frame of the call outside torch and bkfx: 'file:line (func): code'


_ADVICE = {  # torch's own Functions that models reach, with what to do instead
    "torch.utils.checkpoint.CheckpointFunction": "call torch.utils.checkpoint.checkpoint with use_reentrant=False "
    "(its recomputation is not a Function, and bkfx captures it exactly)",
}


# torch.library.custom_op's register_autograd runs through a Function torch generates, whose forward
# calls the custom op itself: the op stays one node of the exported graph, differentiated (per sample
# too) by the backward registered for it
_KEPT_AS_ONE_OP = frozenset({"torch._library.autograd"})

# Functions whose output no gradient flows through, so differentiating the operations their forward
# records changes nothing: non-reentrant checkpointing (torch 2.11) applies `_NoopSaveInputs`, whose
# forward returns an empty tensor that only holds the saved inputs for the recomputation
_GRADIENT_FREE = frozenset({"torch.utils.checkpoint._NoopSaveInputs"})


@contextlib.contextmanager
def _functions_recorded(applied: list):
    """Record every `torch.autograd.Function` this thread applies (nested ones and those inside
    library code too) while the block runs, except those custom ops generate (`_KEPT_AS_ONE_OP`) and
    checkpointing's gradient-free one (`_GRADIENT_FREE`): no other Function of torch is exempt, and
    none is applied when GPT-2, Llama, BERT, T5, OPT, Qwen2, DistilBERT, Whisper or CLIP is captured."""
    original = torch.autograd.Function.__dict__["apply"]
    thread = threading.get_ident()

    def apply(cls, *args, **kwargs):
        if threading.get_ident() == thread and cls.__module__ not in _KEPT_AS_ONE_OP \
                and _qualname(cls) not in _GRADIENT_FREE:
            applied.append(_Applied(cls, _caller()))
        return original.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = original


def _caller() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if not f.filename.startswith((_TORCH_DIR, *_OWN_DIRS))]
    if not frames:
        return "no source line outside torch"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} ({f.name}): {f.line}"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _function_error(applied: list, gm) -> UnsupportedOperationError:
    first = applied[0]
    name = _qualname(first.function)
    node = _first_node_of(gm, first.function) if gm is not None else None
    others = sorted({_qualname(a.function) for a in applied[1:]} - {name})
    also = f" (also applied: {', '.join(others)})" if others else ""
    return located_error(
        UnsupportedOperationError,
        f"the model applies the torch.autograd.Function {name}{also}: torch.export records its forward's operations, "
        "and bkfx would differentiate those instead of the backward the Function defines (a straight-through "
        "estimator would get a zero gradient; a backward that mixes samples would go unseen)",
        node.name if node is not None else "none recorded (the Function's forward records no operation)",
        op_name(node) if node is not None else "-",
        first.source,
        _ADVICE.get(name, "write the operation in plain torch, so that its gradient is what autograd derives (a "
                          "straight-through estimator: x + (torch.round(x) - x).detach()), or register it as a custom "
                          "op (torch.library.custom_op with register_autograd), which bkfx keeps as one operation and "
                          "checks like any operation without a sample rule"),
    )


def _first_node_of(gm, function: type):
    """The first graph node traced inside `function.forward`, found by its stack trace."""
    try:
        lines, start = inspect.getsourcelines(function.forward)
        file = inspect.getsourcefile(function.forward)
    except (OSError, TypeError):
        return None
    for node in gm.graph.nodes:
        for f, line, _, _ in _frames(node.meta.get("stack_trace") or ""):
            if f == file and start <= int(line) < start + len(lines):
                return node
    return None


# ---- complex parameters --------------------------------------------------------------------------


def _refuse_complex_parameters(gm) -> None:
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = attribute(gm, node.target)
        if isinstance(value, torch.nn.Parameter) and value.requires_grad and value.is_complex():
            user = next(iter(node.users), node)
            raise node_error(
                UnsupportedOperationError, user,
                f"parameter {node.target!r} is complex ({value.dtype}); bkfx clips the norms of real per-sample gradients",
                "keep the real and imaginary parts as two real parameters and combine them in the forward "
                "(torch.complex(re, im)), or freeze the parameter (requires_grad_(False))",
            )


# ---- what the samples reach ----------------------------------------------------------------------


def _from_samples(gm, symbol, through_sizes: bool) -> set:
    """The nodes of `gm`'s graph (not of its sub-graphs) computed from the batched inputs: from
    their values, and with `through_sizes` also from their sizes (the batch size counts samples)."""
    out = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) and s.node.expr.has(symbol) for s in val.shape):
                out.add(node)
        elif node.op == "call_function" and (through_sizes or not _size_only(node)):
            if any(n in out for n in node.all_input_nodes):
                out.add(node)
    return out


_SIZE_ONLY = {"sym_size", "sym_numel", "sym_stride", "new_zeros", "new_ones", "new_empty", "new_full", "zeros_like",
              "ones_like", "empty_like", "full_like"}  # ops that read only their inputs' sizes, dtypes and devices


def _size_only(node) -> bool:
    return op_name(node) in _SIZE_ONLY


def _refuse_reduced_outputs(gm, from_samples: set) -> None:
    """An output that is a scalar computed from the samples has reduced them (a loss over the batch)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for leaf in pytree.tree_leaves(output.args):
        val = leaf.meta.get("val") if isinstance(leaf, torch.fx.Node) else None
        if leaf in from_samples and isinstance(val, torch.Tensor) and val.dim() == 0:
            raise node_error(
                SampleMixingError, leaf,
                "the model returns a scalar computed from every sample (a loss computed inside the model over the "
                "batch, as a Hugging Face model computes when called with labels=), so it has no per-sample gradients",
                "compute the loss outside the model from its per-sample outputs: call it without labels= (or the "
                "target argument) and apply the loss to its logits; bkfx applies the loss_reduction you declared",
            )


# ---- writes into buffers and parameters ------------------------------------------------------------

# normalisations whose schemas do not mark the running statistics they update as written:
# op name -> (the arguments written, the argument that turns the update on)
_UNANNOTATED_WRITES = {"instance_norm": (("running_mean", "running_var"), "use_input_stats")}
# writes that passes.sample_dim refuses with their own reason (batch norms in training mix samples;
# nn.Embedding(max_norm=) renormalises the rows of the batch's ids): left to it, it says more
_RENORMS = {"embedding_renorm"}
_BATCH_NORMS = {"batch_norm", "native_batch_norm", "_batch_norm_impl_index", "cudnn_batch_norm", "miopen_batch_norm",
                "_native_batch_norm_legit", "_native_batch_norm_legit_functional", "_batch_norm_with_update"}


def _refuse_state_writes(gm, from_samples: set) -> None:
    """Refuse a write into a buffer or parameter (or a view of one) by an op that reads the samples."""
    _StateWrites(from_samples).walk(gm, gm, {}, set())


class _StateWrites:
    """One walk over a graph and the sub-graphs of its higher-order ops (no_grad and autocast
    regions): `states[node]` is the set of module tensors (by name) that the node's value aliases."""

    def __init__(self, from_samples: set):
        self.from_samples = from_samples

    def walk(self, root, gm, states: dict, reads: set) -> list:
        """`states`/`reads`: the placeholders' aliases and whether they read the samples (sub-graphs).
        Returns, for the graph's outputs, (aliases, reads samples) each."""
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = attribute(gm, node.target)
                if isinstance(value, torch.Tensor):
                    states[node] = frozenset({_state_name(root, gm, node.target)})
            elif node.op == "placeholder":
                if node in self.from_samples:
                    reads.add(node)
            elif node.op == "call_function":
                if any(n in reads or n in self.from_samples for n in node.all_input_nodes):
                    reads.add(node)
                states[node] = self._call(root, gm, node, states, reads)
            elif node.op == "output":
                return [(states.get(n, frozenset()), n in reads) for n in pytree.tree_leaves(node.args)
                        if isinstance(n, torch.fx.Node)]
        return []

    def _call(self, root, gm, node, states: dict, reads: set) -> frozenset:
        if node.target is operator.getitem:
            return states.get(node.args[0], frozenset())
        sub = next((a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"
                    and isinstance(attribute(gm, a.target), torch.fx.GraphModule)), None)
        if sub is not None:  # a higher-order op: its sub-graph takes the arguments after it
            module = attribute(gm, sub.target)
            operands = node.args[node.args.index(sub) + 1:]
            placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
            inner = {p: states.get(a, frozenset()) for p, a in zip(placeholders, operands)}
            inner_reads = {p for p, a in zip(placeholders, operands) if a in reads}
            outs = _StateWrites(set()).walk(root, module, inner, inner_reads)
            if any(r for _, r in outs):
                reads.add(node)
            return frozenset().union(*(s for s, _ in outs))
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            return frozenset()
        args = arguments(node)
        name = op_name(node)
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if name in _UNANNOTATED_WRITES and args.get(_UNANNOTATED_WRITES[name][1]):
            written += list(_UNANNOTATED_WRITES[name][0])
        if name in _RENORMS or (name in _BATCH_NORMS and args.get("training", name == "_batch_norm_with_update")):
            written = []
        for arg in written:
            targets = states.get(args.get(arg), frozenset())
            if targets and node in reads:
                raise node_error(
                    StateWriteError, node,
                    f"this operation writes a value computed from the samples into {_listed(targets)}, which would "
                    "carry private data (batch statistics, a running average of the inputs) out of the step without "
                    "noise",
                    "do not keep statistics of the training samples in the model (for normalisation layers: "
                    "track_running_stats=False, or eval mode); a write that does not read the samples, such as "
                    "a step counter, is allowed",
                )
        return frozenset().union(*(
            states.get(args.get(a.name), frozenset()) for a in schema.arguments
            if a.alias_info is not None and any(r.alias_info is not None and r.alias_info.before_set & a.alias_info.before_set
                                                 for r in schema.returns)
        ))


def _state_name(root, gm, target: str) -> str:
    return target if gm is root else f"{target} (in a region of the graph)"


def _listed(targets) -> str:
    names = sorted(targets)
    return ("module tensor " if len(names) == 1 else "module tensors ") + ", ".join(repr(n) for n in names)
