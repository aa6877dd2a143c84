"""bkfx's IR, internal: what the compiler passes write and the runtime reads.

`plan` (sites, operands, decisions), `layout` (where the sample dimension is), `meta` (the keys
under which passes write into `node.meta`), `node` (reading an fx node), `source` (the user's
source line of a node). Imports nothing else of bkfx but `bkfx.errors`.
"""
