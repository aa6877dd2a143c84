"""cost_model: ghost or explicit norm per site, from symbolic costs.

Each rule states the extra time and memory of both modes for its factored operands
(dense: ghost `B T² (m+n+1)` time and `2 B T²` memory for the Gram matrices; explicit
`2 B m n` time and `B m n` memory for the per-sample gradients, which stay alive until
the clip factors are known). The site is ghost iff its ghost memory is at most its
explicit memory — for a linear layer `2 T² <= p d`, fastDP's rule — since per-sample
gradients of every layer at once are what makes DP training run out of memory; both
costs are reported. The batch size B divides out; when the difference still depends on
a dynamic size the decision becomes a guard that the runtime evaluates with the actual
sizes. `norm_mode` ("ghost" / "explicit", or a dict from site node name or parameter
name to a mode) overrides the choice.
"""
from __future__ import annotations

import sympy
from torch.fx import GraphModule

from bkfx.plan import Site
from passes.capture import META_BATCH

MODES = ("auto", "ghost", "explicit")


def cost_model(gm: GraphModule, norm_mode="auto") -> GraphModule:
    batch = gm.meta[META_BATCH]
    for site in gm.meta["bkfx.sites"]:
        _decide(site, batch, norm_mode)
    return gm


def _override(site: Site, norm_mode) -> str | None:
    if isinstance(norm_mode, str):
        return None if norm_mode == "auto" else norm_mode
    for key in (site.node, *site.params):
        if key in norm_mode:
            return norm_mode[key]
    return None


def _decide(site: Site, batch: sympy.Symbol, norm_mode) -> None:
    factored = [o.spec for o in site.operands if o.spec.kind == "factored"]
    if not factored:
        site.mode = "explicit"
        site.reason = "explicit rule" if all(o.rule.name != "Fallback" for o in site.operands) else "fallback (vmap of vjp)"
        return
    ghost = sum(s.mem_ghost for s in factored)
    explicit = sum(s.mem_explicit for s in factored)
    forced = _override(site, norm_mode)
    if forced is not None:
        if forced not in ("ghost", "explicit"):
            raise ValueError(f"norm_mode for site {site.node} must be 'ghost' or 'explicit', got {forced!r}")
        site.mode, site.reason = forced, "user override"
        return
    margin = sympy.simplify((explicit - ghost) / batch)
    if margin.free_symbols:
        site.mode, site.guard = "guard", margin
        site.reason = f"run-time guard: ghost iff {margin} >= 0"
        return
    site.mode = "ghost" if margin >= 0 else "explicit"
    g, e = sympy.simplify(ghost / batch), sympy.simplify(explicit / batch)
    site.reason = f"memory: ghost B*{g} {'<=' if margin >= 0 else '>'} explicit B*{e}"
