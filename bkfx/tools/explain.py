"""The plan as a table a person reads (`explain`), and as records a program reads (`plan_records`).

One record per (site, parameter operand). Sizes and costs are sympy expressions in the
capture's symbolic batch size, written with the symbol `B`, and numbers at one batch
size (the capture's example batch unless another is given).

Costs, for an operand with `T` rows per sample, parameter matrix `p × d` (`m × n` in the
rule's `PieceSpec`):

- the *norm cost* is what the chosen mode spends on per-sample norms beyond the weight
  gradient, as the rule's `PieceSpec` states it: for dense factors ghost `B·T²·(p+d+1)`
  time (the Grams `L Lᵀ`, `R Rᵀ` and their inner product) and `2·B·T²` memory, explicit
  `2·B·p·d` time (each `L_iᵀ R_i` replacing the weight-gradient matmul, then its norm and
  the weighted sum) and `B·p·d` memory; each rule may state its own (an embedding's
  one-hot factor: ghost `B·T²·(d+2)`), and an explicit piece's time is its rule's work;
- the *non-private cost* is the standard weight gradient's work, which training without
  privacy pays too: `B·T·p·d` for a dense factored operand (`gᵀa`), `B·T·d` for a
  one-hot factor (a scatter-add of `T` rows), and the rule's own work for an explicit
  operand (the same per-position products, summed over the batch instead of kept per
  sample); its memory is the gradient itself, `p·d`.

The totals report the norm cost of the plan relative to the non-private cost:
`Σ norm time / Σ non-private time`, the price of per-sample clipping.

The cost model decides by estimated seconds on the device within a memory budget
(`passes.cost_model`): each factored site's estimated extra seconds in either mode, and
the bytes its explicit per-sample gradients would hold, are shown with the budget and the
batch size up to which a site stays explicit.
"""
from __future__ import annotations

import os

import sympy
import torch

from bkfx._ir.meta import META_BUDGET, META_PROBE
from bkfx._ir.node import original_op_name
from bkfx._ir.plan import EXPLICIT_RULE, FALLBACK, GUARD, OVER_BUDGET, USER_OVERRIDE, WITHIN_BUDGET

__all__ = ["B", "seconds", "shape_in_B", "plan_records", "plan_totals", "human", "explain", "budget_lines"]

B = sympy.Symbol("B")
_COSTS = ("time_ghost", "mem_ghost", "time_explicit", "mem_explicit")


def _in_B(expr, batch) -> sympy.Expr | None:
    """`expr` with the capture's batch symbol written as `B`."""
    return None if expr is None else sympy.sympify(expr).subs(batch, B)


def _at(expr: sympy.Expr | None, size: int):
    """The value of `expr` at `B = size`: an int when it is a number, else its text."""
    if expr is None:
        return None
    value = sympy.sympify(expr).subs(B, size)
    if value.is_number:
        return int(value) if value == int(value) else float(value)
    return str(value)


def _why(site, decision, batch, size: int) -> str:
    """The plan's decision of one operand (`Site.decision`) as a line a person reads."""
    if decision.decided_by == FALLBACK:
        return f"fallback: no rule for {getattr(site.op, '__name__', str(site.op))}, per-sample grads by vmap of vjp"
    if decision.decided_by == EXPLICIT_RULE:
        return decision.reason
    if decision.decided_by == GUARD:
        return f"run-time guard: ghost iff {_in_B(site.guard, batch)} >= 0 ({site.mode_at(size)} at B={size})"
    ghost, explicit = (_at(_in_B(t, batch), size) for t in (site.time_ghost_s, site.time_explicit_s))
    times = f"est. ghost {seconds(ghost)}, explicit {seconds(explicit)}"
    if decision.decided_by == USER_OVERRIDE:
        return f"user override: norm_mode={site.mode!r} ({times})"
    if decision.decided_by == WITHIN_BUDGET:
        return f"fastest within budget: {times}; explicit up to B={site.explicit_up_to}"
    if decision.decided_by == OVER_BUDGET:
        return f"explicit would exceed budget at B={size} (explicit up to B={site.explicit_up_to}): {times}"
    return f"{decision.decided_by}: {times}"


def seconds(value) -> str:
    """`0.000123` as `123µs`."""
    if not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value / 1e-9:.3g}ns"


def _text(expr) -> str:
    return str(expr).replace("*", "·")


def shape_in_B(val, batch) -> str | None:
    """A node's value's shape with the capture's batch symbol written `B`: `[B, 16, 32]`, a
    tuple of shapes for several outputs, None for a non-tensor."""
    if isinstance(val, torch.Tensor):
        dims = [s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
        return "[" + ", ".join(str(sympy.sympify(d).subs(batch, B)) for d in dims) + "]"
    if isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val):
        return "(" + ", ".join(shape_in_B(v, batch) or "-" for v in val) + ")"
    return None


def plan_records(compiled, batch: int | None = None) -> list[dict]:
    """One record per (site, parameter operand), sizes and costs as text in `B` and as numbers.

    Keys: site, node, op, source, module, params, param_shapes, operand, chain, kind, rule,
    sample_dim (of the output), input_sample_dims, out_shape, tied_sites (other sites using
    one of the operand's parameters); T, p, d (numbers at `batch`) and T_expr, p_expr, d_expr
    (in B); mode, decided_by and reason from the plan's `Site.decision` at `batch` (mode:
    ghost, explicit, guard, fallback; decided_by: one of `bkfx._ir.plan`'s "explicit rule",
    "fallback", "user override", "run-time guard", "ghost is faster", "fastest within
    budget", "explicit would exceed budget"), mode_at_batch (a factored operand's site
    mode at `batch`), why (a line a person reads); time_ghost, mem_ghost,
    time_explicit, mem_explicit (text in B, None where the mode does not apply) and their
    `*_value` numbers at `batch`; time_norm, mem_norm (the chosen mode's), time_nonprivate,
    mem_nonprivate (the standard weight gradient's), each with its `*_value`; batch.
    """
    symbol = compiled.batch_symbol
    size = int(batch if batch is not None else compiled.example_batch)
    nodes = {n.name: n for n in compiled.graph_module.graph.nodes}
    users: dict[str, list[int]] = {}
    for site in compiled.sites:
        for name in site.params:
            users.setdefault(name, []).append(site.id)
    shapes = {n: list(p.shape) for n, p in compiled.graph_module.named_parameters()}
    records = []
    for site in compiled.sites:
        node = nodes.get(site.node)
        for operand in site.operands:
            rec = _record(site, operand, node, symbol, size, shapes, users)
            rec.update(_costs(site, operand, rec["mode_at_batch"], symbol, size))
            records.append(rec)
    return records


def _record(site, operand, node, symbol, size: int, shapes: dict, users: dict) -> dict:
    """What one operand is, where, and the plan's decision for it at batch size `size`."""
    spec = operand.spec
    decision = site.decision(operand, size)
    return {
        "site": site.id,
        "node": site.node,
        "op": str(site.op),
        "source": site.source,
        "module": site.module,
        "params": list(operand.params),
        "param_shapes": {n: shapes.get(n) for n in operand.params},
        "operand": ",".join(map(str, operand.path)),
        "chain": operand.chain,
        "kind": spec.kind,
        "rule": operand.rule.name,
        "sample_dim": site.out_layout.describe(),
        "input_sample_dims": {",".join(map(str, path)): lo.describe() for path, lo in site.layouts.items()},
        "out_shape": shape_in_B(node.meta.get("val") if node is not None else None, symbol),
        "tied_sites": sorted({s for n in operand.params for s in users[n]} - {site.id}),
        "batch": size,
        "mode": decision.mode,
        "mode_at_batch": site.mode_at(size) if spec.kind == "factored" else decision.mode,
        "decided_by": decision.decided_by,
        "reason": decision.reason,
        "why": _why(site, decision, symbol, size),
    }


def _costs(site, operand, mode_at_batch: str, symbol, size: int) -> dict:
    """An operand's sizes and costs in B and at `size`: both modes', the chosen one's (norm),
    the non-private weight gradient's, and the cost model's estimates of its site."""
    spec, rec = operand.spec, {}
    for key, expr in (("T", spec.T), ("p", spec.m), ("d", spec.n)):
        rec[key + "_expr"] = str(_in_B(expr, symbol))
        rec[key] = _at(_in_B(expr, symbol), size)
    costs = {key: _in_B(getattr(spec, key), symbol) for key in _COSTS}
    ghost = mode_at_batch == "ghost"
    costs["time_norm"] = costs["time_ghost"] if ghost else costs["time_explicit"]
    costs["mem_norm"] = costs["mem_ghost"] if ghost else costs["mem_explicit"]
    costs["time_nonprivate"] = _in_B(operand.rule.nonprivate_time(spec, symbol), symbol)
    costs["mem_nonprivate"] = _in_B(spec.m * spec.n, symbol)
    for key, expr in costs.items():
        rec[key] = None if expr is None else str(expr)
        rec[key + "_value"] = _at(expr, size)
    # the cost model's estimates, per site (shown on each of its factored operands)
    factored = spec.kind == "factored" and site.time_ghost_s is not None
    rec["est_ghost_s"] = _at(_in_B(site.time_ghost_s, symbol), size) if factored else None
    rec["est_explicit_s"] = _at(_in_B(site.time_explicit_s, symbol), size) if factored else None
    rec["explicit_bytes"] = _at(_in_B(site.bytes_explicit, symbol), size) if factored else None
    rec["explicit_up_to"] = site.explicit_up_to if factored else None
    return rec


def plan_totals(records: list[dict]) -> dict:
    """Sums over the operands at the records' batch size: the plan's norm cost, what all-ghost
    and all-explicit plans would cost, and the non-private weight gradients'; `time_ratio` is
    `Σ norm time / Σ non-private time`."""

    def total(key: str, fallback: str | None = None) -> int:
        values = (r[key + "_value"] if r[key + "_value"] is not None else r[fallback + "_value"] for r in records)
        return sum(_number(v) for v in values)

    out = {
        "batch": records[0]["batch"] if records else None,
        "time_norm": total("time_norm"), "mem_norm": total("mem_norm"),
        "time_nonprivate": total("time_nonprivate"), "mem_nonprivate": total("mem_nonprivate"),
        "time_all_ghost": total("time_ghost", "time_explicit"), "mem_all_ghost": total("mem_ghost", "mem_explicit"),
        "time_all_explicit": total("time_explicit"), "mem_all_explicit": total("mem_explicit"),
    }
    out["time_ratio"] = out["time_norm"] / out["time_nonprivate"] if out["time_nonprivate"] else None
    # the cost model's estimates, once per site: the plan's seconds and explicit bytes, and the alternatives
    sites = {r["site"]: r for r in records if r.get("est_ghost_s") is not None}.values()
    out["est_s_plan"] = sum(r["est_ghost_s"] if r["mode_at_batch"] == "ghost" else r["est_explicit_s"] for r in sites)
    out["est_s_all_ghost"] = sum(r["est_ghost_s"] for r in sites)
    out["est_s_all_explicit"] = sum(r["est_explicit_s"] for r in sites)
    out["explicit_bytes_plan"] = sum(r["explicit_bytes"] for r in sites if r["mode_at_batch"] == "explicit")
    out["explicit_bytes_all"] = sum(r["explicit_bytes"] for r in sites)
    return out


def _number(value) -> float:
    if isinstance(value, (int, float)):
        return value
    raise ValueError(f"a cost depends on a dynamic size other than the batch: {value}")


def human(value) -> str:
    """`45088768` as `45.1M`: three significant digits with a K/M/G/T suffix."""
    if value is None:
        return "-"
    if not isinstance(value, (int, float)):
        return str(value)
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _where(source: str | None) -> str:
    """A source line with its file path relative to the working directory when inside it."""
    if not source:
        return "no source line recorded"
    path, sep, rest = source.partition(":")
    if sep and os.path.isabs(path):
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            return rel + sep + rest
    return source


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells):
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def explain(compiled, batch: int | None = None) -> str:
    """The plan as text: a row per parameter operand (numbers at one batch size), the source
    line of each site, the sizes and costs as expressions in B, and totals against
    non-private training."""
    records = plan_records(compiled, batch)
    size = records[0]["batch"] if records else int(batch or compiled.example_batch)
    n_params = len({p for r in records for p in r["params"]})
    out = [
        f"bkfx plan: {len(compiled.sites)} sites, {len(records)} parameter operands, {n_params} trainable parameters; "
        f"numbers at B={size} (B: the batch size, symbolic in the capture)",
        *budget_lines(compiled.graph_module.meta.get(META_BUDGET), size),
        "",
    ]
    out += _operand_table(records)
    out += _sources(records)
    out += _expressions(records)
    out += _totals(records, size)
    out += ["", _sample_analysis(compiled)]
    out += _compiled_step(compiled)
    return "\n".join(out)


def _compiled_step(compiled) -> list[str]:
    """The compiled BK step's programs (`bkfx._runtime.step`), when this capture has run compiled:
    the guards each trace assumed about B, and the backward program's code."""
    programs = [p for traces in compiled.programs.values() for p in traces]
    if not programs:
        return []
    out = ["", f"compiled BK step: {len(programs)} trace(s) of this capture"]
    for k, program in enumerate(programs):
        guards = ", ".join(str(g) for g in program.guards) or "none"
        n_fw = sum(1 for n in program.forward_graph.graph.nodes if n.op == "call_function")
        n_bw = sum(1 for n in program.backward_graph.graph.nodes if n.op == "call_function")
        out.append(f"  trace {k}: B = {program.batch}, guards on B: {guards}; forward program {n_fw} ops, "
                   f"backward program {n_bw} ops (input gradients, per-sample norms, clip factors, clipped sums)")
    out += ["", "compiled backward program (trace 0):", programs[0].backward_graph.code.strip()]
    return out


def _operand_table(records: list[dict]) -> list[str]:
    """A row per parameter operand: sizes, mode, both modes' costs and estimates, and why."""
    header = ["site", "op", "parameter", "sample dim", "T", "p", "d", "mode", "ghost time", "mem",
              "explicit time", "mem", "est. ghost", "est. explicit", "norm/non-private", "why"]
    rows, last = [], None
    for r in records:
        first = r["site"] != last
        last = r["site"]
        share = r["time_norm_value"] / r["time_nonprivate_value"] if r["time_nonprivate_value"] else None
        tied = f" (tied: sites {','.join(map(str, r['tied_sites']))})" if r["tied_sites"] else ""
        rows.append([
            str(r["site"]) if first else "",
            _op_name(r["op"]) if first else "",
            ",".join(r["params"]) + tied,
            r["sample_dim"] if first else "",
            str(r["T"]), str(r["p"]), str(r["d"]),
            r["mode"],
            human(r["time_ghost_value"]), human(r["mem_ghost_value"]),
            human(r["time_explicit_value"]), human(r["mem_explicit_value"]),
            seconds(r["est_ghost_s"]), seconds(r["est_explicit_s"]),
            "-" if share is None else f"{100 * share:.0f}%",
            r["why"],
        ])
    return _table(header, rows, right={4, 5, 6, 8, 9, 10, 11, 12, 13, 14})


def _sources(records: list[dict]) -> list[str]:
    """The user's source line of each site."""
    out = ["", "sources"]
    seen = set()
    for r in records:
        if r["site"] not in seen:
            seen.add(r["site"])
            module = f" [{r['module']}]" if r["module"] else ""
            out.append(f"  site {r['site']:>3}  {r['node']}{module}: {_where(r['source'])}")
    return out


def _expressions(records: list[dict]) -> list[str]:
    """Each operand's sizes and both modes' costs as expressions in B."""
    out = ["", "in B (expressions of the symbolic batch size)"]
    for r in records:
        sizes = f"T={r['T_expr']} p={r['p_expr']} d={r['d_expr']}"
        costs = "; ".join(
            f"{label} time {_text(r['time_' + key])}, memory {_text(r['mem_' + key])}"
            for label, key in (("ghost", "ghost"), ("explicit", "explicit"))
            if r["time_" + key] is not None
        )
        out.append(f"  site {r['site']:>3}  {','.join(r['params'])}: {sizes}; {costs}")
    return out


def _totals(records: list[dict], size: int) -> list[str]:
    """Totals at `size` against the non-private weight gradients, and the cost model's estimated seconds."""
    totals = plan_totals(records)
    out = ["", f"{'totals at B=' + str(size):<38}{'time':>9}  {'memory':>11}"]
    ratio = totals["time_ratio"]
    rows = [
        ("non-private weight gradients", totals["time_nonprivate"], totals["mem_nonprivate"], ""),
        ("bkfx per-sample norms (this plan)", totals["time_norm"], totals["mem_norm"],
         "" if ratio is None else f"  norm time = {100 * ratio:.0f}% of the non-private weight-gradient time"),
        ("  if every site were ghost", totals["time_all_ghost"], totals["mem_all_ghost"], ""),
        ("  if every site were explicit", totals["time_all_explicit"], totals["mem_all_explicit"], ""),
    ]
    out += [f"  {label:<36}{human(t):>9}  {human(m):>11}{note}" for label, t, m, note in rows]
    out += [
        "",
        f"estimated extra seconds of the norms at B={size} (cost model): this plan {seconds(totals['est_s_plan'])}, "
        f"all ghost {seconds(totals['est_s_all_ghost'])}, all explicit {seconds(totals['est_s_all_explicit'])}; "
        f"explicit per-sample gradients held: {human(totals['explicit_bytes_plan'])}B "
        f"(all explicit: {human(totals['explicit_bytes_all'])}B)",
    ]
    return out


def _sample_analysis(compiled) -> str:
    """How the capture proved that no operation mixes samples: rules, or the probe."""
    nodes = list(compiled.graph_module.graph.nodes)
    probed = [n for n in nodes if n.meta.get(META_PROBE)]
    if not probed:
        return "sample analysis: every sample-dependent operation has a sample rule (no numerical probe needed)"
    names = ", ".join(f"{original_op_name(n)} ({n.name})" for n in probed)
    return (f"sample analysis: {len(probed)} operation(s) without a sample rule passed the numerical separability "
            f"probe at capture: {names}")


def budget_lines(budget, size: int) -> list[str]:
    """The device the plan was made for, its cost constants and the memory budget."""
    if budget is None:
        return []
    c = budget.costs
    activations = budget.activation_bytes * size
    return [
        f"device: {budget.device}, compute {budget.compute_dtype}; cost constants: {human(c.macs_per_s)} multiply-adds/s "
        f"(x{c.low_precision_speedup:g} in bf16/fp16), {human(c.bytes_per_s)}B/s, Gram matmuls at "
        f"{c.gram_efficiency:g} of a large matmul's rate, per-sample matmuls at half rate with {c.rows_half:g} rows",
        f"memory budget: {human(budget.total)}B ({budget.source}); activations ~{human(budget.activation_bytes)}B "
        f"per sample (estimated from the graph), {human(activations)}B at B={size}; left for explicit per-sample "
        f"gradients at B={size}: {human(max(budget.total - activations - budget.fixed_bytes * size, 0))}B",
    ]


def _op_name(op: str) -> str:
    """`aten.linear.default` as `linear`, `aten.add.Tensor` as `add`."""
    parts = op.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else op
