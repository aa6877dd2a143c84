"""Write docs/ops.md, the table of the ATen ops bkfx has rules for, from the registered rules.

    python docs/gen_ops_table.py            # rewrite docs/ops.md
    python docs/gen_ops_table.py --check    # exit 1 if docs/ops.md differs from the rules

Two registries are read: the *gradient rules* (`bkfx.rules.registered()`: an op whose operand is a
trainable parameter, with the factors or explicit per-sample gradients of that parameter) and the
*sample rules* (`bkfx.rules.sample.sample_rules()`: how an op maps the sample dimension, which
proves it does not mix samples, registered by the same family modules). `tests/test_docs.py` checks that the committed file is this script's output.
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

- a **sample rule** (in the family file of the op under `bkfx/rules/`, applied by
  `passes/sample_dim.py`) proves how the op maps the sample dimension, the way a `torch.func.vmap`
  batching rule does. A sample-dependent op without one is checked at capture by the numerical
  probe (every sample perturbed in turn, every other sample's output must stay bit-identical)
  and refused if it mixes samples; `dp_model.probed_operations` lists such ops.
- a **gradient rule** (`bkfx/rules/`) gives, for an op with a trainable parameter among its
  operands, that parameter's per-sample gradient as factors (ghost or explicit norms, chosen by
  the cost model) or as an explicit per-sample gradient. A parametric op without one (or whose
  rule declines the arrangement) is served by the fallback, explicit per-sample gradients by
  `vmap` of `vjp`; `explain()` shows `Fallback` as the site's rule.

Op names are those of `bkfx._ir.node.target_name` (`aten.addmm.default` is `addmm`).
"""


def _gradient_rules() -> list[str]:
    from bkfx import rules
    from bkfx.rules.sample import sample_rules

    lines = [
        "## Gradient rules (`bkfx/rules/`)",
        "",
        "| ATen op | rule | module | sample rule |",
        "|---|---|---|---|",
    ]
    for op, rule in sorted(rules.registered().items()):
        module = rule.spec.__module__.rsplit(".", 1)[-1]
        lines.append(f"| `{op}` | `{rule.name}` | `bkfx/rules/{module}.py` | {_sample_rule_of(op, sample_rules())} |")
    lines += ["", f"Any other parametric op: `{rules.FALLBACK.name}` (`bkfx/rules/fallback.py`).", ""]
    return lines


def _sample_rule_of(op: str, registered: dict) -> str:
    from bkfx.rules.sample import ELEMENTWISE, LAYOUT, MAP

    rule = registered.get(op)
    if rule is not None and rule.kind == MAP:
        return f"`{rule.name}`"
    if rule is not None and rule.kind == LAYOUT:
        return f"`{rule.name}` (layout rule)"
    if (rule is not None and rule.kind == ELEMENTWISE) or _pointwise(op):
        return "elementwise"
    return "none: probed at capture"


def _file(rule) -> str:
    """The family module that registered a sample rule, as a path."""
    return f"`{rule.module.replace('.', '/')}.py`"


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
    from bkfx.rules.sample import ELEMENTWISE, LAYOUT, MAP, RESHAPE, VALUE_FREE, sample_rules

    by_kind: dict[str, dict] = {}  # kind -> (rule name, family file) -> ops
    for op, rule in sample_rules().items():
        by_kind.setdefault(rule.kind, {}).setdefault((rule.name, _file(rule)), set()).add(op)

    def listed(kind: str) -> str:
        return "; ".join(f"{_ops(ops)} ({file})" for (_, file), ops in sorted(by_kind[kind].items()))

    maps = by_kind[MAP]
    lines = [
        "## Sample rules (`bkfx/rules/`)",
        "",
        "Registered in `bkfx/rules/sample.py` by the module of each op's family (its *family file*) and",
        "applied by `passes/sample_dim.py`. "
        f"{sum(map(len, maps.values()))} ops with a dimension map, grouped by rule; besides them:",
        "",
        "- **elementwise and broadcast**: every op tagged `torch.Tag.pointwise`, and these without the tag: "
        + listed(ELEMENTWISE) + ";",
        "- **reshapes**, the sample dimension followed by its stride: " + listed(RESHAPE) + ";",
        "- **value-free** ops (their value depends on shapes, dtypes and devices only, never on a sample): "
        + listed(VALUE_FREE) + ";",
        "- **layout rules**, for ops with several outputs that hold samples in different places: "
        + "; ".join(f"`{name}`: {_ops(ops)} ({file})" for (name, file), ops in sorted(by_kind[LAYOUT].items())) + ".",
        "",
        "| sample rule | family file | ATen ops |",
        "|---|---|---|",
    ]
    for (name, file), ops in sorted(maps.items()):
        lines.append(f"| `{name}` | {file} | {_ops(ops)} |")
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
