"""Write docs/ops.md, the table of the ATen ops bkfx has rules for, from the registered rules.

    python docs/gen_ops_table.py            # rewrite docs/ops.md
    python docs/gen_ops_table.py --check    # exit 1 if docs/ops.md differs from the rules

Two registries are read: the *gradient rules* (`bkfx.rules.registered()`: an op whose operand is a
trainable parameter, with the factors or explicit per-sample gradients of that parameter) and the
*sample rules* (`passes.sample_dim`: how an op maps the sample dimension, which proves it does not
mix samples). `tests/test_docs.py` checks that the committed file is this script's output.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "ops.md")

HEADER = """# Supported operations

Generated from the registered rules by `python docs/gen_ops_table.py`; do not edit by hand
(`tests/test_docs.py` checks that this file is the script's output).

bkfx knows an ATen op through two kinds of rule:

- a **sample rule** (`passes/sample_dim.py`) proves how the op maps the sample dimension, the way
  a `torch.func.vmap` batching rule does. A sample-dependent op without one is checked at capture
  by the numerical probe (every sample perturbed in turn, every other sample's output must stay
  bit-identical) and refused if it mixes samples; `dp_model.probed_operations` lists such ops.
- a **gradient rule** (`bkfx/rules/`) gives, for an op with a trainable parameter among its
  operands, that parameter's per-sample gradient as factors (ghost or explicit norms, chosen by
  the cost model) or as an explicit per-sample gradient. A parametric op without one (or whose
  rule declines the arrangement) is served by the fallback, explicit per-sample gradients by
  `vmap` of `vjp`; `explain()` shows `Fallback` as the site's rule.

Op names are those of `bkfx._ir.node.target_name` (`aten.addmm.default` is `addmm`).
"""


def _gradient_rules() -> list[str]:
    from bkfx import rules
    from passes import sample_dim

    lines = [
        "## Gradient rules (`bkfx/rules/`)",
        "",
        "| ATen op | rule | module | sample rule |",
        "|---|---|---|---|",
    ]
    for op, rule in sorted(rules.registered().items()):
        module = rule.spec.__module__.rsplit(".", 1)[-1]
        lines.append(f"| `{op}` | `{rule.name}` | `bkfx/rules/{module}.py` | {_sample_rule_of(op, sample_dim)} |")
    lines += ["", f"Any other parametric op: `{rules.FALLBACK.name}` (`bkfx/rules/fallback.py`).", ""]
    return lines


def _sample_rule_of(op: str, sample_dim) -> str:
    if op in sample_dim._RULES:
        return f"`{sample_dim._RULES[op].__name__.lstrip('_')}`"
    if op in sample_dim._LAYOUT_RULES:
        return f"`{sample_dim._LAYOUT_RULES[op].__name__.lstrip('_')}` (layout rule)"
    if op in sample_dim._ELEMENTWISE or _pointwise(op):
        return "elementwise"
    return "none: probed at capture"


def _pointwise(op: str) -> bool:
    """Whether some overload of `aten.<op>` carries torch's pointwise tag (the elementwise sample rule's test)."""
    import torch

    packet = getattr(torch.ops.aten, op, None)
    if packet is None:
        return False
    return any(torch.Tag.pointwise in getattr(packet, name).tags for name in packet.overloads())


def _ops(names) -> str:
    return ", ".join(f"`{n}`" for n in sorted(names))


def _sample_rules() -> list[str]:
    from passes import sample_dim

    by_rule: dict[str, set] = {}
    for op, fn in sample_dim._RULES.items():
        by_rule.setdefault(fn.__name__.lstrip("_"), set()).add(op)
    layout: dict[str, set] = {}
    for op, fn in sample_dim._LAYOUT_RULES.items():
        layout.setdefault(fn.__name__.lstrip("_"), set()).add(op)
    lines = [
        "## Sample rules (`passes/sample_dim.py`)",
        "",
        f"{sum(map(len, by_rule.values()))} ops with a dimension map, grouped by rule; besides them:",
        "",
        "- **elementwise and broadcast**: every op tagged `torch.Tag.pointwise`, and these without the tag: "
        + _ops(sample_dim._ELEMENTWISE) + ";",
        "- **reshapes**, the sample dimension followed by its stride: " + _ops(sample_dim._RESHAPES) + ";",
        "- **value-free** ops (their value depends on shapes, dtypes and devices only, never on a sample): "
        + _ops(sample_dim._VALUE_FREE) + ";",
        "- **layout rules**, for ops with several outputs that hold samples in different places: "
        + "; ".join(f"`{name}`: {_ops(ops)}" for name, ops in sorted(layout.items())) + ".",
        "",
        "| sample rule | ATen ops |",
        "|---|---|",
    ]
    for name, ops in sorted(by_rule.items()):
        lines.append(f"| `{name}` | {_ops(ops)} |")
    lines.append("")
    return lines


def render() -> str:
    """The whole of docs/ops.md."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return "\n".join([HEADER, *_gradient_rules(), *_sample_rules()])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/ops.md is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        with open(OUT, encoding="utf-8") as f:
            current = f.read()
        if current != text:
            print("docs/ops.md is out of date: run python docs/gen_ops_table.py", file=sys.stderr)
            return 1
        return 0
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
