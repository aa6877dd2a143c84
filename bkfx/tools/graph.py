"""The rewritten graph as a picture: a networkx DiGraph, DOT text, and SVG/PNG renderings.

`to_networkx(dp_model)` has one node per fx node of the last capture, named as in
`dp_model.code`, with attributes

- `op` (placeholder, get_attr, call_function, call_module, output), `target` (the ATen
  operation; for a site, the operation the BK call wraps), `shape` (with the batch size
  written `B`), `sample_dim` (where the samples lie, e.g. `dim 0 = B*16`), `params`;
- for a parametric site: `site` (its id), `mode` (ghost, explicit, guard, or fallback
  when no rule knows the operation and the vmap fallback computes its per-sample
  gradients), `modes` (per parameter), `source` (the user's line);

and an edge `u → v` (`kind="data"`) wherever v reads u. Sites that share a parameter
(tied weights) are linked in site order by `kind="tied"` edges carrying the parameter's
name, or, where the two sites are already joined by data flow, by a `tied` attribute on
that edge: their per-sample gradients add up before the norm, through the cross terms.

`to_dot` writes it as Graphviz DOT (no dependency needed), sites filled by mode and tied
links dashed, every attribute kept (the tensor shape as `tensor_shape`: `shape` is
Graphviz's node outline); `render` draws it to SVG/PNG/PDF with Graphviz's `dot` when installed and
with matplotlib otherwise.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import networkx as nx
import torch

from bkfx._ir.layout import SampleLayout
from bkfx._ir.meta import META_BATCH, META_LAYOUT, META_PARAMS, META_SITE
from bkfx._torch import OpOverload
from bkfx.errors import RenderError
from bkfx.tools.explain import shape_in_B

__all__ = ["MODE_COLOURS", "TIED_COLOUR", "ENGINES", "site_mode", "to_networkx", "tied_links", "to_dot",
    "write_dot", "available_engine", "render", "layered_positions"]

MODE_COLOURS = {"ghost": "#a6dba0", "explicit": "#92c5de", "guard": "#fee08b", "fallback": "#f4a582"}
_COLOUR_NAMES = {"ghost": "green", "explicit": "blue", "guard": "yellow (run-time guard)", "fallback": "orange"}
TIED_COLOUR = "#7b3294"
_KIND_COLOURS = {"placeholder": "#d9d9d9", "get_attr": "#ffffff", "output": "#d9d9d9"}
_FORMATS = ("svg", "png", "pdf")
ENGINES = ("auto", "graphviz", "matplotlib")


def site_mode(site) -> str:
    """A site's colour: "fallback" when the vmap fallback computes any of its per-sample
    gradients, "explicit" when every operand is explicit, else the cost model's mode."""
    if any(o.rule.fallback for o in site.operands):
        return "fallback"
    if all(o.spec.kind == "explicit" for o in site.operands):
        return "explicit"
    return site.mode


def _operand_mode(site, operand) -> str:
    if operand.rule.fallback:
        return "fallback"
    return site.mode if operand.spec.kind == "factored" else "explicit"


def _layout_text(layout) -> str:
    if isinstance(layout, SampleLayout):
        return layout.describe()
    if isinstance(layout, tuple):
        return "(" + ", ".join(_layout_text(lo) or "-" for lo in layout) + ")"
    return ""


def _target_text(node) -> str:
    target = node.args[0] if META_SITE in node.meta else node.target
    if node.op in ("placeholder", "get_attr", "output", "call_module"):
        return str(target)
    return str(target) if isinstance(target, OpOverload) else getattr(target, "__name__", str(target))


def to_networkx(model) -> nx.DiGraph:
    """The last capture of `model` (a called `DPModel`, or a `Rewritten`) as a DiGraph."""
    gm, sites = model.graph_module, model.sites
    batch = gm.meta.get(META_BATCH)
    by_node = {site.node: site for site in sites}
    graph = nx.DiGraph(name=type(getattr(model, "module", gm)).__name__)
    for node in gm.graph.nodes:
        site = by_node.get(node.name)
        params = sorted(node.meta.get(META_PARAMS) or ()) if node.op == "get_attr" else (site.params if site else [])
        attrs = {
            "op": node.op,
            "target": _target_text(node),
            "shape": shape_in_B(node.meta.get("val"), batch) or "",
            "sample_dim": _layout_text(node.meta.get(META_LAYOUT)),
            "params": ",".join(params),
            "site": site.id if site else None,
            "mode": site_mode(site) if site else None,
            "modes": ", ".join(f"{','.join(o.params)}: {_operand_mode(site, o)}" for o in site.operands)
            if site else None,
            "source": site.source if site else None,
        }
        graph.add_node(node.name, **attrs)
    for node in gm.graph.nodes:
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name, kind="data")
    users: dict[str, list] = {}
    for site in sites:
        for name in site.params:
            users.setdefault(name, []).append(site)
    for name, shared in users.items():
        for a, b in zip(shared, shared[1:]):
            edge = graph.edges[a.node, b.node] if graph.has_edge(a.node, b.node) else None
            if edge is None:
                graph.add_edge(a.node, b.node, kind="tied", param=name)
            else:  # several tied parameters, or sites joined by data flow too: one edge says all
                key = "param" if edge["kind"] == "tied" else "tied"
                edge[key] = ",".join(filter(None, [edge.get(key), name]))
    return graph


def tied_links(graph: nx.DiGraph) -> list[tuple[str, str, str]]:
    """(site node, site node, parameter) for every tied link of `graph`."""
    out = []
    for u, v, data in graph.edges(data=True):
        names = data["param"] if data["kind"] == "tied" else data.get("tied") or ""
        out += [(u, v, name) for name in names.split(",") if name]
    return out


def _label(name: str, attrs: dict) -> str:
    if attrs["op"] == "get_attr":
        return f"{attrs['target']}\n{attrs['shape']}"
    if attrs["op"] in ("placeholder", "output"):
        return f"{name}\n{attrs['shape']}" if attrs["shape"] else name
    op = attrs["target"].split(".")[1] if attrs["target"].startswith("aten.") else attrs["target"]
    head = f"{name}: {op}" if op != name else name
    if attrs["site"] is not None:
        head += f"\nsite {attrs['site']} · {attrs['mode']}"
    if attrs["sample_dim"] and attrs["sample_dim"] != "dim 0":  # the samples moved: say where
        head += f"\nsamples: {attrs['sample_dim']}"
    return f"{head}\n{attrs['shape']}" if attrs["shape"] else head


def _quote(value) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _attributes(items: dict) -> str:
    return "[" + ", ".join(f"{k}={_quote(v)}" for k, v in items.items() if v is not None and v != "") + "]"


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT text of a `to_networkx` graph: every node attribute kept, plus drawing
    attributes (label, shape, fill colour by mode; dashed purple tied links)."""
    legend = ", ".join(f"{mode} {_COLOUR_NAMES[mode]}" for mode in MODE_COLOURS)
    lines = [
        "digraph bkfx {",
        "  graph " + _attributes({
            "rankdir": "TB", "fontname": "Helvetica", "labelloc": "t",
            "label": f"bkfx plan of {graph.graph.get('name', 'model')}  "
                     f"(sites by mode: {legend}; dashed: tied parameters)",
        }) + ";",
        "  node " + _attributes({"fontname": "Helvetica", "fontsize": "10"}) + ";",
        "  edge " + _attributes({"color": "#555555", "arrowsize": "0.6"}) + ";",
    ]
    for name, attrs in graph.nodes(data=True):
        draw = {"label": _label(name, attrs), "style": "filled"}
        if attrs["site"] is not None:
            draw.update(shape="box", fillcolor=MODE_COLOURS[attrs["mode"]], penwidth="1.5")
        elif attrs["op"] == "get_attr":
            draw.update(shape="note", fillcolor=_KIND_COLOURS["get_attr"])
        elif attrs["op"] in _KIND_COLOURS:
            draw.update(shape="ellipse", fillcolor=_KIND_COLOURS[attrs["op"]])
        else:
            draw.update(shape="ellipse", style="", fontsize="9")
        facts = {("tensor_shape" if k == "shape" else k): v for k, v in attrs.items()}
        lines.append(f"  {_quote(name)} {_attributes({**facts, **draw})};")
    for u, v, data in graph.edges(data=True):
        draw = {}
        if data["kind"] == "tied":
            draw = {"style": "dashed", "color": TIED_COLOUR, "fontcolor": TIED_COLOUR, "dir": "none",
                    "constraint": "false", "label": data["param"]}
        elif data.get("tied"):
            draw = {"color": TIED_COLOUR, "fontcolor": TIED_COLOUR, "label": f"tied: {data['tied']}"}
        lines.append(f"  {_quote(u)} -> {_quote(v)} {_attributes({**data, **draw})};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(graph: nx.DiGraph, path) -> Path:
    path = Path(path)
    path.write_text(to_dot(graph))
    return path


def available_engine() -> str | None:
    """"graphviz" when the `dot` program is installed, else "matplotlib" when importable, else None."""
    if shutil.which("dot"):
        return "graphviz"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return "matplotlib"


def render(graph: nx.DiGraph, path, engine: str = "auto") -> Path:
    """Draw `graph` to `path` (.svg, .png or .pdf) with Graphviz's `dot`, or with matplotlib
    (a layered drawing) when `dot` is not installed or `engine="matplotlib"`."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in _FORMATS:
        raise RenderError(f"cannot draw to {path.name}: the file name must end in one of {', '.join(_FORMATS)}")
    if engine not in ENGINES:
        raise RenderError(f"engine must be one of {ENGINES}, got {engine!r}")
    chosen = available_engine() if engine == "auto" else engine
    if chosen == "graphviz":
        dot = shutil.which("dot")
        if dot is None:
            raise RenderError("Graphviz's `dot` program is not installed (Debian: apt-get install graphviz)")
        done = subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=to_dot(graph), text=True, capture_output=True)
        if done.returncode != 0:
            first = done.stderr.strip().splitlines()[0] if done.stderr.strip() else f"exit code {done.returncode}"
            raise RenderError(f"dot failed: {first}")
        return path
    if chosen == "matplotlib":
        return _draw_with_matplotlib(graph, path, fmt)
    raise RenderError("no drawing engine: install Graphviz (`dot`) or matplotlib (pip install 'bkfx[graph]')")


def layered_positions(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Positions for a top-to-bottom drawing (Sugiyama-style, simplified).

    A node's row is its longest data path from a source; a source (parameter, input) sits
    one row above its first reader. Within a row nodes are ordered by the mean column of
    the nodes they read (sources: of their readers), which keeps most edges short.
    """
    data = nx.DiGraph((u, v) for u, v, d in graph.edges(data=True) if d["kind"] == "data")
    data.add_nodes_from(graph)
    row = {n: r for r, generation in enumerate(nx.topological_generations(data)) for n in generation}
    for n in data:
        readers = list(data.successors(n))
        if data.in_degree(n) == 0 and readers:
            row[n] = max(0, min(row[m] for m in readers) - 1)
    rows: dict[int, list[str]] = {}
    for n in nx.topological_sort(data):
        rows.setdefault(row[n], []).append(n)
    column: dict[str, float] = {}
    for r in sorted(rows):
        def key(n):
            placed = [column[m] for m in data.predecessors(n) if m in column]
            return sum(placed) / len(placed) if placed else float("inf")

        ordered = sorted(rows[r], key=key)
        for k, n in enumerate(ordered):
            column[n] = k - (len(ordered) - 1) / 2
    for r in sorted(rows):  # sources: under the mean of their readers, then spread apart
        ordered = sorted(rows[r], key=lambda n: column[n] if data.in_degree(n) else
                         sum(column[m] for m in data.successors(n)) / max(1, data.out_degree(n)))
        for k, n in enumerate(ordered):
            column[n] = k - (len(ordered) - 1) / 2
    return {n: (column[n], -row[n]) for n in graph}


def _draw_with_matplotlib(graph: nx.DiGraph, path: Path, fmt: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    pos = layered_positions(graph)
    width = max(x for x, _ in pos.values()) - min(x for x, _ in pos.values()) + 1
    height = -min(y for _, y in pos.values()) + 1
    fig, ax = plt.subplots(figsize=(max(8.0, 2.2 * width), max(6.0, 0.75 * height)))
    data = [(u, v) for u, v, d in graph.edges(data=True) if d["kind"] == "data"]
    tied = [(u, v) for u, v, _ in tied_links(graph)]
    nx.draw_networkx_edges(graph, pos, edgelist=data, ax=ax, edge_color="#777777", arrowsize=8, width=0.8)
    nx.draw_networkx_edges(graph, pos, edgelist=tied, ax=ax, edge_color=TIED_COLOUR, style="dashed", arrows=True,
                           arrowstyle="-", connectionstyle="arc3,rad=0.35", width=1.5)
    for name, attrs in graph.nodes(data=True):
        colour = MODE_COLOURS[attrs["mode"]] if attrs["site"] is not None else _KIND_COLOURS.get(attrs["op"], "#f7f7f7")
        ax.text(*pos[name], _label(name, attrs), ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round,pad=0.3", "facecolor": colour,
                      "edgecolor": "black" if attrs["site"] is not None else "#999999"})
    handles = [Patch(facecolor=c, edgecolor="black", label=m) for m, c in MODE_COLOURS.items()]
    handles.append(Patch(facecolor="white", edgecolor=TIED_COLOUR, linestyle="--", label="tied parameter"))
    ax.legend(handles=handles, loc="upper right", fontsize=8, title="sites by mode")
    ax.set_title(f"bkfx plan of {graph.graph.get('name', 'model')}")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, format=fmt)
    plt.close(fig)
    return path
