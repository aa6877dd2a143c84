"""Stages 3 and 4 of the compiled BK step with `mode="reduce-overhead"` on a GPU: the two programs
captured and replayed as CUDA graphs (`CudaGraphs`, one graph pair per batch size), with the memory
protocol that keeps a pending backward's saved values intact; `simulated_capture` gives a CUDA
graph's memory semantics on any device, for tests."""
from __future__ import annotations

import weakref

import torch

from bkfx._runtime.step.program import Program
from bkfx._torch import foreach_copy_


class CudaGraphs:
    """The two programs of one trace as CUDA graphs (`mode="reduce-overhead"` on a GPU): one
    forward and one backward graph per batch size, captured on first use after a warm-up.

    A graph reads its inputs from, and writes its outputs to, memory of its own. Inputs are
    copied in only when they are not already there (parameters and buffers never are; the
    backward graph reads the forward graph's saved values where they lie). Outputs that leave
    (the model's outputs, the gradients, the norms) are copied out. The saved values stay in
    the forward graph's memory until its next replay: before that replay, the values of a
    call whose backward has not run yet are moved to memory of their own."""

    def __init__(self):
        self._forward: dict[tuple, _Graphed] = {}  # input shapes -> graph
        self._backward: dict[tuple, _Graphed] = {}  # keyed like the forward graph whose saved values it reads
        self._holder: dict[tuple, weakref.ref] = {}  # the call whose saved values are in a forward graph's memory

    def _release(self, key) -> None:
        """Move the saved values of the call that holds the forward graph's memory to memory of its
        own (its backward may still come), so that the graph's memory can be written."""
        holder = self._holder.pop(key, None)
        previous = holder() if holder is not None else None
        if previous is not None and previous.saved is not None:
            previous.saved = [_copy(s) if isinstance(s, torch.Tensor) else s for s in previous.saved]

    def forward(self, program: Program, primals, pending) -> list:
        key = _shapes_of(program, primals)
        self._release(key)
        graph = self._forward.get(key)
        if graph is None:
            graph = self._forward[key] = _Graphed(program.forward, list(primals), keep=range(len(program.state)))
        results = graph(list(primals))
        self._holder[key] = weakref.ref(pending)
        pending.graph_key = key
        return [_copy(r) for r in results[:program.n_outputs]] + list(results[program.n_outputs:])

    def backward(self, program: Program, inputs, pending) -> list:
        key = pending.graph_key
        graph = self._backward.get(key)
        if graph is None:
            graph = self._backward[key] = _Graphed(program.backward, list(inputs), keep=_shared(inputs, self._forward[key]))
        if any(graph.inputs[k].data_ptr() != inputs[k].data_ptr() for k in graph.kept):
            # this call's saved values were moved out: the forward graph's memory, where the backward graph
            # reads them, is about to be written, so whichever call holds it now moves out first
            self._release(key)
        return _copy_out(graph(list(inputs)))


def _shapes_of(program: Program, primals) -> tuple:
    """A graph's key: every input's shape (the batch size decides them)."""
    return tuple(tuple(p.shape) for p in primals[len(program.state):] if isinstance(p, torch.Tensor))


def _shared(inputs, forward_graph) -> list[int]:
    """The backward inputs that lie in the forward graph's output memory: read where they are."""
    if forward_graph is None:
        return []
    outputs = {t.data_ptr() for t in forward_graph.outputs if isinstance(t, torch.Tensor)}
    return [k for k, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.data_ptr() in outputs]


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy with `t`'s strides (the compiled programs check their inputs' strides; `clone` makes
    a strided view such as `x[:, 0]` contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _copy_out(values: list) -> list:
    """Copies of a graph's outputs (gradients, norms): the contiguous ones of each dtype as views
    of one new buffer, filled by one fused copy (a copy per tensor costs a kernel launch each)."""
    out = list(values)
    groups: dict = {}
    for k, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            if v.is_contiguous():
                groups.setdefault(v.dtype, []).append(k)
            else:
                out[k] = _copy(v)
    for dtype, ks in groups.items():
        flat = torch.empty(sum(values[k].numel() for k in ks), dtype=dtype, device=values[ks[0]].device)
        parts = [part.view(values[k].shape) for part, k in zip(flat.split([values[k].numel() for k in ks]), ks)]
        foreach_copy_(parts, [values[k] for k in ks])
        for k, part in zip(ks, parts):
            out[k] = part
    return out


class _Graphed:
    """`fn` captured as a CUDA graph on these example inputs. `keep`: inputs used where they lie
    (copied into only if a later call passes another tensor); the others get static copies.
    Every replay writes the same output memory (`outputs`)."""

    def __init__(self, fn, inputs: list, keep):
        keep = set(keep)
        self.kept = sorted(k for k in keep if isinstance(inputs[k], torch.Tensor))
        self.inputs = [t if (k in keep or not isinstance(t, torch.Tensor)) else _copy(t) for k, t in enumerate(inputs)]
        self.outputs, self.replay = capture(fn, self.inputs)

    def __call__(self, inputs: list) -> list:
        for static, given in zip(self.inputs, inputs):
            if isinstance(static, torch.Tensor) and static.data_ptr() != given.data_ptr():
                static.copy_(given)
        self.replay()
        return self.outputs


def cuda_capture(fn, inputs: list):
    """`(outputs, replay)`: `fn` on `inputs` recorded as a CUDA graph after a warm-up."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: lazy initialisation, autotuning
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = list(fn(*inputs))
    return outputs, graph.replay


def simulated_capture(fn, inputs: list):
    """A stand-in for `cuda_capture` on any device, with a CUDA graph's memory semantics: every
    replay recomputes `fn` on the static inputs and writes the results into the same output
    tensors (tests of the memory protocol on the CPU: `tests/test_compiled.py`)."""
    outputs = list(fn(*inputs))

    def replay():
        for out, new in zip(outputs, fn(*inputs)):
            if isinstance(out, torch.Tensor):
                out.copy_(new)

    return outputs, replay


capture = cuda_capture  # how `_Graphed` records a program (tests swap in `simulated_capture`)
