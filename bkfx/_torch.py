"""The one door to torch's private APIs.

Every use bkfx makes of a private torch name (`torch._*`, `_`-prefixed modules, private
attributes of FSDP, GradScaler and autograd's engine) goes through this module, so that a
torch release that moves one breaks here, with a version gate and a message, not somewhere in
the runtime. Each entry says what bkfx needs it for and what breaks without it.

The supported range is `MIN_TORCH` up to the newest torch CI runs (see `.ci/run`); importing
bkfx with an older torch raises at once.
"""
from __future__ import annotations

import contextlib
import re

import torch

__all__ = ["TORCH_VERSION", "MIN_TORCH"]

MIN_TORCH = (2, 11)  # the oldest torch CI tests (.ci/run's second lane); pyproject.toml says the same


def _version(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


TORCH_VERSION = _version(torch.__version__)
if TORCH_VERSION < MIN_TORCH:
    raise ImportError(
        f"bkfx needs torch >= {'.'.join(map(str, MIN_TORCH))}, found {torch.__version__}: its capture relies on "
        "torch.export's training IR and its compiled step on AOTAutograd's partitioner as they are from that release on"
    )

# -- pytrees: flattening inputs and outputs of captured programs -----------------------------------
# torch.export's in/out specs are torch.utils._pytree TreeSpecs; without it bkfx cannot call a
# captured program with a user's nested arguments.
import torch.fx._pytree as fx_pytree  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402


def exported_in_spec(gm):
    """The input TreeSpec torch.export's unlifted GraphModule keeps (its private `_in_spec`), or None:
    the probe calls the captured program with a user's nested arguments flattened by it."""
    return getattr(gm, "_in_spec", None)

# -- fake tensors: the compiled step and the torch.compile operator run bkfx's code on shapes only --
# -- the compiled BK step (bkfx's own AOTAutograd-like pipeline) ------------------------------------
# The python dispatcher keeps linear/matmul symbolic in a dynamic-batch trace; the partitioner
# splits the joint forward+backward trace; the decomposition tables are inductor's.
from torch._decomp import decomposition_table  # noqa: E402
from torch._dispatch.python import enable_python_dispatcher  # noqa: E402
from torch._functorch.partitioners import min_cut_rematerialization_partition  # noqa: E402
from torch._guards import detect_fake_mode  # noqa: E402

# -- torch's op objects (graph drawing names ATen overloads) ---------------------------------------
from torch._ops import OpOverload, OpOverloadPacket  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake  # noqa: E402


def is_view(t: torch.Tensor) -> bool:
    """Whether `t` is a view (shares its base's version counter): the receipts give a view's memory
    a counter of its own."""
    return t._is_view()


def global_module_hooks() -> dict:
    """The namespace holding torch's global module hook dicts (`_global_*`), which the guards read."""
    return vars(torch.nn.modules.module)

# -- foreach kernels: one launch for a list of tensors (noise, clipped-sum copies) ------------------
foreach_add_ = torch._foreach_add_
foreach_div_ = torch._foreach_div_
foreach_copy_ = torch._foreach_copy_


def inductor():
    """Inductor's `compile_fx`, `list_mode_options` and `config` (imported on use: importing
    inductor costs about a second)."""
    import torch._inductor.config as config
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx, list_mode_options, config


def inductor_decompositions() -> dict:
    """Inductor's decomposition table, which the compiled step's trace applies."""
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


# -- DataLoader: pinning a batch that travels wrapped (a padded batch and its real-row count) --------
def pin_batch(batch, device=None):
    """The DataLoader's own pinning of a nested batch (`torch.utils.data._utils.pin_memory`)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    return pin_memory(batch, device)


# -- autograd's engine: the ledger finalises at the end of the backward pass -----------------------
def queue_end_of_backward(callback) -> None:
    """Run `callback` when the running backward pass ends (autograd's engine's callback queue):
    without it the ledger could not clip once every site has reported, whichever outputs and
    branches the backward pass reached."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def keeping_graph() -> bool:
    """Whether the running backward pass was asked to keep its graph (retain_graph=True); True where
    torch cannot tell (the ledger then keeps what a second backward would need)."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else keep()


# -- dynamo: bkfx's forward as one opaque operator under torch.compile ------------------------------
def assume_constant_result(fn):
    """dynamo keeps `fn`'s result as a constant of its graph (the operator's call-site ids)."""
    return torch._dynamo.assume_constant_result(fn)


_TOP_LEVEL_KEYS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


@contextlib.contextmanager
def top_level_dispatch():
    """The dispatcher's thread-local state as at import (user code's: autograd on, no
    AOTAutograd or fake mode active): the operator's implementation runs below autograd, while the
    DP model's own forward and backward need it as a user's code has it."""
    from torch.utils._python_dispatch import _disable_current_modes

    with torch._C._ForceDispatchKeyGuard(*_TOP_LEVEL_KEYS), _disable_current_modes():
        yield


def compiling_for_cuda_graphs() -> bool:
    """Whether the torch.compile tracing now running was asked for CUDA graphs: inductor's patched
    options while AOTAutograd traces, dynamo's backend's options while dynamo traces."""
    import torch._inductor.config as config

    if config.triton.cudagraphs:
        return True
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        options = getattr(InstructionTranslator.current_tx().output.compiler_fn, "config", None) or {}
    except (ImportError, AttributeError, AssertionError):  # not under dynamo, or a dynamo keeping it elsewhere
        return False
    return bool(options.get("triton.cudagraphs"))


# -- GradScaler: whether this optimizer's gradients were unscaled already ---------------------------
def grad_scaler_unscaled(scaler, optimizer) -> bool:
    """Whether `scaler.unscale_(optimizer)` ran for this step (GradScaler's per-optimizer stage):
    DPOptimizer refuses an unscale before the logical batch is complete."""
    from torch.amp.grad_scaler import OptState

    return scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED


# -- collectives: one reduce-scatter of a flat buffer (FSDP2's clipped sums to their shards) ---------
def reduce_scatter_sum(output: torch.Tensor, flat: torch.Tensor, group=None) -> None:
    """`output` = this rank's chunk of the sum of every rank's `flat`. torch 2.13 names it
    `reduce_scatter_single` and deprecates `reduce_scatter_tensor`, the only name 2.11 has."""
    import torch.distributed as dist

    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, flat, op=dist.ReduceOp.SUM, group=group)


# -- FSDP2: its forward hooks off while torch.export traces the unsharded model ---------------------
@contextlib.contextmanager
def fsdp_forward_hooks_quiet(modules):
    """FSDP2's modules in the pre-backward state, in which their forward hooks only cast inputs
    (activation checkpointing's recomputation): the post-forward hook would otherwise reshard,
    freeing the parameters the trace just read."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    states = [m._get_fsdp_state() for m in modules]
    saved = [s._training_state for s in states]
    for s in states:
        s._training_state = TrainingState.PRE_BACKWARD
    try:
        yield
    finally:
        for s, state in zip(states, saved):
            s._training_state = state
