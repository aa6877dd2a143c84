"""capture: the model as an ATen GraphModule with a symbolic batch size.

`torch.export.export(strict=False)` traces the model with the sample dimension of every
batched tensor input (dim 0, or the input's `batch_dim`) marked dynamic (one shared `Dim`),
so one capture serves every batch size, 0 and 1 included. The unlifted module keeps the
original parameter names and the original Parameter objects.
"""
from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass

import sympy
import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from bkfx.errors import CaptureError
from bkfx.meta import META_BATCH, META_BATCH_DIMS
from bkfx.source import _TORCH_DIR



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
        raise CaptureError("the first call of a bkfx-compiled model needs at least one sample to capture the graph.")
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

    try:
        exported = export()
    except Exception as e:  # torch.export raises many classes; all mean the same thing here
        raise CaptureError(_capture_failure(e, batch_dim, export)) from e
    gm = exported.module()
    _share_original_parameters(gm, model)
    symbol = _batch_symbol(gm)
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
