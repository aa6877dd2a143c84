"""probe: a numerical separability check, at capture, of what no sample rule proves.

`passes.sample_dim` proves, op by op, how the sample dimension flows; an op it has no rule
for is marked `META_PROBE`. This pass runs the captured graph once on the example inputs
(a `torch.fx.Interpreter`) and checks every probed node, then the whole model, for every
ordered pair of samples (i, j), i != j: perturbing sample i must leave sample j's output
unchanged (to a few ulps, since a kernel may round a different allocation differently),
and outputs without a sample dimension must not change at all.

The pairs are covered in n runs, not B: each sample gets a distinct n-bit code of weight
⌊n/2⌋ (n the least with C(n, ⌊n/2⌋) >= B, so n = 6 for B = 16 and 11 for B = 256), and run r
perturbs the samples whose code has bit r. Two distinct codes of equal weight differ in a
bit where i has 1 and j has 0 (Sperner), so for every pair some run perturbs i and leaves j
alone. A perturbation changes every entry of the chosen samples: floats get independent
noise of the tensor's scale, bools flip, integers move to the next distinct value the tensor
holds (so indices stay in range). Random ops see the same random stream in every run.

A probe is evidence on the example values, not a proof; it refuses, with
`SampleMixingError`, every op that mixes on them and every op that fails on perturbed
inputs (it cannot be checked), and `passes.sample_dim` keeps the list of what went through
it (`probed_nodes`), which `explain()` reports.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch.fx import GraphModule, Interpreter, Node

from bkfx._ir.layout import SampleLayout
from bkfx._ir.meta import META_DEPENDENT, META_LAYOUT, META_PROBE
from bkfx._ir.node import op_name
from bkfx._torch import exported_in_spec, fx_pytree, pytree
from bkfx.errors import SampleMixingError, node_error

__all__ = ["probe", "sample_runs", "sample_mask", "perturb"]

_SEED = 20231


def probe(gm: GraphModule, args: tuple, kwargs: dict) -> GraphModule:
    """Check every `META_PROBE` node, then the whole model, on these example inputs."""
    flat = fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), exported_in_spec(gm)) if exported_in_spec(gm) else list(args)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    batched = [(k, n.meta[META_LAYOUT]) for k, n in enumerate(placeholders)
               if n.meta.get(META_DEPENDENT) and isinstance(n.meta.get(META_LAYOUT), SampleLayout)]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with torch.no_grad(), _SameBuffers(gm) as buffers:
        interpreter = _Probing(gm) if any(n.meta.get(META_PROBE) for n in gm.graph.nodes) else Interpreter(gm)
        with _same_randomness(flat):
            base = pytree.tree_leaves(interpreter.run(*flat))
        if not batched:
            return gm
        batch = _batch_of(flat[batched[0][0]], batched[0][1])
        generator = torch.Generator(device="cpu").manual_seed(_SEED)
        for perturbed_samples in sample_runs(batch):
            inputs = list(flat)
            for k, layout in batched:
                inputs[k] = perturb(flat[k], layout, perturbed_samples, generator)
            buffers.restore()
            try:
                with _same_randomness(flat):
                    again = pytree.tree_leaves(Interpreter(gm).run(*inputs))
            except Exception as e:  # noqa: BLE001 - any failure means the model could not be checked
                raise _unchecked(None, e) from e
            _compare_outputs(output, base, again, _output_layouts(output), perturbed_samples, whole_model=True)
    return gm


class _SameBuffers:
    """Every run of the probe starts from the buffers the capture saw, and the probe leaves them so.
    A forward that updates a buffer from the weights alone (spectral norm's power iteration,
    a step counter) would otherwise change every sample's output between runs, which reads as
    mixing, and would advance the user's model once per probe run."""

    def __init__(self, gm: GraphModule):
        self.saved = [(b, b.detach().clone()) for b in gm.buffers()]

    def restore(self) -> None:
        for b, value in self.saved:
            if not torch.equal(b, value):
                b.copy_(value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def sample_runs(batch: int) -> list[frozenset[int]]:
    """The sets of samples perturbed together, one per run: for every i != j some set holds i
    and not j. Sample k's code is the k-th ⌊n/2⌋-subset of range(n); run r perturbs the
    samples whose code contains r."""
    if batch < 2:
        return []
    n = 2
    while math.comb(n, n // 2) < batch:
        n += 1
    codes = list(itertools.islice(itertools.combinations(range(n), n // 2), batch))
    return [frozenset(k for k, code in enumerate(codes) if r in code) for r in range(n)]


class _Probing(Interpreter):
    def run_node(self, n: Node):
        if not n.meta.get(META_PROBE):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        rng = _RandomState(pytree.tree_leaves((args, kwargs)))
        result = super().run_node(n)
        after = rng.save()
        _probe_node(self, n, args, kwargs, result, rng)
        rng.restore(after)  # the rest of the graph sees the stream a plain run sees
        return result


def _probe_node(interp: Interpreter, node: Node, args, kwargs, result, rng: "_RandomState") -> None:
    inputs = [m for m in node.all_input_nodes if m.meta.get(META_DEPENDENT) and isinstance(m.meta.get(META_LAYOUT), SampleLayout)]
    if not inputs:
        return
    values = {m: interp.env[m] for m in inputs}
    batches = {_batch_of(values[m], m.meta[META_LAYOUT]) for m in inputs}
    if len(batches) != 1:
        raise node_error(
            SampleMixingError, node,
            f"{op_name(node)} takes inputs whose sample dimensions hold different numbers of samples {sorted(batches)}",
            "lay out every operand's batch the same way",
        )
    generator = torch.Generator(device="cpu").manual_seed(_SEED)
    outputs = result if isinstance(result, (list, tuple)) else (result,)
    layouts = node.meta.get(META_LAYOUT)
    layouts = layouts if isinstance(layouts, tuple) else (layouts,)
    for perturbed_samples in sample_runs(batches.pop()):
        swapped = {id(values[m]): perturb(values[m], m.meta[META_LAYOUT], perturbed_samples, generator) for m in inputs}
        call_args, call_kwargs = pytree.tree_map(
            lambda a: swapped.get(id(a), a).clone() if isinstance(a, torch.Tensor) else a, (args, kwargs))
        try:
            rng.restore()
            again = node.target(*call_args, **call_kwargs)
        except Exception as e:  # noqa: BLE001 - an op that cannot run on perturbed inputs is not checked
            raise _unchecked(node, e) from e
        again = again if isinstance(again, (list, tuple)) else (again,)
        _compare_outputs(node, outputs, again, layouts, perturbed_samples, whole_model=False)


def _batch_of(t: torch.Tensor, layout: SampleLayout) -> int:
    return t.shape[layout.dim] // (layout.before * layout.after)


def _samples_along(t: torch.Tensor, layout: SampleLayout) -> torch.Tensor:
    """The sample index of each position along `t`'s sample dimension."""
    size = t.shape[layout.dim]
    batch = size // (layout.before * layout.after)
    return (torch.arange(size, device=t.device) // layout.after) % batch


def sample_mask(t: torch.Tensor, layout: SampleLayout, samples) -> torch.Tensor:
    """A bool tensor of `t`'s shape, True at the entries of the given samples (an int or a set)."""
    samples = [samples] if isinstance(samples, int) else sorted(samples)
    which = torch.isin(_samples_along(t, layout), torch.tensor(samples, device=t.device, dtype=torch.long))
    view = [1] * t.dim()
    view[layout.dim] = t.shape[layout.dim]
    return which.reshape(view).expand(t.shape)


def perturb(t: torch.Tensor, layout: SampleLayout, samples, generator) -> torch.Tensor:
    """`t` with every entry of the given samples changed: floats by noise of the tensor's scale,
    bools flipped, integers moved to the next distinct value `t` holds (so ids stay in range)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return t
    if t.is_floating_point() or t.is_complex():
        scale = t.detach().abs().float().nan_to_num(0, 0, 0).mean().clamp_min(1.0).item()
        kick = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(device=t.device, dtype=t.dtype)
        changed = t + kick * scale
    elif t.dtype == torch.bool:
        changed = ~t
    else:
        values = torch.unique(t)
        if values.numel() < 2:
            return t  # one value everywhere: no other in-range value to move to
        changed = values[(torch.searchsorted(values, t.contiguous()) + 1) % values.numel()]
    return torch.where(sample_mask(t, layout, samples), changed, t)


def _compare_outputs(node: Node, base, again, layouts, perturbed_samples, whole_model: bool) -> None:
    for k, (b, a) in enumerate(zip(base, again)):
        if not isinstance(b, torch.Tensor) or b.numel() == 0:
            continue
        layout = layouts[k] if k < len(layouts) else None
        if not isinstance(layout, SampleLayout):
            if not _unchanged(b, a):
                _refuse(node, perturbed_samples, None, whole_model)
            continue
        if tuple(a.shape) != tuple(b.shape):
            _refuse(node, perturbed_samples, None, whole_model)
        samples = _samples_along(b, layout)
        for j in sorted(set(range(_batch_of(b, layout))) - perturbed_samples):
            rows = (samples == j).nonzero().flatten()
            if not _unchanged(b.index_select(layout.dim, rows), a.index_select(layout.dim, rows)):
                _refuse(node, perturbed_samples, j, whole_model)


def _unchanged(b: torch.Tensor, a: torch.Tensor) -> bool:
    if torch.equal(b, a):
        return True
    if b.dtype.is_floating_point or b.dtype.is_complex:
        b64, a64 = b.to(torch.complex128 if b.is_complex() else torch.float64), a.to(torch.complex128 if a.is_complex() else torch.float64)
        both_nan = b64.isnan() & a64.isnan()
        scale = b64.abs().nan_to_num(0, 0, 0).max().item() if b64.numel() else 0.0
        tol = 8 * torch.finfo(b.dtype if b.dtype.is_floating_point else torch.float64).eps * max(scale, 1e-30)
        return bool(((b64 - a64).abs() <= tol).logical_or(both_nan).all())
    return False


def _output_layouts(output: Node) -> tuple:
    return tuple(n.meta.get(META_LAYOUT) if isinstance(n, Node) else None for n in pytree.tree_leaves(output.args[0]))


def _samples_text(samples) -> str:
    s = sorted(samples)
    return "samples " + ", ".join(map(str, s[:8])) + (f", ... ({len(s)} in all)" if len(s) > 8 else "")


def _refuse(node: Node, perturbed_samples, changed: int | None, whole_model: bool):
    victim = f"sample {changed}'s" if changed is not None else "the batch-wide"
    if whole_model:
        raise SampleMixingError(
            f"the model mixes samples: changing {_samples_text(perturbed_samples)}'s inputs changed {victim} outputs "
            "(found by bkfx's whole-model probe at capture, after every operation passed its own check)\n"
            "  node: output\n  operation: the model's forward\n  source: the model's outputs\n"
            "  what to do: make sure no operation combines different samples (batch statistics, attention or pooling "
            "across the batch, indexing with other samples' positions); if an input is not batch-first, pass batch_dim="
        )
    raise node_error(
        SampleMixingError, node,
        f"{op_name(node)} mixes samples: changing {_samples_text(perturbed_samples)}'s entries of its inputs changed "
        f"{victim} entries of its output (bkfx has no sample rule for this operation, so it probed it at capture)",
        "apply the operation along non-sample dimensions only, or compute it per sample (e.g. torch.func.vmap "
        "over the batch inside the model); if an input is not batch-first, pass batch_dim= to bkfx.compile",
    )


def _unchecked(node: Node | None, e: Exception) -> SampleMixingError:
    reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    advice = ("write the operation with ops bkfx has sample rules for (see bkfx/rules/README.md), or make it accept "
              "any per-sample values of its inputs")
    if node is None:
        return SampleMixingError(
            "bkfx could not check that the model keeps samples apart: its forward failed on perturbed samples "
            f"({reason})\n  node: output\n  operation: the model's forward\n  source: the model's outputs\n"
            f"  what to do: {advice}")
    return node_error(
        SampleMixingError, node,
        f"bkfx has no sample rule for {op_name(node)} and could not probe it: it failed on perturbed samples ({reason}), "
        "so nothing shows that it keeps samples apart",
        advice,
    )


class _RandomState:
    """The CPU and CUDA generator states of the tensors' devices, to replay a random stream."""

    def __init__(self, tensors):
        self.devices = sorted({t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda})
        self.state = self.save()

    def save(self):
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.devices]

    def restore(self, state=None):
        cpu, cuda = state or self.state
        torch.set_rng_state(cpu)
        for d, s in zip(self.devices, cuda):
            torch.cuda.set_rng_state(s, d)


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
