"""The graph export: one networkx node per fx node with the plan's facts, DOT that parses back
with networkx (pydot), sites coloured by mode, tied parameters linked, pictures drawn."""
from __future__ import annotations

import shutil

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bkfx
from bkfx.tools.graph import (
    MODE_COLOURS,
    RenderError,
    available_engine,
    layered_positions,
    render,
    site_mode,
    tied_links,
    to_dot,
    to_networkx,
    write_dot,
)
from bkfx._ir.meta import META_SITE

# pydot's parser uses pyparsing's old names
pytestmark = pytest.mark.filterwarnings("ignore:'[a-zA-Z]+' deprecated - use:DeprecationWarning")


class TiedLM(nn.Module):
    """Embedding, a learned position table, LayerNorm, a custom op with no rule, a tied head."""

    def __init__(self, vocab=9, d=4, T=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(T, d))
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.temperature = nn.Parameter(torch.rand(d) + 1)

    def forward(self, idx):
        h = self.ln(self.emb(idx) + self.pos[: idx.shape[1]])
        h = torch.tanh(self.fc(h)) / self.temperature  # div has no rule: the fallback
        return F.linear(h, self.emb.weight)


@pytest.fixture(scope="module")
def dp():
    torch.manual_seed(0)
    model = bkfx.compile(TiedLM(), norm_mode={"fc.weight": "ghost"})
    model(torch.randint(0, 9, (3, 6)))
    return model


def unquote(value: str) -> str:
    return value[1:-1].replace('\\"', '"') if value.startswith('"') else value


def test_one_node_per_fx_node_with_the_plans_facts(dp):
    graph = to_networkx(dp)
    nodes = list(dp.graph_module.graph.nodes)
    assert list(graph.nodes) == [n.name for n in nodes]
    data = {(u, v) for u, v, d in graph.edges(data=True) if d["kind"] == "data"}
    assert data == {(i.name, n.name) for n in nodes for i in n.all_input_nodes}
    for site in dp.sites:
        attrs = graph.nodes[site.node]
        assert attrs["site"] == site.id and attrs["mode"] == site_mode(site)
        assert attrs["target"] == str(site.op) and attrs["params"] == ",".join(site.params)
        assert attrs["source"] == site.source
    modes = {graph.nodes[s.node]["params"]: graph.nodes[s.node]["mode"] for s in dp.sites}
    assert modes["fc.bias,fc.weight"] == "ghost"  # the user's override
    assert modes["temperature"] == "fallback" and modes["ln.bias,ln.weight"] == "explicit"
    (idx,) = [n for n in nodes if n.op == "placeholder"]
    assert graph.nodes[idx.name]["shape"] == "[B, 6]" and graph.nodes[idx.name]["sample_dim"] == "dim 0"
    assert graph.nodes["emb_weight"]["op"] == "get_attr" and graph.nodes["emb_weight"]["params"] == "emb.weight"
    assert all(graph.nodes[n.name]["site"] is None for n in nodes if META_SITE not in n.meta)


def test_tied_parameters_are_linked(dp):
    graph = to_networkx(dp)
    users = [s.node for s in dp.sites if "emb.weight" in s.params]
    assert len(users) == 2
    assert tied_links(graph) == [(users[0], users[1], "emb.weight")]


def test_tied_sites_joined_by_data_flow_mark_that_edge(tmp_path):
    fc = nn.Linear(3, 3)
    dp = bkfx.compile(nn.Sequential(fc, fc))  # the same layer twice in a row
    dp(torch.randn(2, 3))
    graph = to_networkx(dp)
    first, second = (s.node for s in dp.sites)
    assert graph.edges[first, second]["kind"] == "data"
    assert sorted(tied_links(graph)) == [(first, second, "0.bias"), (first, second, "0.weight")]
    back = nx.nx_pydot.read_dot(str(write_dot(graph, tmp_path / "twice.dot")))
    (edge,) = [d for u, v, d in back.edges(data=True) if (u, v) == (first, second)]
    assert sorted(unquote(edge["tied"]).split(",")) == ["0.bias", "0.weight"]


def test_dot_parses_back_with_networkx(dp, tmp_path):
    graph = to_networkx(dp)
    path = write_dot(graph, tmp_path / "plan.dot")
    back = nx.nx_pydot.read_dot(str(path))
    assert set(back.nodes) == set(graph.nodes) and back.number_of_nodes() == len(list(dp.graph_module.graph.nodes))
    assert back.number_of_edges() == graph.number_of_edges()
    for name, attrs in graph.nodes(data=True):
        got = {k: unquote(v) for k, v in back.nodes[name].items()}
        assert got["op"] == attrs["op"] and got["target"] == attrs["target"]
        assert got.get("tensor_shape", "") == attrs["shape"] and got.get("sample_dim", "") == attrs["sample_dim"]
        if attrs["site"] is not None:
            assert got["site"] == str(attrs["site"]) and got["mode"] == attrs["mode"]
            assert got["fillcolor"] == MODE_COLOURS[attrs["mode"]] and got["source"] == attrs["source"]
    tied = [(u, v, unquote(d["param"])) for u, v, d in back.edges(data=True) if unquote(d["kind"]) == "tied"]
    assert tied == tied_links(graph)


def test_dot_quotes_awkward_text():
    graph = nx.DiGraph(name="q")
    awkward = 'x = f("a\\b")  # "quoted"\nnext line'
    graph.add_node("n", op="call_function", target="aten.add.Tensor", shape="[B]", sample_dim="dim 0", params="",
                   site=0, mode="ghost", modes="w: ghost", source=awkward)
    graph.add_node("m", op="output", target="output", shape="", sample_dim="", params="", site=None, mode=None,
                   modes=None, source=None)
    graph.add_edge("n", "m", kind="data")
    import pydot

    (parsed,) = pydot.graph_from_dot_data(to_dot(graph))
    source = parsed.get_node('"n"')[0].get("source")
    assert source.strip('"').replace('\\"', '"').replace("\\\\", "\\").replace("\\n", "\n") == awkward


def test_layered_drawing_puts_every_reader_below_what_it_reads(dp):
    graph = to_networkx(dp)
    pos = layered_positions(graph)
    assert set(pos) == set(graph.nodes)
    for u, v, d in graph.edges(data=True):
        if d["kind"] == "data":
            assert pos[u][1] > pos[v][1], (u, v)
    assert len(set(pos.values())) == len(pos)  # no two nodes on the same spot


def test_render_with_matplotlib_and_with_the_available_engine(dp, tmp_path):
    graph = to_networkx(dp)
    png = render(graph, tmp_path / "plan.png", engine="matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = render(graph, tmp_path / "plan.svg", engine="matplotlib")
    assert "<svg" in svg.read_text()
    engine = available_engine()
    assert engine == ("graphviz" if shutil.which("dot") else "matplotlib")
    auto = render(graph, tmp_path / "auto.svg")
    text = auto.read_text()
    assert "<svg" in text
    if engine == "graphviz":  # dot writes every node's name as its <title>
        assert all(f"<title>{name}</title>" in text for name in graph.nodes)
    else:
        with pytest.raises(RenderError, match="dot"):
            render(graph, tmp_path / "dot.svg", engine="graphviz")


def test_render_refuses_unknown_formats(dp, tmp_path):
    with pytest.raises(RenderError, match="must end in one of svg, png, pdf"):
        render(to_networkx(dp), tmp_path / "plan.jpg")
    with pytest.raises(RenderError, match="engine must be one of"):
        render(to_networkx(dp), tmp_path / "plan.svg", engine="tikz")
