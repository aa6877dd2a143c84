"""capture: the model as an ATen GraphModule with a symbolic batch size.

`torch.export.export(strict=False)` traces the model with dim 0 of every batched
tensor input marked dynamic (one shared `Dim`), so one capture serves every batch
size, 0 and 1 included. The unlifted module keeps the original parameter names and
the original Parameter objects.
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
from bkfx.source import _TORCH_DIR

META_BATCH = "bkfx.batch_symbol"


@dataclass
class Capture:
    graph_module: torch.fx.GraphModule
    batch: sympy.Symbol  # the symbolic batch size in every node's shapes


def batched_tensors(args, kwargs) -> list[torch.Tensor]:
    """The inputs whose dim 0 is the sample dimension: every tensor of rank >= 1."""
    return [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() >= 1]


def signature(model: torch.nn.Module, args, kwargs) -> tuple:
    """What a capture depends on: everything about the inputs but the batch size, and the mode."""

    def key(leaf):
        if isinstance(leaf, torch.Tensor):
            return ("tensor", leaf.dtype, leaf.device, leaf.dim(), tuple(leaf.shape[1:]))
        return ("value", repr(leaf))

    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (model.training, str(spec), tuple(key(x) for x in leaves))


def capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> Capture:
    """Export `model` on these example inputs with a dynamic sample dimension."""
    batched = batched_tensors(args, kwargs)
    if not batched:
        raise CaptureError("bkfx.compile needs at least one tensor input whose dim 0 is the batch.")
    sizes = {t.shape[0] for t in batched}
    if len(sizes) != 1:
        raise CaptureError(
            f"every tensor input's dim 0 must be the batch size, but they differ: {sorted(sizes)}. "
            "Pass per-batch constants as module buffers or Python values instead."
        )
    if sizes == {0}:
        raise CaptureError("the first call of a bkfx-compiled model needs at least one sample to capture the graph.")
    # torch.export specialises sizes 0 and 1; trace on two samples (the first repeated) when given one.
    if sizes == {1}:
        args, kwargs = pytree.tree_map(
            lambda t: torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() >= 1 else t, (args, kwargs)
        )
    batch = Dim("batch", min=0)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    dynamic = {
        name: pytree.tree_map(
            lambda t: {0: batch} if isinstance(t, torch.Tensor) and t.dim() >= 1 else None, value
        )
        for name, value in bound.arguments.items()
    }
    try:
        exported = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # torch.export raises many classes; all mean the same thing here
        raise CaptureError(_capture_failure(e)) from e
    gm = exported.module()
    _share_original_parameters(gm, model)
    symbol = _batch_symbol(gm)
    gm.meta[META_BATCH] = symbol
    return Capture(gm, symbol)


def _capture_failure(e: Exception) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    where = f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name}): {frames[-1].line}" if frames else "unknown"
    message = str(e).strip().splitlines()
    first = message[0] if message else type(e).__name__
    return (
        f"torch.export could not capture the model: {type(e).__name__}: {first}\n"
        f"  source: {where}\n"
        "  what to do: make the forward pass traceable (no data-dependent Python control flow, "
        "no .item() on tensors, no caches of non-tensor objects, e.g. HF's use_cache=False), "
        "then compile again."
    )


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
            if isinstance(val, torch.Tensor) and val.dim() >= 1 and isinstance(val.shape[0], torch.SymInt):
                return val.shape[0].node.expr
    raise CaptureError("torch.export kept no symbolic batch size; the model may ignore its batched inputs.")
