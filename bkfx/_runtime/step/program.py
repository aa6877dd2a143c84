"""Stage 3 of the compiled BK step, compile: how the two programs are compiled (`StepOptions`) and
what one trace becomes (`Program`: the compiled programs, their layout, the guards on the batch size)."""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch

from bkfx._torch import inductor
from bkfx.errors import BkfxError


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
