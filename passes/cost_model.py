"""cost_model: ghost or explicit norm per site, the fastest plan within a memory budget.

Each rule states, for its factored operands, the work (multiply-adds) and size (elements)
of both norm modes beyond the non-private weight gradient (`PieceSpec`: dense ghost
`B T² (m+n+1)` work and `2 B T²` Gram entries; explicit `2 B m n` work and `B m n` entries
of per-sample gradients). This pass turns them into estimated seconds on the device,

    t_ghost    = W_ghost / (F · g)                     + 3 · M_ghost · s / BW
    t_explicit = W_explicit / F + h · B·m·n / F        + 3 · M_explicit · s / BW

with F the device's matmul rate (multiply-adds/s, times `low_precision_speedup` under
bf16/fp16 autocast), BW its memory bandwidth, s the compute dtype's bytes, g the efficiency
of the ghost norm's batched T×T Gram matmuls relative to large matmuls, 3 passes over what a
mode materialises (written, read for the norm, read again for the Gram product or the
clipped sum), and `h · B·m·n / F` the price of B per-sample matmuls of T rows instead of one
weight-gradient matmul of B·T rows: at efficiency `T / (T + h)` the extra work is
`(h / T) · B·T·m·n` (none for a one-hot factor: its per-sample gradient is a scatter either way).

Memory: explicit per-sample gradients stay alive until the clip factors are known (all-layer
clipping: the end of backward), so they add up over sites: `B · Σ m n · s_param`; the ghost
norm's Grams live one site at a time and are not budgeted. The budget covers the step: the
activations (`A` bytes per sample, the batched values of the captured graph, views excluded:
an over-estimate, as not all are saved for backward) plus the per-sample gradients, so at
batch B the explicit sites may hold `budget - B·A`. Default budget: 90% of the free memory of
a CUDA device (`torch.cuda.mem_get_info`) or 50% of the available RAM (`MemAvailable`); set
in bytes with `bkfx.compile(..., memory_budget=)`.

The choice: a site is ghost when ghost is estimated no slower. The others are candidates for
explicit, taken greedily by seconds saved per byte: the k-th candidate is explicit while
`B · (A + F0 + Σ_{j<=k} m_j n_j s) <= budget` (F0: the per-sample gradients of explicit-rule
sites, which have no choice), i.e. up to a batch size `explicit_up_to` it records on the site,
and ghost above it, so one capture serves every batch size within the budget. Both the times
and the bytes are linear in B, so the order does not depend on the batch. A decision that
depends on a dynamic size other than the batch becomes a run-time guard (ghost iff ghost is
no slower at the actual sizes; not budgeted). `norm_mode` ("ghost" / "explicit", or a dict from
site node name or parameter name to a mode) overrides the choice.

The device constants are a table (`DEVICES`), not a calibration: round figures of an H100
(fp32 with TF32 off; shared/GPU.md's profile: the blocked Grams ran at about a third of a large
matmul's rate) and of the 2-core CPU the CPU benchmarks run on (fresh per-sample gradients
are written at ~3 GB/s there, page faults included).
"""
from __future__ import annotations

import os

import sympy
import torch
from torch.fx import GraphModule

from bkfx._ir.meta import META_BATCH, META_BUDGET, META_SITES
from bkfx._ir.plan import (
    EXPLICIT_RULE,
    FALLBACK,
    GHOST_FASTER,
    GUARD,
    OVER_BUDGET,
    USER_OVERRIDE,
    WITHIN_BUDGET,
    Budget,
    DeviceCosts,
    Site,
)

__all__ = ["MODES", "DEVICES", "BUDGET_FRACTION", "PASSES", "cost_model", "mode_times", "make_budget",
    "activation_bytes", "free_memory"]

MODES = ("auto", "ghost", "explicit")

DEVICES = {
    "cuda": DeviceCosts("cuda", macs_per_s=25e12, low_precision_speedup=10.0, bytes_per_s=2.5e12,
                        gram_efficiency=0.3, rows_half=16),
    "cpu": DeviceCosts("cpu", macs_per_s=50e9, low_precision_speedup=1.0, bytes_per_s=3e9,
                       gram_efficiency=0.6, rows_half=32),
}
BUDGET_FRACTION = {"cuda": 0.9, "cpu": 0.5}  # of the free memory when the model is captured
PASSES = 3  # over a materialised Gram or per-sample gradient: written, read for the norm, read again


def cost_model(gm: GraphModule, norm_mode="auto", memory_budget: int | float | None = None) -> GraphModule:
    """Decide every site's norm mode (see the module docstring); the budget goes to `gm.meta[META_BUDGET]`."""
    batch = gm.meta[META_BATCH]
    sites = gm.meta[META_SITES]
    itemsize = {n: p.element_size() for n, p in gm.named_parameters()}
    budget = make_budget(gm, batch, sites, itemsize, memory_budget)
    gm.meta[META_BUDGET] = budget
    candidates = []
    for site in sites:
        if _decide(site, batch, norm_mode, budget.costs, getattr(torch, budget.compute_dtype), itemsize):
            candidates.append(site)
    _fit(candidates, batch, budget)
    return gm


def mode_times(spec, rule, batch, costs: DeviceCosts, dtype: torch.dtype) -> tuple[sympy.Expr, sympy.Expr]:
    """Estimated extra seconds `(t_ghost, t_explicit)` of one factored operand supplied by `rule`."""
    rate = costs.macs_per_s * (costs.low_precision_speedup if dtype in (torch.bfloat16, torch.float16) else 1.0)
    traffic = PASSES * dtype.itemsize / costs.bytes_per_s
    ghost = spec.time_ghost / (rate * costs.gram_efficiency) + traffic * spec.mem_ghost
    per_sample_matmuls = 0 if rule.one_hot_left else costs.rows_half * batch * spec.m * spec.n / rate
    explicit = spec.time_explicit / rate + per_sample_matmuls + traffic * spec.mem_explicit
    return ghost, explicit


def _override(site: Site, norm_mode) -> str | None:
    if isinstance(norm_mode, str):
        return None if norm_mode == "auto" else norm_mode
    for key in (site.node, *site.params):
        if key in norm_mode:
            return norm_mode[key]
    return None


def _decide(site: Site, batch: sympy.Symbol, norm_mode, costs: DeviceCosts, dtype: torch.dtype,
            itemsize: dict | None = None) -> bool:
    """The site's mode when it does not depend on the budget; True when the site is a candidate
    for explicit (estimated faster), which `_fit` decides against the budget."""
    factored = [o for o in site.operands if o.spec.kind == "factored"]
    if not factored:
        fallback = any(o.rule.fallback for o in site.operands)
        site.mode, site.decided_by = "explicit", FALLBACK if fallback else EXPLICIT_RULE
        site.reason = "fallback (vmap of vjp)" if fallback else EXPLICIT_RULE
        return False
    times = [mode_times(o.spec, o.rule, batch, costs, dtype) for o in factored]
    site.time_ghost_s = sum(t for t, _ in times)
    site.time_explicit_s = sum(t for _, t in times)
    site.bytes_explicit = sum(o.spec.mem_explicit * _itemsize(o, itemsize) for o in factored)
    forced = _override(site, norm_mode)
    if forced is not None:
        if forced not in ("ghost", "explicit"):
            raise ValueError(f"norm_mode for site {site.node} must be 'ghost' or 'explicit', got {forced!r}")
        site.mode, site.decided_by, site.reason = forced, USER_OVERRIDE, USER_OVERRIDE
        return False
    saving = sympy.simplify((site.time_ghost_s - site.time_explicit_s) / batch)  # seconds per sample
    if saving.free_symbols:
        site.mode, site.guard, site.decided_by = "guard", -saving, GUARD
        site.reason = f"run-time guard: ghost iff {-saving} >= 0"
        return False
    if saving <= 0:
        site.mode, site.decided_by, site.reason = "ghost", GHOST_FASTER, GHOST_FASTER
        return False
    return True


def _fit(candidates: list[Site], batch, budget: Budget) -> None:
    """Greedy by seconds saved per byte: each candidate is explicit up to the batch size at which
    the per-sample gradients of it and of the candidates before it fill the budget."""

    def per_sample(site, expr):
        return float(sympy.simplify(expr / batch))

    ranked = sorted(candidates, key=lambda s: -per_sample(s, s.time_ghost_s - s.time_explicit_s)
                    / max(per_sample(s, s.bytes_explicit), 1.0))
    held = budget.activation_bytes + budget.fixed_bytes  # per sample
    for site in ranked:
        held += per_sample(site, site.bytes_explicit)
        site.explicit_up_to = min(int(budget.total // held), 2**31 - 1) if held > 0 else 2**31 - 1
        if site.explicit_up_to >= 1:
            site.mode, site.decided_by, site.reason = "explicit", WITHIN_BUDGET, WITHIN_BUDGET
        else:
            site.mode, site.decided_by, site.reason = "ghost", OVER_BUDGET, OVER_BUDGET


def _itemsize(operand, itemsize: dict | None) -> int:
    """Bytes per element of an operand's per-sample gradients: its parameters' dtype (fp32 if unknown)."""
    return max((itemsize or {}).get(n, 4) for n in operand.params) if operand.params else 4


def make_budget(gm: GraphModule, batch, sites: list[Site], itemsize: dict, memory_budget=None) -> Budget:
    """The device, its cost constants, the compute dtype (autocast's when active) and the budget."""
    tensors = [*gm.parameters(), *gm.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    kind = "cuda" if device.type == "cuda" else "cpu"
    dtype = tensors[0].dtype if tensors and tensors[0].is_floating_point() else torch.float32
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    if memory_budget is not None:
        if not memory_budget > 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
        total, source = int(memory_budget), "memory_budget="
    else:
        free, where = free_memory(device)
        total = int(BUDGET_FRACTION[kind] * free)
        source = f"{100 * BUDGET_FRACTION[kind]:.0f}% of {where} {free / 2**30:.1f} GiB"
    fixed = 0.0
    for site in sites:
        for o in site.operands:
            if o.spec is not None and o.spec.kind == "explicit":
                per = sympy.simplify(o.spec.mem_explicit / batch)
                fixed += float(per) * _itemsize(o, itemsize) if per.is_number else 0.0
    return Budget(kind if device.index is None else f"{kind}:{device.index}", DEVICES[kind], str(dtype).replace("torch.", ""),
                  total, source, activation_bytes(gm, batch), int(fixed))


def activation_bytes(gm: GraphModule, batch) -> int:
    """Bytes per sample of the captured graph's batched values (views excluded): what the step's
    activations may take, an over-estimate (not all are saved for backward)."""
    total = 0.0
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "is_view", False):
            continue
        vals = node.meta.get("val")
        for val in vals if isinstance(vals, (list, tuple)) else (vals,):
            if not isinstance(val, torch.Tensor):
                continue
            numel = sympy.Integer(1)
            for d in val.shape:
                numel *= d.node.expr if isinstance(d, torch.SymInt) else int(d)
            per = sympy.simplify(numel / batch)
            if batch in sympy.sympify(numel).free_symbols and not per.free_symbols:
                total += float(per) * val.element_size()
    return int(total)


def free_memory(device: torch.device) -> tuple[int, str]:
    """Free bytes of the device now, and what they are."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, "free CUDA memory"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30, "assumed RAM"
