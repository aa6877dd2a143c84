"""bkfx's compiler passes: capture → sample_dim → probe → annotate → cost_model → rewrite.

Each pass is one module with one entry point that takes a GraphModule and either
returns a new one or writes facts into `node.meta` under its own key (`bkfx.meta`).

The passes use the runtime's data types (`bkfx.plan`, `bkfx.layout`, `bkfx.meta`,
`bkfx.node`) and its rules; the runtime imports no pass, except its public entry point
`bkfx.compile`, which runs them.
"""
# Any `bkfx.*` import runs `bkfx/__init__`, which loads `bkfx.dpmodel` and through it every
# pass. Loading bkfx first, before a pass module starts, lets `from passes.capture import
# capture` work on its own instead of finding itself half-initialised inside that chain.
import bkfx  # noqa: F401
