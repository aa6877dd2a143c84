"""probe: a numerical separability check, at capture, of what no sample rule proves.

`passes.sample_dim` proves, op by op, how the sample dimension flows; an op it has no rule
for is marked `META_PROBE`. This pass runs the captured graph once on the example inputs
(a `torch.fx.Interpreter`) and, at every probed node, runs the op again with one sample's
entries of every sample-dependent input perturbed (sample k's values replaced by another
sample's, plus noise), for the first and the last sample: every other sample's entries of
every output must stay unchanged (to a few ulps, since a kernel may round a different
allocation differently), and outputs without a sample dimension must not change at all.
Random ops see the same random stream in both runs.

Then one whole-model probe: the graph's outputs with sample 0's inputs perturbed must be
unchanged for every other sample.

A probe is evidence on the example values, not a proof; it refuses, with
`SampleMixingError`, every op that mixes on them, and `passes.sample_dim` keeps the list of
what went through it (`probed_nodes`), which `explain()` reports.
"""
from __future__ import annotations

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Interpreter, Node

from bkfx.errors import SampleMixingError, node_error
from bkfx.layout import SampleLayout
from bkfx.meta import META_DEPENDENT, META_LAYOUT, META_PROBE
from bkfx.node import op_name

_SEED = 20231


def probe(gm: GraphModule, args: tuple, kwargs: dict) -> GraphModule:
    """Check every `META_PROBE` node, then the whole model, on these example inputs."""
    flat = fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), gm._in_spec) if hasattr(gm, "_in_spec") else list(args)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        if any(n.meta.get(META_PROBE) for n in gm.graph.nodes):
            _Probing(gm).run(*flat)
        batched = [(k, n.meta[META_LAYOUT]) for k, n in enumerate(placeholders)
                   if n.meta.get(META_DEPENDENT) and isinstance(n.meta.get(META_LAYOUT), SampleLayout)]
        if batched:
            perturbed = list(flat)
            sample = 0
            generator = torch.Generator(device="cpu").manual_seed(_SEED)
            for k, layout in batched:
                perturbed[k] = _perturb(flat[k], layout, sample, generator, noise=True)
            with _same_randomness(flat):
                again = Interpreter(gm).run(*perturbed)
            with _same_randomness(flat):
                base_again = Interpreter(gm).run(*flat)
            output = next(n for n in gm.graph.nodes if n.op == "output")
            _compare_outputs(output, pytree.tree_leaves(base_again), pytree.tree_leaves(again),
                             _output_layouts(output), sample, whole_model=True)
    return gm


class _Probing(Interpreter):
    def run_node(self, n: Node):
        if not n.meta.get(META_PROBE):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        with _same_randomness(pytree.tree_leaves((args, kwargs))):
            result = super().run_node(n)
        _probe_node(self, n, args, kwargs, result)
        return result


def _probe_node(interp: Interpreter, node: Node, args, kwargs, result) -> None:
    inputs = [m for m in node.all_input_nodes if m.meta.get(META_DEPENDENT) and isinstance(m.meta.get(META_LAYOUT), SampleLayout)]
    if not inputs:
        return
    values = {m: interp.env[m] for m in inputs}
    batch = _batch_of(values[inputs[0]], inputs[0].meta[META_LAYOUT])
    generator = torch.Generator(device="cpu").manual_seed(_SEED)
    outputs = result if isinstance(result, (list, tuple)) else (result,)
    layouts = node.meta.get(META_LAYOUT)
    layouts = layouts if isinstance(layouts, tuple) else (layouts,)
    for sample in sorted({0, batch - 1}):
        for noise in (True, False):  # noise off: values another sample really has (indices stay in range)
            swapped = {m: _perturb(v, m.meta[META_LAYOUT], sample, generator, noise) for m, v in values.items()}
            call_args, call_kwargs = _replace((args, kwargs), {id(values[m]): swapped[m] for m in inputs})
            call_args, call_kwargs = pytree.tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a,
                                                     (call_args, call_kwargs))
            try:
                with _same_randomness(pytree.tree_leaves((args, kwargs))):
                    again = node.target(*call_args, **call_kwargs)
            except Exception:  # the op refuses perturbed values (out-of-range ids): try real values
                continue
            again = again if isinstance(again, (list, tuple)) else (again,)
            _compare_outputs(node, outputs, again, layouts, sample, whole_model=False)
            break


def _replace(tree, by_id: dict):
    return pytree.tree_map(lambda a: by_id.get(id(a), a) if isinstance(a, torch.Tensor) else a, tree)


def _batch_of(t: torch.Tensor, layout: SampleLayout) -> int:
    return t.shape[layout.dim] // (layout.before * layout.after)


def sample_mask(t: torch.Tensor, layout: SampleLayout, sample: int) -> torch.Tensor:
    """A bool tensor of `t`'s shape, True at sample `sample`'s entries."""
    size = t.shape[layout.dim]
    batch = size // (layout.before * layout.after)
    which = (torch.arange(size, device=t.device) // layout.after) % batch == sample
    view = [1] * t.dim()
    view[layout.dim] = size
    return which.reshape(view).expand(t.shape)


def _perturb(t: torch.Tensor, layout: SampleLayout, sample: int, generator, noise: bool) -> torch.Tensor:
    """`t` with sample `sample`'s entries replaced by the next sample's, plus noise for floats."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return t
    size = t.shape[layout.dim]
    batch = size // (layout.before * layout.after)
    other = (sample + 1) % batch
    pos = torch.arange(size, device=t.device)
    which = (pos // layout.after) % batch == sample
    source = torch.where(which, pos + (other - sample) * layout.after, pos)
    out = t.index_select(layout.dim, source)
    if noise and (t.is_floating_point() or t.is_complex()):
        scale = t.detach().abs().float().mean().clamp_min(1.0).item()
        kick = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(device=t.device, dtype=t.dtype)
        out = out + kick * scale
    elif noise and t.dtype == torch.bool:
        out = ~out
    return torch.where(sample_mask(t, layout, sample), out, t)


def _compare_outputs(node: Node, base, again, layouts, sample: int, whole_model: bool) -> None:
    for k, (b, a) in enumerate(zip(base, again)):
        if not isinstance(b, torch.Tensor) or b.numel() == 0:
            continue
        layout = layouts[k] if k < len(layouts) else None
        if not all(_unchanged(x, y) for x, y in zip(_others(b, layout, sample), _others(a, layout, sample))):
            _refuse(node, sample, whole_model)


def _others(t: torch.Tensor, layout, sample: int) -> list[torch.Tensor]:
    """The entries of `t` that belong to samples other than `sample` (all of `t` without a layout)."""
    if not isinstance(layout, SampleLayout):
        return [t]
    if layout.merged:
        return [t[~sample_mask(t, layout, sample)]]
    batch = t.shape[layout.dim]
    return [t.narrow(layout.dim, 0, sample), t.narrow(layout.dim, sample + 1, batch - sample - 1)]


def _unchanged(b: torch.Tensor, a: torch.Tensor) -> bool:
    if torch.equal(b, a):
        return True
    if b.dtype.is_floating_point or b.dtype.is_complex:
        b64, a64 = b.to(torch.complex128 if b.is_complex() else torch.float64), a.to(torch.complex128 if a.is_complex() else torch.float64)
        both_nan = b64.isnan() & a64.isnan()
        scale = b64.abs().nan_to_num(0, 0, 0).max().item() if b64.numel() else 0.0
        tol = 8 * torch.finfo(b.dtype if b.dtype.is_floating_point else torch.float64).eps * max(scale, 1e-30)
        return bool(((b64 - a64).abs() <= tol).logical_or(both_nan).all())
    return torch.equal(b, a)


def _output_layouts(output: Node) -> tuple:
    return tuple(n.meta.get(META_LAYOUT) if isinstance(n, Node) else None for n in pytree.tree_leaves(output.args[0]))


def _refuse(node: Node, sample: int, whole_model: bool):
    if whole_model:
        raise SampleMixingError(
            f"the model mixes samples: changing sample {sample}'s inputs changed other samples' outputs "
            "(found by bkfx's whole-model probe at capture, after every operation passed its own check)\n"
            "  node: output\n  operation: the model's forward\n  source: the model's outputs\n"
            "  what to do: make sure no operation combines different samples (batch statistics, attention or pooling "
            "across the batch, indexing with other samples' positions); if an input is not batch-first, pass batch_dim="
        )
    raise node_error(
        SampleMixingError, node,
        f"{op_name(node)} mixes samples: changing sample {sample}'s entries of its inputs changed other samples' "
        "entries of its output (bkfx has no sample rule for this operation, so it probed it at capture)",
        "apply the operation along non-sample dimensions only, or compute it per sample (e.g. torch.func.vmap "
        "over the batch inside the model); if an input is not batch-first, pass batch_dim= to bkfx.compile",
    )


class _same_randomness:
    """Fork the RNGs of the tensors' devices and seed them the same way on entry."""

    def __init__(self, tensors):
        self.devices = sorted({t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda})

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.manual_seed(_SEED)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)
