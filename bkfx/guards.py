"""Guards: what a capture assumed about the model, checked cheaply on every call.

A capture is valid for the modules, parameters and buffers it saw: their identity, each
parameter's `requires_grad`, every tensor's dtype and device, and each module's training
flag. `ModelGuard.check()` compares the model's present state with the snapshot taken
at capture (object identities are held, so an id cannot be reused by a new object), like
torch.compile's guards: a change means the capture is stale (a replaced submodule would
keep running the old weights; a parameter unfrozen after capture would get its plain,
unclipped gradient), so the compiled model captures again.
"""
from __future__ import annotations

import torch


def _state(modules: list) -> tuple[tuple, tuple]:
    """(the tree, parameters and buffers; every module's training flag) of the snapshot's
    modules: a module added or replaced anywhere shows in its parent's `_modules`."""
    out, modes = [], []
    for module in modules:
        modes.append(module.training)
        for name, p in module._parameters.items():
            out.append((name, id(p)) if p is None else (name, id(p), p.requires_grad, p.dtype, p.device, p.shape))
        for name, b in module._buffers.items():
            out.append((name, id(b)) if b is None else (name, id(b), b.dtype, b.device, b.shape))
        out.append(tuple((name, id(m)) for name, m in module._modules.items()))
    return tuple(out), tuple(modes)


class ModelGuard:
    """A snapshot of `model`'s module tree, parameters and buffers."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        # hold every object whose id the snapshot names, so no new object can take its id
        self._held = [*model.modules(), *model.parameters(), *model.buffers()]
        self._params = dict(model.named_parameters())
        self._flags = {n: p.requires_grad for n, p in self._params.items()}
        self._modules = list(model.modules())
        self._state, _ = _state(self._modules)

    def check(self) -> tuple | None:
        """None when the model's tree, parameters or buffers changed; else every module's
        training flag (a capture is made per combination of modes, like per input signature)."""
        state, modes = _state(self._modules)
        return modes if state == self._state else None

    def describe_change(self) -> str:
        """What differs from the snapshot, in words."""
        now = dict(self.model.named_parameters())
        lines = []
        for name in sorted(set(self._params) | set(now)):
            a, b = self._params.get(name), now.get(name)
            if a is None or b is None or a is not b:
                lines.append(f"parameter {name} was {'added' if a is None else 'removed' if b is None else 'replaced'}")
            elif b.requires_grad != self._flags[name]:
                lines.append(f"parameter {name} now has requires_grad={b.requires_grad}")
        return "; ".join(lines) or "a module, buffer, dtype, device or training flag changed"
