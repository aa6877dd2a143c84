"""Collectives of data-parallel DP-SGD, and FSDP2 (`torch.distributed.fsdp.fully_shard`) under bkfx.

DP-SGD needs only `Σ_i C_i G_i` over all samples of the logical batch, so data parallelism is a
sum over ranks of each rank's clipped sum: `all_reduce_sum_` for replicated parameters,
`reduce_scatter_sum_` for sharded ones (each rank receives the sum of its own shard). Per-sample
norms never cross ranks: a sample's activations and output gradients live on its rank.

FSDP2. `fully_shard` the model (its layers, then the root, as usual), then `bkfx.compile` it. FSDP's
own forward and backward hooks cannot drive a compiled model: the rewritten graph is flat (it calls
no submodule, so no pre-forward hook would all-gather a layer), and bkfx's sites detach the
parameters, so FSDP's post-backward reduce-scatter would find no gradient. It could not use one
either: a clipped sum exists only once the clip factors are known, which needs every parameter's
per-sample norm (all-layer clipping: after the last site's backward), long after FSDP would have
reduced and resharded the first layers. So `FSDPShards` drives FSDP through its public module API:

- the first forward call of a logical batch all-gathers every FSDP module (`unshard()`), so the
  graph runs on, and the ledger records and clips over, the UNSHARDED parameters; their per-sample
  norms are those of one process (the graph is captured in that state, FSDP's hooks turned off);
- backward writes the full clipped sum into each unsharded parameter's `.grad` (and further
  physical batches of the same logical batch add to it);
- `DPOptimizer.step()` adds the noise (rank 0, to its full sums, as for replicated parameters),
  reduce-scatters the sums to the shards (`sharded.grad`, a DTensor like FSDP's), divides by the
  global expected batch size, reshards every module (`reshard()`, freeing the unsharded
  parameters), and steps the optimizer on the sharded parameters.

So the parameters are sharded at rest and the optimizer state is sharded always; from the first
forward of a logical batch to its step every rank holds the unsharded parameters and their clipped
sums (FSDP's per-layer resharding during forward and backward is not used). The collectives of a
step are the all-gathers (in the first forward, or in `step()` on a rank that ran none) and then
the reduce-scatters, in the same order on every rank; a rank may run any number of forward and
backward calls per step, an empty batch included.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from bkfx._torch import fsdp_forward_hooks_quiet, reduce_scatter_sum
from bkfx.errors import BkfxError

__all__ = ["ALLREDUCE_BUCKET", "all_reduce_sum_", "reduce_scatter_sum_", "FSDPShards", "fsdp_modules",
    "check_not_sharded_after_compile"]

ALLREDUCE_BUCKET = 1 << 24  # entries per flattened all-reduce (or reduce-scatter) of clipped sums


def all_reduce_sum_(tensors: list[torch.Tensor], group) -> None:
    """Sum each tensor over `group`'s ranks, in place: the tensors of one device and dtype are
    flattened into buckets of at most `ALLREDUCE_BUCKET` entries (a tensor larger than that is its
    own bucket), one all-reduce each, in the same order on every rank."""
    for bucket in _buckets(tensors, lambda t: t.numel()):
        if len(bucket) == 1:
            dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM, group=group)
            continue
        flat = torch.cat([t.view(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in bucket:
            t.view(-1).copy_(flat[offset:offset + t.numel()])
            offset += t.numel()


def reduce_scatter_sum_(pairs: list[tuple[torch.Tensor, torch.Tensor]], group) -> None:
    """`shard ← (Σ_ranks full)[this rank's rows]` for each `(full, shard)`: `full` is a whole
    tensor, sharded along dim 0 the way DTensor's `Shard(0)` (FSDP2's layout) is: rank r holds
    rows `[r c, (r+1) c)` of it, `c = ceil(rows / W)` (a shard may be short or empty). Buckets as
    `all_reduce_sum_`; each is one reduce-scatter (`bkfx._torch.reduce_scatter_sum`) of a
    `[W, Σ c_k n_k]` buffer whose row r holds rank r's rows of every tensor (zero-padded to c_k rows
    of n_k entries)."""
    world = dist.get_world_size(group)

    def chunk(full):  # (rows per rank, entries per row)
        rows = full.shape[0]
        return -(-rows // world), full.numel() // rows if rows else 0

    for bucket in _buckets(pairs, lambda pair: math.prod(chunk(pair[0])) * world):
        sizes = [math.prod(chunk(full)) for full, _ in bucket]
        flat = bucket[0][0].new_zeros(world, sum(sizes))
        offset = 0
        for (full, _), size in zip(bucket, sizes):
            c, _ = chunk(full)
            for r in range(world):
                part = full[r * c:(r + 1) * c].reshape(-1)
                flat[r, offset:offset + part.numel()].copy_(part)
            offset += size
        out = flat.new_empty(sum(sizes))
        reduce_scatter_sum(out, flat.view(-1), group)
        offset = 0
        for (full, shard), size in zip(bucket, sizes):
            shard.view(-1).copy_(out[offset:offset + shard.numel()])
            offset += size


def _buckets(items: list, size_of) -> list[list]:
    """`items` (tensors, or pairs whose first is a tensor) grouped by device and dtype into runs
    of at most `ALLREDUCE_BUCKET` entries, in a fixed order (the same on every rank)."""
    lists: dict[tuple, list[list]] = {}
    filled: dict[tuple, int] = {}
    for item in items:
        t = item[0] if isinstance(item, tuple) else item
        key = (str(t.device), t.dtype)
        runs = lists.setdefault(key, [[]])
        if runs[-1] and filled[key] + size_of(item) > ALLREDUCE_BUCKET:
            runs.append([])
            filled[key] = 0
        runs[-1].append(item)
        filled[key] = filled.get(key, 0) + size_of(item)
    return [run for key in sorted(lists, key=str) for run in lists[key]]


class FSDPShards:
    """The FSDP2 modules of a compiled model and its parameters in both states: `sharded` (the
    DTensor parameters FSDP registers at rest, which the optimizer steps) and `unsharded` (the
    plain parameters its all-gather fills, which the graph runs on and the ledger writes clipped
    sums to). See the module's docstring for the protocol."""

    def __init__(self, model: torch.nn.Module, modules: list):
        from torch.distributed.tensor import DTensor, Shard

        self.model = model
        self.modules = modules
        for m in modules:
            m.reshard()  # at rest; the names below are the sharded parameters'
        self.sharded = {n: p for n, p in model.named_parameters() if isinstance(p, DTensor)}
        for name, p in self.sharded.items():
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise BkfxError(
                    f"parameter {name} is sharded as {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; bkfx "
                    "supports FSDP2's default layout only, Shard(0) on a 1-D mesh (HSDP and tensor parallelism are "
                    "not supported: a split layer's per-sample norms would be partial sums). Call fully_shard with "
                    "mesh=init_device_mesh(device, (world_size,))"
                )
        self.unsharded: dict[str, torch.nn.Parameter] = {}
        self.is_unsharded = False

    @staticmethod
    def of(model: torch.nn.Module) -> "FSDPShards | None":
        """The shards of a `fully_shard`ed model, or None for a model without FSDP modules."""
        modules = fsdp_modules(model)
        return FSDPShards(model, modules) if modules else None

    @property
    def group(self):
        """The process group the parameters are sharded over (the mesh's)."""
        return next(iter(self.sharded.values())).device_mesh.get_group()

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def unshard(self) -> None:
        """All-gather every FSDP module's parameters (a collective; once per logical batch)."""
        if self.is_unsharded:
            return
        handles = [m.unshard(async_op=True) for m in self.modules]
        for handle in handles:
            handle.wait()
        self.unsharded = {n: p for n, p in self.model.named_parameters() if n in self.sharded}
        self.is_unsharded = True

    def reshard(self) -> None:
        """Free the unsharded parameters (and any clipped sums they hold); register the shards."""
        for p in self.unsharded.values():
            p.grad = None
        for m in self.modules:
            m.reshard()
        self.unsharded = {}
        self.is_unsharded = False

    @contextlib.contextmanager
    def capturing(self):
        """FSDP's forward hooks turned off while torch.export traces the (unsharded) model: its
        post-forward hook would reshard, freeing the parameters the trace just read. FSDP's own
        switch for this is the pre-backward state, in which its forward hooks only cast inputs
        (activation checkpointing's recomputation)."""
        with fsdp_forward_hooks_quiet(self.modules):
            yield

    def name_of(self, param) -> str | None:
        """The name of a sharded parameter, or None."""
        return next((n for n, p in self.sharded.items() if p is param), None)

    def full_grad(self, name: str) -> torch.Tensor:
        """The clipped sum of parameter `name` on this rank, whole (zeros when its backward wrote
        none: an empty batch, no forward call): the unsharded parameter's contiguous `.grad`."""
        self.unshard()  # a rank that ran no forward joins the all-gathers the others ran in theirs
        p = self.unsharded[name]
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        return p.grad

    def reduce_scatter_(self, names: list[str]) -> list[torch.Tensor]:
        """Sum the full clipped sums of `names` over the ranks into the shards: each sharded
        parameter's `.grad` becomes (or adds) its rows of the sum, a DTensor laid out like the
        parameter. Returns the local shards of those gradients (to divide in place)."""
        from torch.distributed.tensor import DTensor

        pairs, locals_ = [], []
        for name in names:
            full, sharded = self.full_grad(name), self.sharded[name]
            local = torch.empty_like(sharded.to_local(), dtype=full.dtype)
            pairs.append((full, local))
        reduce_scatter_sum_(pairs, self.group)
        for name, (_, local) in zip(names, pairs):
            sharded = self.sharded[name]
            local = local.to(sharded.dtype)
            if sharded.grad is not None:
                sharded.grad.to_local().add_(local)
                local = sharded.grad.to_local()
            else:
                sharded.grad = DTensor.from_local(local, sharded.device_mesh, sharded.placements,
                                                  shape=sharded.shape, stride=sharded.stride())
            locals_.append(local)
        return locals_


def fsdp_modules(model: torch.nn.Module) -> list:
    """The modules of `model` that `fully_shard` was applied to, in `modules()` order."""
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def check_not_sharded_after_compile(dp_model) -> None:
    """Refuse `fully_shard` applied to a compiled model, or to its module after compile: the
    compiled model must know the shards from the start (it drives FSDP itself)."""
    if dp_model.shards is None and (fsdp_modules(dp_model)):
        raise BkfxError(
            "fully_shard was applied after bkfx.compile (to the compiled model or its module); bkfx drives FSDP2 "
            "itself (all-gather before the forward, reduce-scatter of the clipped sums in DPOptimizer.step), so it "
            "must see the shards when it compiles. fully_shard the plain model first (its layers, then the root), "
            "then call bkfx.compile on it"
        )
