"""Stages 1 and 2 of the compiled BK step, and `build`, which runs stages 1 to 3 for one call.

1. Joint trace: the step's primals as fake tensors with one symbol for the batch size
   (`_fake_primals`); `joint` (`_joint`), the rewritten graph and autograd's backward with the
   ledger recording, traced by make_fx and functionalised (`_trace`).
2. Partition: the min-cut partitioner splits the joint graph into the forward and the backward
   program (`_partition`).
3. Compile: `_compile` makes the two graphs a `Program` (`bkfx._runtime.step.program`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from bkfx._ir.node import attribute
from bkfx._runtime.ledger import Tape, recording
from bkfx._runtime.step.cudagraphs import CudaGraphs
from bkfx._runtime.step.kernels import decompositions, symbolic_kernels
from bkfx._runtime.step.program import Program, StepOptions
from bkfx._torch import FakeTensorMode, enable_python_dispatcher, min_cut_rematerialization_partition, pytree


def build(dp_model, compiled, args, kwargs, batched, options: StepOptions) -> Program:
    """Trace one BK step of the capture `compiled` on these inputs, partition it, compile it."""
    inputs = _Inputs.of(dp_model, compiled.graph_module, args, kwargs, batched)
    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)  # the capture's tensor constants
    primals = _fake_primals(inputs, fake_mode)
    layout: dict = {}  # what `joint` returns, filled as it is traced
    joint = _joint(dp_model, compiled, inputs, layout)
    tangents = _example_tangents(inputs, primals, fake_mode)
    joint_gm = _trace(joint, primals, tangents, fake_mode)
    forward_graph, backward_graph, saved_order = _partition(joint_gm, primals, tangents, layout["n_outputs"])
    return _compile(options, forward_graph, backward_graph, saved_order, inputs, primals, layout, fake_mode)


@dataclass
class _Inputs:
    """Where the step's primals come from, in primal order: the capture's state (parameters,
    buffers, tensor constants), the call's tensor inputs, the clipping thresholds, the padding mask."""

    gm: torch.fx.GraphModule
    flat: list  # the call's (args, kwargs) flattened
    in_spec: object
    state: dict  # name -> parameter, buffer or tensor constant
    model_name: dict  # id(parameter) -> its name in the model (the ledger's names are the model's)
    positions: list[int]  # the tensor inputs' positions in `flat`
    dims: dict  # id(batched input) -> its batch dimension
    first_batched: int  # the batch size is read off one batched input: its position among the tensor inputs
    first_dim: int  # and its batch dimension
    # the clipping thresholds, 0-dim tensors read at run time: a new R (adaptive clipping) runs the same programs
    thresholds: list
    mask: torch.Tensor | None  # padding rows (`bkfx.training.data.Padding`): an input of the batch's size, after R

    @classmethod
    def of(cls, dp_model, gm: torch.fx.GraphModule, args, kwargs, batched) -> _Inputs:
        flat, in_spec = pytree.tree_flatten((args, kwargs))
        dims = {id(t): d for t, d in batched}
        state = {**dict(gm.named_parameters()), **dict(gm.named_buffers()), **_constants(gm)}
        positions = [k for k, v in enumerate(flat) if isinstance(v, torch.Tensor)]
        first_batched = next(j for j, k in enumerate(positions) if id(flat[k]) in dims)
        return cls(gm, flat, in_spec, state, {id(p): n for n, p in dp_model._params.items()}, positions, dims,
                   first_batched, dims[id(flat[positions[first_batched]])],
                   dp_model.threshold_tensors(_device_of(state, flat, positions)), dp_model._call_mask)

    @property
    def names(self) -> list[str]:
        return list(self.state)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.flat[k] for k in self.positions]

    @property
    def trainable(self) -> set[str]:
        """The state the ledger clips: the model's parameters."""
        return {n for n, t in self.state.items() if id(t) in self.model_name}

    def split(self, primals: list) -> tuple[list, list, list, object]:
        """`primals` as (state, tensor inputs, thresholds, mask or None)."""
        n_state, n_inputs = len(self.state), len(self.positions)
        rest = primals[n_state + n_inputs:]
        return (primals[:n_state], primals[n_state:n_state + n_inputs], rest[:len(self.thresholds)],
                primals[-1] if self.mask is not None else None)


def _fake_primals(inputs: _Inputs, fake_mode: FakeTensorMode) -> list:
    """The primals as fake tensors: every size static but the batch dimension of the batched inputs
    and of the mask, one symbol."""

    def fake(t: torch.Tensor, dim):
        # DUCK: one symbol for the batch dimension of every batched input (a symbol each would leave
        # guards such as Eq(s1, s0) that no batch size can decide, and every call would trace anew)
        sizes = [DimDynamic.DUCK if k == dim else DimDynamic.STATIC for k in range(t.dim())]
        return fake_mode.from_tensor(t.detach(), symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    return [fake(t, None) for t in inputs.state.values()] + \
        [fake(x, inputs.dims.get(id(x))) for x in inputs.tensors] + [fake(t, None) for t in inputs.thresholds] + \
        ([fake(inputs.mask, 0)] if inputs.mask is not None else [])


def _call(inputs: _Inputs, state: list, tensors: list):
    """The rewritten graph on these state values and tensor inputs (the call's other leaves as given)."""
    values = list(inputs.flat)
    for k, x in zip(inputs.positions, tensors):
        values[k] = x
    call_args, call_kwargs = pytree.tree_unflatten(values, inputs.in_spec)
    return torch.func.functional_call(inputs.gm, dict(zip(inputs.names, state)), call_args, call_kwargs, strict=False)


def _joint(dp_model, compiled, inputs: _Inputs, layout: dict):
    """`joint(primals, tangents)`, what stage 1 traces: the rewritten graph on the primals, then
    `torch.autograd.backward(outputs, tangents)`, which runs every site's tap and the ledger
    (per-sample norms, clip factors, clipped sums written to `.grad` of the traced parameter
    leaves). It returns the model's tensor outputs, the gradients (clipped sums, then input
    gradients) and the per-sample norms, and writes into `layout` which is which."""
    names, trainable = inputs.names, inputs.trainable
    wants_grad = [x.requires_grad and x.is_floating_point() for x in inputs.tensors]

    def joint(primals, tangents):
        state, tensors, thresholds, mask = inputs.split(primals)
        leaves = [p.detach().requires_grad_() if n in trainable else p for n, p in zip(names, state)]
        xs = [x.detach().requires_grad_() if w else x for x, w in zip(tensors, wants_grad)]
        params = {inputs.model_name[id(inputs.state[n])]: leaf for n, leaf in zip(names, leaves) if n in trainable}
        config = dataclasses.replace(dp_model._clip, thresholds=list(thresholds))
        tape = Tape(compiled.sites, params, config, xs[inputs.first_batched].shape[inputs.first_dim], compiled.tied,
                    traced=True, mask=mask)
        with recording(tape):
            out = _call(inputs, leaves, xs)
        outs, out_spec = pytree.tree_flatten(out)
        tensors = [o for o in outs if isinstance(o, torch.Tensor)]
        differentiable = [k for k, o in enumerate(tensors) if o.requires_grad]
        if differentiable:
            torch.autograd.backward([tensors[k] for k in differentiable], [tangents[k] for k in differentiable])
        grads = [(j, leaf.grad) for j, leaf in enumerate(leaves + xs) if isinstance(leaf, torch.Tensor)
                 and leaf.requires_grad and leaf.grad is not None]
        norms, keys = _norms_of(tape)
        layout.update(out_spec=out_spec, n_outputs=len(tensors), differentiable=differentiable, norms=keys,
                      out_constants={k: o for k, o in enumerate(outs) if not isinstance(o, torch.Tensor)},
                      grad_primals=[j for j, _ in grads])
        return [t.detach() for t in tensors] + [g for _, g in grads] + norms

    return joint


def _norms_of(tape: Tape) -> tuple[list, list]:
    """The per-sample norms `joint` returns after the gradients, and their keys: "total", then group indices."""
    if tape.per_sample_norms is None:
        return [], []
    norms, keys = [tape.per_sample_norms], ["total"]
    for g, v in enumerate(tape.group_norms or []):
        if v is not None:
            norms.append(v)
            keys.append(g)
    return norms, keys


def _example_tangents(inputs: _Inputs, primals: list, fake_mode: FakeTensorMode) -> list:
    """Fake tangents for the model's tensor outputs (float32 for an integer output), from a forward
    without gradients."""
    state, tensors, _, _ = inputs.split(primals)
    # the python dispatcher as in the trace (`_trace`): composite ops (matmul) run their Python forms, which
    # keep the batch size symbolic (torch 2.11's C++ matmul reads a 3-d input's element count as an
    # integer when the other operand takes no gradient, as a site's detached weight)
    with enable_python_dispatcher(), fake_mode, torch.no_grad(), symbolic_kernels():
        outs = [o for o in pytree.tree_leaves(_call(inputs, state, tensors)) if isinstance(o, torch.Tensor)]
        return [torch.empty_like(o) if o.is_floating_point() else torch.empty_like(o, dtype=torch.float32) for o in outs]


def _trace(joint, primals: list, tangents: list, fake_mode: FakeTensorMode) -> torch.fx.GraphModule:
    """Stage 1: `joint` as one flat ATen graph of the whole step, functionalised (the ledger's
    in-place `add_`/`index_add_` become pure ops). The guards it puts on the batch size are left
    in `fake_mode`'s shape environment."""
    functional = None

    def joint_functional(primals, tangents):  # make_fx names the placeholders after these arguments
        return functional(primals, tangents)

    # as AOTAutograd traces: factories (arange) fake too, symbolic sizes through composite ops
    with enable_python_dispatcher(), fake_mode, symbolic_kernels():
        traced = make_fx(joint, decomposition_table=decompositions())(primals, tangents)
        functional = torch.func.functionalize(traced, remove="mutations")
        return make_fx(joint_functional, decomposition_table=decompositions())(primals, tangents)


def _partition(joint_gm: torch.fx.GraphModule, primals: list, tangents: list, n_outputs: int):
    """Stage 2: AOTAutograd's min-cut partitioner splits the joint graph into a forward program
    (the model's outputs, then the values the backward needs) and a backward program (those values
    and the outputs' tangents -> gradients, norms). Returns both programs' graphs and the
    backward's saved inputs as positions among the forward's saved outputs."""
    _recompute_views_of_inputs(joint_gm)
    forward_graph, backward_graph = min_cut_rematerialization_partition(
        joint_gm, primals + tangents, num_fwd_outputs=n_outputs
    )
    saved = [n.name for n in forward_graph.graph.find_nodes(op="output")[0].args[0][n_outputs:]]
    taken = [n.name for n in backward_graph.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")]
    if sorted(saved) != sorted(taken):
        raise AssertionError(f"the partitioned programs disagree on the saved values: {saved} vs {taken}")
    return forward_graph, backward_graph, [saved.index(name) for name in taken]


def _compile(options: StepOptions, forward_graph, backward_graph, saved_order: list[int], inputs: _Inputs,
             primals: list, layout: dict, fake_mode: FakeTensorMode) -> Program:
    """Stage 3: both programs compiled with a symbolic batch size (one compilation for every batch
    size), with the guards the trace assumed and the layout of their inputs and outputs."""
    guards = [g.expr for g in fake_mode.shape_env.guards]  # the trace's, before compiling adds any
    placeholders = backward_graph.graph.find_nodes(op="placeholder")
    fake_inputs = [_in_mode(n.meta["val"], fake_mode) for n in placeholders]
    program = Program(
        options.compile(forward_graph, primals), options.compile(backward_graph, fake_inputs), forward_graph,
        backward_graph, guards, primals[len(inputs.state) + inputs.first_batched].shape[inputs.first_dim].node.expr,
        layout["n_outputs"], layout["out_spec"], layout["out_constants"], layout["differentiable"],
        layout["grad_primals"], layout["norms"], len(primals), list(inputs.state.values()), saved_order,
        tangents=[int(n.name.rpartition("_")[2]) - 1 for n in placeholders if n.name.startswith("tangents")],
        traced_at=int(inputs.tensors[inputs.first_batched].shape[inputs.first_dim]),
        threshold_device=inputs.thresholds[0].device if inputs.thresholds else torch.device("cpu"),
        masked=inputs.mask is not None,
    )
    if options.cuda_graphs and any(p.device.type == "cuda" for p in primals):
        program.graphs = CudaGraphs()
    return program


def _device_of(state: dict, flat: list, positions: list) -> torch.device:
    """Where the thresholds live: the device of the parameters (else of the inputs)."""
    for t in [*state.values(), *(flat[k] for k in positions)]:
        return t.device
    return torch.device("cpu")


def _recompute_views_of_inputs(joint: torch.fx.GraphModule) -> None:
    """Views of the step's inputs (a weight's transposes, which the backward's input gradient
    reads) are recomputed by the backward program, not saved by the forward one: a saved view of
    an input is an output that aliases an input, which AOTAutograd's wrapper of a compiled
    program rebuilds in Python on every call (view by view); a saved input is handed back as it is."""
    from torch.utils.checkpoint import CheckpointPolicy

    rooted = {n for n in joint.graph.nodes if n.op == "placeholder"}
    for node in joint.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "is_view", False) and node.args and node.args[0] in rooted:
            rooted.add(node)
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE


def _in_mode(value, fake_mode: FakeTensorMode):
    """A backward input's example value in the trace's fake mode: make_fx computes values made
    from constants alone (an attention mask) for real, or in a fake mode of its own."""
    if not isinstance(value, torch.Tensor) or getattr(value, "fake_mode", None) is fake_mode:
        return value
    with fake_mode:
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)


def _constants(gm: torch.fx.GraphModule) -> dict:
    """The capture's tensor constants (attributes that are neither parameters nor buffers): primals
    like the buffers, so that every tensor the trace sees is one of its fake inputs."""
    known = {n for n, _ in gm.named_parameters(remove_duplicate=False)} | \
        {n for n, _ in gm.named_buffers(remove_duplicate=False)}  # a tied parameter's every name
    out = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        if node.target not in known:
            value = attribute(gm, node.target)
            if isinstance(value, torch.Tensor):
                out[node.target] = value
    return out
