"""The facts the compiler passes write into `node.meta` and `GraphModule.meta`, by key.

Each key belongs to the pass that writes it; later passes, the runtime rules, `explain`
and `graph` read it. One table, so that no reader spells a key by hand.
"""

# passes.capture, on the GraphModule
META_BATCH = "bkfx.batch_symbol"  # the sympy symbol of the batch size in every node's shapes
META_BATCH_DIMS = "bkfx.batch_dims"  # placeholder name -> its sample dimension

# passes.sample_dim, on every node
META_DEPENDENT = "bkfx.sample_dependent"  # the value depends on a batched input's data
META_LAYOUT = "bkfx._ir.layout"  # its SampleLayout (a tuple of them for multiple outputs), or None
META_IDENTITY = "bkfx.sample_identity"  # the value is its own sample index along its sample dimension
META_PROBE = "bkfx.probe"  # no sample rule: checked numerically at capture (passes.probe)

# passes.probe, on the GraphModule

# passes.annotate
META_PARAMS = "bkfx.params"  # on every node: names of the parameters its value is computed from
META_SITE = "bkfx.site"  # on a parametric node: its plan.Site
META_SITES = "bkfx.sites"  # on the GraphModule: every Site, in graph order

# passes.cost_model, on the GraphModule
META_BUDGET = "bkfx.budget"  # the plan.Budget the norm modes were chosen within
