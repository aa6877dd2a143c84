"""bkfx's compiler passes: capture → sample_dim → probe → annotate → cost_model → rewrite.

Each pass is one module with one entry point that takes a GraphModule and either
returns a new one or writes facts into `node.meta` under its own key (`bkfx._ir.meta`).

The passes use the IR (`bkfx._ir.plan`, `bkfx._ir.layout`, `bkfx._ir.meta`, `bkfx._ir.node`, `bkfx._ir.source`)
and the rules (`bkfx.rules`), nothing of the runtime: the rewrite is handed the runtime's site
operation by `bkfx.compile`, the public entry point, which runs the passes.
"""
# Any `bkfx.*` import runs `bkfx/__init__`, which loads `bkfx.dpmodel` and through it every
# pass. Loading bkfx first, before a pass module starts, lets `from passes.capture import
# capture` work on its own instead of finding itself half-initialised inside that chain.
import bkfx  # noqa: F401
