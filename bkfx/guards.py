"""Guards: what a capture assumed about the model, checked cheaply on every call.

A capture is valid for the modules, parameters and buffers it saw: their identity, each
parameter's `requires_grad`, every tensor's dtype and device, each module's training flag,
and the plain Python attributes the forward may read (numbers, strings, flags and tuples of
them on every module and on a Hugging Face config): the capture bakes them in, so a slice
length or a dropout rate changed afterwards would otherwise be ignored. `ModelGuard.check()`
compares the model's present state with the snapshot taken at capture (object identities
are held, so an id cannot be reused by a new object), like torch.compile's guards: a change
means the capture is stale (a replaced submodule would keep running the old weights; a
parameter unfrozen after capture would get its plain, unclipped gradient), so the compiled
model captures again.
"""
from __future__ import annotations

import itertools

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


_PLAIN = (bool, int, float, str, type(None))
_MISSING = object()


def _plain(value) -> bool:
    return type(value) in _PLAIN or (type(value) is tuple and all(type(v) in _PLAIN for v in value))


class PlainAttributes:
    """Every plain attribute of the model's modules and of the configs they hold (an object with
    `to_json_string`, as Hugging Face's): their names, and their present values read in one
    C-level loop (hundreds of them on a Hugging Face model, read on every call)."""

    def __init__(self, model: torch.nn.Module):
        self.labels, self._dicts, self._keys = [], [], []
        configs = {}
        for prefix, module in model.named_modules():
            for key, value in vars(module).items():
                if key == "training":  # the modes: a capture per combination, not a change
                    continue
                if _plain(value):
                    self._add(f"{prefix}.{key}" if prefix else key, module, key)
                elif hasattr(type(value), "to_json_string") and id(value) not in configs:
                    configs[id(value)] = (f"{prefix}.{key}" if prefix else key, value)
        for label, config in configs.values():
            for key, value in vars(config).items():
                if _plain(value):
                    self._add(f"{label}.{key}", config, key)

    def _add(self, label: str, owner, key: str) -> None:
        self.labels.append(label)
        self._dicts.append(vars(owner))
        self._keys.append(key)

    def values(self) -> tuple:
        return tuple(map(dict.get, self._dicts, self._keys, itertools.repeat(_MISSING)))


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
        self.attributes = PlainAttributes(model)
        self._values = self.attributes.values()

    def check(self) -> tuple | None:
        """None when the model's tree, parameters or buffers changed; else every module's
        training flag (a capture is made per combination of modes, like per input signature)."""
        state, modes = _state(self._modules)
        return modes if state == self._state and self.attributes.values() == self._values else None

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
        for label, was, now in zip(self.attributes.labels, self._values, self.attributes.values()):
            if was is not now and was != now:
                lines.append(f"attribute {label} was {was!r}, now {'deleted' if now is _MISSING else repr(now)}")
        return "; ".join(lines) or "a module, buffer, dtype, device or training flag changed"
