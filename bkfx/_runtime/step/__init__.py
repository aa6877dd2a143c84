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

The modules, by stage: `trace` (stages 1 and 2, and `build`, which runs stages 1 to 3 for a call),
`kernels` (what stage 1 traces with: batching rules that keep the batch size symbolic, inductor's
decompositions), `program` (stage 3: `StepOptions`, `Program`), `cudagraphs` (stages 3 and 4 with
`mode="reduce-overhead"`: the programs as CUDA graphs), `autograd` (stage 4: `_Step`, `run`,
`eager_reason`, `StepRecord`). The names `bkfx.dpmodel` uses are here.
"""
from __future__ import annotations

from bkfx._runtime.step.autograd import StepRecord, eager_reason, run
from bkfx._runtime.step.program import Program, StepOptions
from bkfx._runtime.step.trace import build

__all__ = ["Program", "StepOptions", "StepRecord", "build", "eager_reason", "run"]
