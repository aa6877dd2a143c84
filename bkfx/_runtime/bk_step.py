"""The compiled BK step: one capture's forward and BK backward as two compiled programs.

The eager path (`bkfx._runtime.ops` taps, `bkfx._runtime.ledger` tapes) is the reference and the fallback:
it runs Python per site during the backward pass. The compiled path runs that same code
once, as a trace, and compiles what it did:

1. **Joint trace.** `make_fx` traces `joint(primals, tangents)`: the rewritten GraphModule
   on the parameters, buffers and inputs, then `torch.autograd.backward(outputs, tangents)`,
   which runs every site's tap and the ledger (per-sample norms, clip factors, book-kept
   clipped sums written to `.grad` of the traced parameter leaves). The result is one flat
   ATen graph of the whole step; its outputs are the model's outputs, the clipped sums, the
   input gradients and the per-sample norms. It is then functionalised (the ledger's
   in-place `add_`/`index_add_` become pure ops). The clipping thresholds are inputs (0-dim
   tensors, `DPModel.threshold_tensors`), so a new R runs the same programs. Only the batch size is symbolic (one
   symbol for every batched input); every other size is the capture's. The guards the trace
   put on the batch size (a site explicit up to some batch, ghost above) are kept and
   checked on every call: a batch size they do not admit gets a trace of its own.
2. **Partition.** AOTAutograd's min-cut partitioner splits the joint graph into a forward
   program (outputs, and the values the backward needs) and a backward program (those
   values and the output gradients → clipped sums, input gradients, norms).
3. **Compile.** Each program goes through `torch.compile` with a dynamic batch size
   (inductor by default; `DPModel.compile(backend=, mode=, options=)` chooses, and
   `mode="reduce-overhead"` gives CUDA graphs): one compilation serves every batch size.
4. **Run.** `_Step`, an autograd Function, runs the forward program and saves its values;
   its backward runs the backward program, adds the clipped sums to the parameters' `.grad`
   as the eager ledger does, with the receipts `DPOptimizer.step()` checks (`bkfx._runtime.receipts`),
   and returns the inputs' gradients (gradient accumulation works as it does eagerly).

What stays eager (`eager_reason`): calls under `torch.no_grad()`, batch sizes 0 and 1 (the trace
specialises them), a GradScaler's loss scale, FSDP2-sharded parameters and user-level batches
(a user's rows clipped as one). Forward calls joined before one backward (two views of the same
samples) cannot be clipped together by separate compiled steps: their backward is refused
with what to do instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass, field

import sympy
import torch
from bkfx._torch import (FakeTensorMode, enable_python_dispatcher, foreach_copy_, inductor, inductor_decompositions,
                         min_cut_rematerialization_partition, pytree)
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from bkfx.errors import BkfxError
from bkfx._runtime.ledger import Tape, _keeping_graph, recording
from bkfx._ir.node import attribute
from bkfx._runtime.receipts import add_clipped_sum


@dataclass(frozen=True)
class StepOptions:
    """How the step's two programs are compiled: `torch.compile`'s backend, mode and options."""

    backend: object = "inductor"
    mode: str | None = None
    options: tuple = ()  # sorted (key, value) pairs of torch.compile's options=

    @property
    def cuda_graphs(self) -> bool:
        """`mode="reduce-overhead"` (or "max-autotune"): replay the programs as CUDA graphs. bkfx
        captures them itself (`CudaGraphs`), one pair per batch size, since the two programs
        are compiled apart and inductor's CUDA graph trees pair only the programs AOTAutograd
        compiles together."""
        return self.mode in ("reduce-overhead", "max-autotune") or dict(self.options).get("triton.cudagraphs", False)

    def compile(self, gm: torch.fx.GraphModule, example_inputs: list):
        """`gm` (a flat ATen graph) compiled for `example_inputs` (fake, with the symbolic batch
        size): inductor directly (the graph is already what dynamo and AOTAutograd would hand it),
        the graph itself for "eager"/"aot_eager", a backend callable as dynamo would call it."""
        if self.backend in ("eager", "aot_eager"):
            return gm
        if self.backend == "inductor":
            compile_fx, list_mode_options, inductor_config = inductor()

            config = {**(list_mode_options(self.mode) if self.mode else {}), **dict(self.options)}
            config["triton.cudagraphs"] = False  # bkfx's own CUDA graphs (`cuda_graphs`)
            with inductor_config.patch(config):
                return compile_fx(gm, example_inputs)
        if callable(self.backend):
            return self.backend(gm, example_inputs)
        raise BkfxError(
            f"DPModel.compile(backend={self.backend!r}): the compiled BK step takes backend='inductor', 'aot_eager', "
            "'eager' or a backend callable (gm, example_inputs) -> callable"
        )


@dataclass
class Program:
    """One trace of the step, compiled: its forward and backward programs and their layout."""

    forward: object
    backward: object
    forward_graph: torch.fx.GraphModule
    backward_graph: torch.fx.GraphModule
    guards: list  # sympy conditions on `batch` that the trace assumed
    batch: sympy.Symbol
    n_outputs: int  # the model's tensor outputs: the first outputs of `forward`
    out_spec: object
    out_constants: dict  # flat output position -> a non-tensor output
    differentiable: list[int]  # the tensor outputs that take a gradient
    grad_primals: list[int]  # the primals (parameters, then inputs) the backward returns gradients for
    norms: list  # what follows the gradients: "total", then group indices
    n_primals: int
    state: list  # the parameters and buffers, in primal order (the guard recaptures if any is replaced)
    saved_order: list[int]  # the backward's inputs (before the tangents) as positions in the forward's saved values
    tangents: list[int] = field(default_factory=list)  # the backward's tangent inputs, as tensor output positions
    graphs: "CudaGraphs | None" = None  # mode="reduce-overhead" on CUDA: the programs replayed as CUDA graphs
    traced_at: int = 0  # the batch size the trace was made at (its guards hold there by construction)
    threshold_device: object = None  # where the thresholds, the programs' last inputs (but the mask), live
    masked: bool = False  # the programs take a padding mask as their last input
    _admits: dict = field(default_factory=dict)

    def admits(self, batch: int) -> bool:
        """Whether the trace's assumptions about the batch size hold at `batch`."""
        hit = self._admits.get(batch)
        if hit is None:
            hit = self._admits[batch] = batch == self.traced_at or batch >= 2 and all(
                g.subs(self.batch, batch) is sympy.true for g in self.guards)  # undecidable: not admitted
        return hit


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


def build(dp_model, compiled, args, kwargs, batched, options: StepOptions) -> Program:
    """Trace one BK step of the capture `compiled` on these inputs, partition it, compile it."""
    gm = compiled.graph_module
    flat, in_spec = pytree.tree_flatten((args, kwargs))
    dims = {id(t): d for t, d in batched}
    state = {**dict(gm.named_parameters()), **dict(gm.named_buffers()), **_constants(gm)}
    names = list(state)
    model_name = {id(p): n for n, p in dp_model._params.items()}  # the ledger's names are the model's
    trainable = {n for n in names if id(state[n]) in model_name}
    positions = [k for k, v in enumerate(flat) if isinstance(v, torch.Tensor)]
    wants_grad = [flat[k].requires_grad and flat[k].is_floating_point() for k in positions]
    # the batch size is read off one batched input: its position among the tensor inputs and its batch dimension
    first_batched = next(j for j, k in enumerate(positions) if id(flat[k]) in dims)
    first_dim = dims[id(flat[positions[first_batched]])]

    shape_env = ShapeEnv()
    fake_mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)  # the capture's tensor constants

    def fake(t: torch.Tensor, dim):
        # DUCK: one symbol for the batch dimension of every batched input (a symbol each would leave
        # guards such as Eq(s1, s0) that no batch size can decide, and every call would trace anew)
        sizes = [DimDynamic.DUCK if k == dim else DimDynamic.STATIC for k in range(t.dim())]
        return fake_mode.from_tensor(t.detach(), symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    # the clipping thresholds are the last primals, 0-dim tensors read at run time: a new R (adaptive
    # clipping) runs the same programs
    thresholds = dp_model.threshold_tensors(_device_of(state, flat, positions))
    mask = dp_model._call_mask  # padding rows (`bkfx.training.data.Padding`): an input of the batch's size, after R
    primals = [fake(state[n], None) for n in names] + [fake(flat[k], dims.get(id(flat[k]))) for k in positions] + \
        [fake(t, None) for t in thresholds] + ([fake(mask, 0)] if mask is not None else [])
    n_state, n_inputs, n_thresholds = len(names), len(positions), len(thresholds)
    batch_symbol = primals[n_state + first_batched].shape[first_dim].node.expr
    layout: dict = {}

    def call(values_state, inputs):
        values = list(flat)
        for k, x in zip(positions, inputs):
            values[k] = x
        call_args, call_kwargs = pytree.tree_unflatten(values, in_spec)
        return torch.func.functional_call(gm, dict(zip(names, values_state)), call_args, call_kwargs, strict=False)

    def joint(primals, tangents):
        leaves = [p.detach().requires_grad_() if n in trainable else p for n, p in zip(names, primals[:n_state])]
        inputs = [x.detach().requires_grad_() if w else x for x, w in zip(primals[n_state:n_state + n_inputs], wants_grad)]
        params = {model_name[id(state[n])]: leaf for n, leaf in zip(names, leaves) if n in trainable}
        batch = inputs[first_batched].shape[first_dim]
        config = dataclasses.replace(dp_model._clip, thresholds=list(primals[n_state + n_inputs:][:n_thresholds]))
        tape = Tape(compiled.sites, params, config, batch, compiled.tied, traced=True,
                    mask=primals[-1] if mask is not None else None)
        with recording(tape):
            out = call(leaves, inputs)
        outs, out_spec = pytree.tree_flatten(out)
        tensors = [o for o in outs if isinstance(o, torch.Tensor)]
        differentiable = [k for k, o in enumerate(tensors) if o.requires_grad]
        if differentiable:
            torch.autograd.backward([tensors[k] for k in differentiable], [tangents[k] for k in differentiable])
        grads = [(j, leaf.grad) for j, leaf in enumerate(leaves + inputs) if isinstance(leaf, torch.Tensor)
                 and leaf.requires_grad and leaf.grad is not None]
        norms, keys = [], []
        if tape.per_sample_norms is not None:
            norms, keys = [tape.per_sample_norms], ["total"]
            for g, v in enumerate(tape.group_norms or []):
                if v is not None:
                    norms.append(v)
                    keys.append(g)
        layout.update(out_spec=out_spec, n_outputs=len(tensors), differentiable=differentiable, norms=keys,
                      out_constants={k: o for k, o in enumerate(outs) if not isinstance(o, torch.Tensor)},
                      grad_primals=[j for j, _ in grads])
        return [t.detach() for t in tensors] + [g for _, g in grads] + norms

    # the python dispatcher as in the trace below: composite ops (matmul) run their Python forms, which
    # keep the batch size symbolic (torch 2.11's C++ matmul reads a 3-d input's element count as an
    # integer when the other operand takes no gradient, as a site's detached weight)
    with enable_python_dispatcher(), fake_mode, torch.no_grad(), _symbolic_kernels():
        outs = [o for o in pytree.tree_leaves(call(primals[:n_state], primals[n_state:n_state + n_inputs]))
                if isinstance(o, torch.Tensor)]
        tangents = [torch.empty_like(o) if o.is_floating_point() else torch.empty_like(o, dtype=torch.float32) for o in outs]
    functional = None

    def joint_functional(primals, tangents):
        return functional(primals, tangents)

    # as AOTAutograd traces: factories (arange) fake too, symbolic sizes through composite ops
    with enable_python_dispatcher(), fake_mode, _symbolic_kernels():
        traced = make_fx(joint, decomposition_table=_decompositions())(primals, tangents)
        functional = torch.func.functionalize(traced, remove="mutations")
        joint_gm = make_fx(joint_functional, decomposition_table=_decompositions())(primals, tangents)
    _recompute_views_of_inputs(joint_gm)
    forward_graph, backward_graph = min_cut_rematerialization_partition(
        joint_gm, primals + tangents, num_fwd_outputs=layout["n_outputs"]
    )
    saved = [n.name for n in forward_graph.graph.find_nodes(op="output")[0].args[0][layout["n_outputs"]:]]
    taken = [n.name for n in backward_graph.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")]
    if sorted(saved) != sorted(taken):
        raise AssertionError(f"the partitioned programs disagree on the saved values: {saved} vs {taken}")
    guards = [g.expr for g in shape_env.guards]
    fake_inputs = [_in_mode(n.meta["val"], fake_mode) for n in backward_graph.graph.find_nodes(op="placeholder")]
    cuda = any(p.device.type == "cuda" for p in primals)
    program = Program(
        options.compile(forward_graph, primals), options.compile(backward_graph, fake_inputs), forward_graph, backward_graph,
        guards, batch_symbol, layout["n_outputs"], layout["out_spec"], layout["out_constants"],
        layout["differentiable"], layout["grad_primals"], layout["norms"], len(primals), [state[n] for n in names],
        [saved.index(name) for name in taken],
    )
    program.traced_at = int(flat[positions[first_batched]].shape[first_dim])
    program.threshold_device = thresholds[0].device if thresholds else torch.device("cpu")
    program.masked = mask is not None
    program.tangents = [int(n.name.rpartition("_")[2]) - 1 for n in backward_graph.graph.find_nodes(op="placeholder")
                        if n.name.startswith("tangents")]
    if options.cuda_graphs and cuda:
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


@contextlib.contextmanager
def _symbolic_kernels():
    """While bkfx traces: `vmap` batching rules that keep the batch size symbolic for the
    backward ops of indexing (`embedding_dense_backward`, `index_add`, `slice_backward`,
    `index_select`).

    The ledger pulls a site's per-sample pieces back through a general chain of parameter ops
    with `vmap` (`Ledger._to_params`: GPT-2's position embedding, a sliced or indexed
    parameter). torch's C++ batching rules of these backward ops read the batch size as an
    integer, so the trace would hold only for the batch size it was made at (one trace per batch
    size). These rules (registered for the `FuncTorchBatched` key during the trace only, as
    functorch registers its own Python decompositions) compute the same values from ops whose
    batching rules keep it symbolic: zeros and `index_put` (accumulating), `pad`, `index`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": for the trace only
        library = torch.library.Library("aten", "IMPL", "FuncTorchBatched")
        library.impl(torch.ops.aten.embedding_dense_backward.default, _embedding_dense_backward)
        library.impl(torch.ops.aten.index_add.default, _index_add)
        library.impl(torch.ops.aten.slice_backward.default, _slice_backward)
        library.impl(torch.ops.aten.index_select.default, _index_select)
    try:
        yield
    finally:
        library._destroy()  # torch's own kernels again


def _embedding_dense_backward(grad, indices, num_weights, padding_idx, scale_grad_by_freq):
    if scale_grad_by_freq:  # refused by bkfx's embedding rule; torch's own decomposition otherwise
        from bkfx._torch import decomposition_table

        return decomposition_table[torch.ops.aten.embedding_dense_backward.default](
            grad, indices, num_weights, padding_idx, scale_grad_by_freq)
    rows = grad.reshape(-1, grad.shape[-1])
    flat = indices.reshape(-1)
    if padding_idx >= 0:
        rows = rows * (flat != padding_idx).unsqueeze(-1).to(rows.dtype)
    return torch.ops.aten.index_put(_fresh_zeros(rows, [num_weights, grad.shape[-1]]), [flat], rows, True)


def _index_add(self, dim, index, source, alpha=1):
    dim = dim % max(self.dim(), 1)
    return torch.ops.aten.index_put(self + _fresh_zeros(source, self.shape), [None] * dim + [index.reshape(-1)],
                                    source * alpha if alpha != 1 else source, True)


def _slice_backward(grad, input_sizes, dim, start, end, step):
    dim = dim % len(input_sizes)
    size = input_sizes[dim]
    start, end = (0 if start is None else start), (size if end is None else end)
    start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
    start = max(0, min(start, size))
    end = max(start, min(end, size))
    if step != 1:
        index = torch.arange(start, end, step, device=grad.device)
        return torch.ops.aten.index_put(_fresh_zeros(grad, input_sizes), [None] * dim + [index], grad)
    # zeros on both sides of the slice: a pad of the batched gradient (`cat` with unbatched zeros
    # reads the batch size)
    return torch.nn.functional.pad(grad, [0, 0] * (len(input_sizes) - 1 - dim) + [start, size - end])


def _index_select(self, dim, index):
    dim = dim % max(self.dim(), 1)
    return torch.ops.aten.index(self, [None] * dim + [index.reshape(-1)])


def _fresh_zeros(like, sizes):
    """Zeros of one sample's `sizes` for every sample of `like`'s batch, each in memory of its own.

    Made from `like` (a batched tensor), not by a factory: `new_zeros` of a batched tensor reads
    its concrete batch size, and a factory's unbatched zeros would be expanded over the batch by
    `index_put`'s batching rule: one row of memory for every sample, which inductor's in-place
    accumulation then sums over the samples."""
    count = math.prod(sizes)
    if like.numel() == 0 or count == 0:
        return torch.zeros(sizes, dtype=like.dtype, device=like.device)
    seed = torch.zeros_like(like).reshape(-1)[:1]  # one zero per sample
    return torch.nn.functional.pad(seed, [0, count - 1]).reshape(sizes)


def _decompositions() -> dict:
    """The decompositions torch.compile traces with (inductor's table), so that the programs are
    the ATen graphs inductor expects. (Composite ops such as `matmul` run their Python forms,
    which keep the batch size symbolic, through the python dispatcher `build` enables, not
    through this table.)"""

    return inductor_decompositions()


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


class StepRecord:
    """What a compiled backward leaves for inspection: the eager tape's per-sample and group norms."""

    def __init__(self, program: Program, norms, groups: int):
        values = dict(zip(program.norms, [n.detach() for n in norms]))
        self.per_sample_norms = values.get("total")
        self.group_norms = [values.get(g) for g in range(groups)] if values else None
