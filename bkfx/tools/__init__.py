"""Looking at a compiled model (public modules).

`explain` (the plan as a table and as records), `graph` (the rewritten graph as networkx, DOT,
a picture), `cli` (the `bkfx` command).
"""
