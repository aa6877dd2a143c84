"""The plan as a table a person reads, and as records a program reads."""
from __future__ import annotations

import sympy


def _num(expr, batch, example):
    value = sympy.sympify(expr).subs(batch, example)
    return int(value) if value.is_number else str(value)


def plan_records(compiled) -> list[dict]:
    """One record per (site, parameter operand): op, source, T, p, d, mode, reason and costs."""
    batch, example = compiled.batch_symbol, compiled.example_batch
    B = sympy.Symbol("B")
    records = []
    for site in compiled.sites:
        for operand in site.operands:
            s = operand.spec
            rec = {
                "site": site.id,
                "node": site.node,
                "op": str(site.op),
                "source": site.source,
                "module": site.module,
                "params": list(operand.params),
                "operand": ",".join(map(str, operand.path)),
                "chain": operand.chain,
                "kind": s.kind,
                "rule": operand.rule.name,
                "sample_dim": site.out_layout.describe(),
                "T": _num(s.T, batch, example), "p": _num(s.m, batch, example), "d": _num(s.n, batch, example),
                "mode": site.mode if s.kind == "factored" else ("fallback" if operand.rule.name == "Fallback" else "explicit"),
                "reason": site.reason if s.kind == "factored" else (
                    "no rule: vmap of vjp" if operand.rule.name == "Fallback" else f"explicit rule ({operand.rule.name})"
                ),
            }
            for key in ("time_ghost", "mem_ghost", "time_explicit", "mem_explicit"):
                expr = getattr(s, key)
                rec[key] = None if expr is None else str(sympy.sympify(expr).subs(batch, B))
            records.append(rec)
    return records


def explain(compiled) -> str:
    records = plan_records(compiled)
    cols = ["site", "node", "params", "kind", "mode", "T", "p", "d", "sample_dim", "reason"]
    rows = [[str(r[c]) if c != "params" else ",".join(r[c]) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [f"bkfx plan: {len(compiled.sites)} sites, batch symbol B (sizes shown for B={compiled.example_batch})",
           line(cols), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)
