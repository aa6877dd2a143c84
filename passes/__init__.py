"""bkfx's compiler passes: capture → sample_dim → annotate → cost_model → rewrite.

Each pass is one module with one entry point that takes a GraphModule and either
returns a new one or writes facts into `node.meta` under its own key.
"""
