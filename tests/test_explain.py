"""The plan's numbers are the tensors' real sizes, its costs follow from them, its decisions
say why, and the table a person reads shows them with the user's source lines."""
from __future__ import annotations

import sympy
import torch
import torch.nn.functional as F
from torch import nn

import bkfx
from bkfx.tools.explain import plan_totals, seconds
from bkfx._ir.meta import META_BUDGET
from passes.cost_model import DEVICES

# keys that other tests and programs read: they stay
LEGACY_KEYS = {
    "site", "node", "op", "source", "module", "params", "operand", "chain", "kind", "rule", "sample_dim", "T", "p",
    "d", "mode", "reason", "time_ghost", "mem_ghost", "time_explicit", "mem_explicit",
}


def planned(model, *inputs, **options):
    dp = bkfx.compile(model, **options)
    dp(*inputs)
    return dp, {(r["site"], tuple(r["params"])): r for r in dp.plan()}


def record(records, name):
    (rec,) = [r for (_, params), r in records.items() if params == (name,)]
    return rec


def test_linear_on_sequences_reports_real_T_p_d_and_costs():
    B, T, d, p = 3, 6, 5, 7
    model = nn.Linear(d, p)
    x = torch.randn(B, T, d)
    dp, records = planned(model, x)
    w = record(records, "weight")
    out = model(x)
    assert (w["T"], w["p"], w["d"]) == (out.shape[1], out.shape[2], x.shape[2]) == (T, p, d)
    assert (w["T_expr"], w["p_expr"], w["d_expr"]) == (str(T), str(p), str(d))
    assert w["batch"] == B and w["sample_dim"] == "dim 0" and w["out_shape"] == f"[B, {T}, {p}]"
    assert w["param_shapes"] == {"weight": [p, d]}
    # costs: the symbolic expressions in B, and their values at the capture's batch size
    Bs = sympy.Symbol("B")
    assert sympy.sympify(w["time_ghost"]) == Bs * T**2 * (p + d + 1)
    assert sympy.sympify(w["time_explicit"]) == 2 * Bs * p * d
    assert w["time_ghost_value"] == B * T**2 * (p + d + 1) and w["mem_ghost_value"] == 2 * B * T**2
    assert w["time_explicit_value"] == 2 * B * p * d and w["mem_explicit_value"] == B * p * d
    assert w["time_nonprivate_value"] == B * T * p * d and w["mem_nonprivate_value"] == p * d
    # the cost model's estimates on this device (the CPU constants), per the documented formulas
    costs = DEVICES["cpu"]
    traffic = 3 * 4 / costs.bytes_per_s
    est_ghost = B * (T**2 * (p + d + 1) / (costs.macs_per_s * costs.gram_efficiency) + traffic * 2 * T**2)
    est_explicit = B * ((2 + costs.rows_half) * p * d / costs.macs_per_s + traffic * p * d)
    assert abs(w["est_ghost_s"] - est_ghost) < 1e-9 * est_ghost and abs(w["est_explicit_s"] - est_explicit) < 1e-9 * est_explicit
    assert w["explicit_bytes"] == B * p * d * 4
    ghost = est_ghost <= est_explicit
    assert w["mode"] == ("ghost" if ghost else "explicit")
    assert w["decided_by"] == ("ghost is faster" if ghost else "fastest within budget")
    assert w["time_norm_value"] == (w["time_ghost_value"] if ghost else w["time_explicit_value"])
    assert w["why"].startswith(w["decided_by"] + ": est. ghost ")
    b = record(records, "bias")
    assert (b["kind"], b["mode"], b["decided_by"], b["p"], b["d"]) == ("explicit", "explicit", "explicit rule", p, 1)
    assert LEGACY_KEYS <= set(w) and LEGACY_KEYS <= set(b)


def test_conv_T_is_the_number_of_output_positions():
    model = nn.Conv2d(3, 4, kernel_size=(3, 2), stride=2, padding=1)
    x = torch.randn(2, 3, 9, 11)
    _, records = planned(model, x)
    w = record(records, "weight")
    out = model(x)
    assert w["T"] == out.shape[2] * out.shape[3]
    assert (w["p"], w["d"]) == (4, 3 * 3 * 2)
    assert w["out_shape"] == f"[B, 4, {out.shape[2]}, {out.shape[3]}]"


def test_grouped_conv_counts_each_group_block():
    model = nn.Conv1d(4, 6, 3, groups=2)
    x = torch.randn(2, 4, 10)
    _, records = planned(model, x)
    w = record(records, "weight")
    assert (w["T"], w["p"], w["d"]) == (2 * model(x).shape[2], 6, 2 * 3)


def test_embedding_merged_sample_dimension_and_tied_sites():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4)
            self.mix = nn.Parameter(torch.randn(4, 4))

        def forward(self, idx):
            h = self.emb(idx)
            flat = h.reshape(-1, 4) @ self.mix  # [B*T, d]: the samples merged with positions
            return F.linear(flat.reshape(h.shape), self.emb.weight)

    idx = torch.randint(0, 11, (3, 5))
    dp, records = planned(Tied(), idx)
    emb, head = sorted((r for r in records.values() if r["params"] == ["emb.weight"]), key=lambda r: r["site"])
    assert (emb["T"], emb["p"], emb["d"], emb["rule"]) == (5, 11, 4, "Embedding")
    assert emb["time_nonprivate_value"] == 3 * 5 * 4  # a scatter-add of T rows of width d
    assert emb["tied_sites"] == [head["site"]] and head["tied_sites"] == [emb["site"]]
    mix = record(records, "mix")
    assert mix["sample_dim"] == "dim 0 = B*5" and (mix["T"], mix["p"], mix["d"]) == (5, 4, 4)  # 5 rows per sample


def test_override_and_fallback_say_why():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.rand(3) + 1)

        def forward(self, x):
            return self.fc(x) / self.scale  # no rule for div: the vmap fallback

    _, records = planned(Custom(), torch.randn(4, 3), norm_mode={"fc.weight": "explicit"})
    fc = record(records, "fc.weight")
    assert (fc["mode"], fc["decided_by"]) == ("explicit", "user override") and "user override" in fc["why"]
    scale = record(records, "scale")
    assert (scale["mode"], scale["decided_by"], scale["rule"]) == ("fallback", "fallback", "Fallback")
    assert "vmap" in scale["why"] and "div" in scale["why"]


def test_explain_table_shows_sizes_sources_formulas_and_totals():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 8)
            self.norm = nn.LayerNorm(8)
            self.fc2 = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.tanh(self.norm(self.fc1(x)))  # the line explain() must point at
            return self.fc2(h)

    dp, records = planned(Net(), torch.randn(5, 4, 6))
    text = dp.explain()
    lines = text.splitlines()
    assert lines[0].startswith("bkfx plan: 3 sites, 6 parameter operands, 6 trainable parameters; numbers at B=5")
    table = lines[4:lines.index("sources") - 1]  # after the device and budget lines
    assert [line.split()[0] for line in table[2:]] == ["0", "fc1.bias", "1", "norm.bias", "2", "fc2.bias"]
    assert "test_explain.py" in text and "h = torch.tanh(self.norm(self.fc1(x)))" in text
    fc1 = record(records, "fc1.weight")
    row = next(line for line in lines if "fc1.weight" in line and fc1["decided_by"] in line)
    assert row.split()[:8] == ["0", "linear", "fc1.weight", "dim", "0", "4", "8", "6"]  # T p d as numbers
    assert f"ghost time {4 * 4 * (8 + 6 + 1)}·B" in text  # and as expressions in B
    totals = plan_totals(list(records.values()))
    assert totals["time_nonprivate"] == sum(r["time_nonprivate_value"] for r in records.values())
    assert totals["time_norm"] == sum(r["time_norm_value"] for r in records.values())
    assert abs(totals["time_ratio"] - totals["time_norm"] / totals["time_nonprivate"]) < 1e-12
    assert f"norm time = {100 * totals['time_ratio']:.0f}% of the non-private" in text
    assert fc1["mem_norm_value"] <= fc1["mem_explicit_value"]
    # the device, its constants and the budget; the estimates in seconds, per row and in total
    budget = dp.graph_module.meta[META_BUDGET]
    assert lines[1].startswith("device: cpu, compute float32; cost constants: 50G multiply-adds/s")
    assert lines[2].startswith(f"memory budget: {bkfx.tools.explain.human(budget.total)}B (50% of available RAM")
    assert f"activations ~{bkfx.tools.explain.human(budget.activation_bytes)}B per sample" in lines[2]
    assert seconds(fc1["est_ghost_s"]) in row and seconds(fc1["est_explicit_s"]) in row
    sites = {r["site"]: r for r in records.values() if r["est_ghost_s"] is not None}.values()
    plan = sum(r["est_ghost_s"] if r["mode_at_batch"] == "ghost" else r["est_explicit_s"] for r in sites)
    assert abs(totals["est_s_plan"] - plan) < 1e-15 and totals["est_s_plan"] <= totals["est_s_all_ghost"]
    assert f"this plan {seconds(totals['est_s_plan'])}, all ghost {seconds(totals['est_s_all_ghost'])}" in text


def test_a_budget_too_small_for_explicit_says_so_and_the_batch_it_allows():
    model = nn.Conv1d(3, 4, 3)  # many positions, few channels: explicit is faster
    x = torch.randn(4, 3, 64)
    dp, records = planned(model, x)
    w = record(records, "weight")
    assert (w["mode"], w["decided_by"]) == ("explicit", "fastest within budget")
    assert w["est_explicit_s"] < w["est_ghost_s"] and f"explicit up to B={w['explicit_up_to']}" in w["why"]
    budget = dp.graph_module.meta[META_BUDGET]
    per_sample = budget.activation_bytes + budget.fixed_bytes + w["explicit_bytes"] // 4
    dp, records = planned(model, x, memory_budget=10 * per_sample)  # explicit for up to 10 samples
    w = record(records, "weight")
    assert w["explicit_up_to"] == 10 and (w["mode"], w["decided_by"]) == ("explicit", "fastest within budget")
    at16 = next(r for r in dp.plan(batch=16) if r["params"] == ["weight"])
    assert (at16["mode"], at16["mode_at_batch"], at16["decided_by"]) == ("ghost", "ghost", "explicit would exceed budget")
    assert at16["why"].startswith("explicit would exceed budget at B=16 (explicit up to B=10)")
    assert f"memory budget: {bkfx.tools.explain.human(10 * per_sample)}B (memory_budget=)" in dp.explain()


def test_numbers_at_another_batch_size():
    dp, _ = planned(nn.Linear(3, 2), torch.randn(4, 3))
    at16 = dp.plan(batch=16)
    assert {r["batch"] for r in at16} == {16}
    w = next(r for r in at16 if r["params"] == ["weight"])
    assert w["time_explicit_value"] == 2 * 16 * 3 * 2 and w["time_explicit"] == "12*B"
