"""The live compiled models, internal: which `DPModel`s exist now, so that a `DPOptimizer` given
only an optimizer finds the compiled model whose parameters it steps (the runtime holds the
registry so that training need not import the API that fills it).
"""
from __future__ import annotations

import weakref

_COMPILED: weakref.WeakSet = weakref.WeakSet()  # every live compiled model (DPOptimizer finds its own)


def compiled_models_of(params) -> list:
    """The live compiled models any of `params` belongs to."""
    ids = {id(p) for p in params}
    return [m for m in list(_COMPILED) if any(id(p) in ids for p in m.module.parameters())
            or (m.shards is not None and any(id(p) in ids for p in m.shards.sharded.values()))]
