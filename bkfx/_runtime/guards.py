"""Guards: the Python state a capture read, checked cheaply on every call.

torch.export runs the forward's Python once and bakes what it read into the graph: the
modules, parameters and buffers, and every Python value on the way (a slice length, a
dropout rate, a tensor attribute, a list of flags, a function stored as an attribute, a
module-level constant, the hooks, the forward itself). A change to any of them afterwards
would leave the old capture running. torch.compile stays sound because dynamo guards every
value it read; bkfx gets the same property without listing attribute kinds: a generic walk
of all the Python state reachable from the model that a forward can read (`_Walk`):

- every module in the tree: its whole instance `__dict__` (parameters, buffers, submodules,
  the forward and backward hook dicts, every other attribute, walked generically), the
  training flags aside (a capture is made per combination of modes, like per input
  signature); on its class and every class of its MRO up to the one defining it, each name a
  call looks up (`forward`, `__call__`, ...) and each name its forward's code reads
  (`self.helper`, a class attribute): a method patched on the class, or an override added;
- values, generically: plain values by value and type; tensors that are not parameters or
  buffers by identity, metadata and version counter (an in-place change); lists, dicts, sets
  and tuples recursively; functions by identity, code, defaults and closure cells; bound
  methods and partials by their parts; objects of user classes (a Hugging Face config) by
  their `__dict__`;
- the module-level globals that the code of every user forward names (`co_names`, also of
  nested code), and, transitively, of the user functions, methods and autograd Functions it
  names, within bounds; torch's global module hooks (`torch.nn.modules.module._global_*`).

The walk yields a *fingerprint* (label -> value, compared by value at a change) and *watch
lists* that one call checks cheaply (`ModelGuard.check`): every watched container against a
shallow copy (`copies == containers`, one C-level comparison in which identical values cost a
pointer test; the empty ones, most hook dicts, with one `any`), and, read with C-level `map`s,
the identities of what `==` cannot tell apart (a tensor, a config with its own `__eq__`), the
types of numbers (`1 == 1.0 == True`), the globals and class attributes read by name, the
version counters, functions' code, defaults and closures, and the parameters' `requires_grad`,
dtype, device and shape. The walk holds every object it names, so no new object can take a
watched one's id. When the cheap check differs, a new walk is compared with the capture's
fingerprint: equal values (an int recomputed, a dict replaced by an equal one) keep the
capture; a difference means it is stale, and the DP model captures again, saying what changed.
A forward that assigns the state it reads while it is traced is refused (`watching_the_trace`).
Limits (what is not seen) are in docs/guards.md.
"""
from __future__ import annotations

import contextlib
import copy
import dis
import enum
import functools
import itertools
import operator
import sys
import types
from collections import deque

import torch

from bkfx._torch import OpOverload, OpOverloadPacket, global_module_hooks

_MISSING = object()

# -- what a value is ----------------------------------------------------------------------------
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
          torch.memory_format, torch.Size, range, slice, type(Ellipsis))
_OPAQUE = (types.ModuleType, type, types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodWrapperType,
           types.WrapperDescriptorType, types.MethodDescriptorType, types.GetSetDescriptorType, property,
           staticmethod, classmethod, OpOverload, OpOverloadPacket)
# Libraries whose own Python state is not the model's: their code is not walked for globals.
_LIBRARIES = frozenset(sys.stdlib_module_names) | {
    "torch", "torchvision", "functorch", "bkfx", "passes", "numpy", "sympy", "builtins", "typing_extensions",
    "opacus", "_pytest", "pytest", "hypothesis", "pluggy", "importlib_metadata", "six"}
_DEPTH = 8  # containers nested deeper are compared by identity only
_FUNCTIONS = 2000  # user functions whose code is read for globals, at most
_CODE_DEPTH = 6  # calls deep from a forward
_TRAINING = operator.attrgetter("training")
_VERSION = operator.attrgetter("_version")
_FUNCTION_STATE = operator.attrgetter("__code__", "__defaults__", "__kwdefaults__", "__closure__")
_CELL = operator.attrgetter("cell_contents")
_PARAMETER_STATE = operator.attrgetter("requires_grad", "dtype", "device", "shape")
_BUFFER_STATE = operator.attrgetter("dtype", "device", "shape")
_GLOBAL_HOOKS = global_module_hooks()


def _is_plain(value) -> bool:
    return type(value) in _PLAIN or isinstance(value, enum.Enum)


def _library(globals_: dict) -> bool:
    return str(globals_.get("__name__", "builtins")).partition(".")[0] in _LIBRARIES


def _user_class(cls: type) -> bool:
    return cls.__module__.partition(".")[0] not in _LIBRARIES


class _Plain:
    """A plain value: equal when of the same type and equal (2 and 2.0 differ in a trace)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return type(other) is _Plain and type(self.value) is type(other.value) and self.value == other.value

    def __repr__(self):
        return repr(self.value)


class _Same:
    """An object compared by identity (a function, a class, a submodule, an opaque object)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return type(other) is _Same and self.obj is other.obj

    def __repr__(self):
        if self.obj is _MISSING:
            return "not defined"
        name = getattr(self.obj, "__qualname__", None) or getattr(self.obj, "__name__", None)
        return f"{type(self.obj).__name__} {name}" if name else f"a {type(self.obj).__name__} object"


class _Tensor:
    """A tensor by identity and metadata; `version` (its in-place changes) unless it is a
    parameter or buffer, whose values are the graph's inputs."""

    __slots__ = ("obj", "meta", "version")

    def __init__(self, t: torch.Tensor, input_: bool):
        self.obj = t
        self.meta = (t.requires_grad, t.dtype, t.device, tuple(t.shape))
        self.version = None if input_ else t._version

    def __eq__(self, other):
        return type(other) is _Tensor and self.obj is other.obj and self.meta == other.meta \
            and self.version == other.version

    def change(self, other: "_Tensor") -> str:
        if self.obj is not other.obj:
            return "was replaced"
        for name, a, b in zip(("requires_grad", "dtype", "device", "shape"), self.meta, other.meta):
            if a != b:
                return f"now has {name}={b}"
        return "was modified in place"

    def __repr__(self):
        return f"a tensor of shape {list(self.meta[3])}, {self.meta[1]}"


def _render(fp) -> str:
    """A fingerprint in the user's terms: `{'a': [1, 2]}`, `function relu`, `a tensor of shape [3]`."""
    if type(fp) is tuple and len(fp) == 2 and isinstance(fp[0], type) and type(fp[1]) is tuple:
        kind, items = fp
        if issubclass(kind, dict):
            return "{" + ", ".join(f"{k!r}: {_render(v)}" for k, v in items) + "}"
        inner = ", ".join(map(_render, items))
        return f"[{inner}]" if issubclass(kind, (list, deque)) else f"({inner}{',' if len(items) == 1 else ''})" \
            if issubclass(kind, tuple) else f"{{{inner}}}"
    if type(fp) is tuple and fp and fp[0] in ("function", "method", "partial", "object"):
        return f"{fp[0]} {fp[1].obj.__qualname__ if fp[0] in ('function', 'object') else _render(fp[1])}"
    if type(fp) is tuple and fp and fp[0] == "same as":
        return f"the same object as {fp[1]}"
    return repr(fp)


def _show(value) -> str:
    text = _render(value)
    return text if len(text) <= 100 else text[:97] + "..."


# -- the walk -----------------------------------------------------------------------------------
# torch's per-module containers: the hook dicts a call reads, watched; bookkeeping that changes
# only together with a watched hook dict, compared at a change; what no forward reads, skipped.
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_is_full_backward_hook")
_NOT_READ = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
             "_load_state_dict_post_hooks", "_non_persistent_buffers_set")
_NUMBERS = (bool, int, float, complex)
# what a call of a module looks up on its class whatever its forward names
_CALLED = ("forward", "__call__", "_call_impl", "_wrapped_call_impl", "__getattr__")
_FUNCTION_METHODS = ("forward", "backward", "setup_context", "jvp", "vmap", "apply")
_CONTAINERS = (dict, list, set, frozenset, tuple, deque)


def _copy(container):
    return copy.copy(container)


class _Walk:
    """One walk of the state reachable from `model`: `entries` (label -> fingerprint value)
    and the watch lists that `matches()` reads on every call."""

    def __init__(self, model: torch.nn.Module):
        self.entries: dict[str, object] = {}
        self.containers: list = []  # dicts, lists, sets, class dicts: compared with a copy
        self.identities: tuple[list, list] = ([], [])  # (owner, key) whose value `==` cannot tell apart
        self.numbers: tuple[list, list] = ([], [])  # (owner, key) of numbers: `1 == 1.0 == True`, types differ
        self.globals: tuple[list, list] = ([], [])  # (globals dict, name) a user forward reads
        self.class_names: tuple[list, list] = ([], [])  # (class dict, name): the methods and class attributes named
        self.tensors: list = []  # tensors that are not parameters or buffers: version counters
        self.functions: list = []  # code, defaults, closures
        self.closure_cells: list = []
        self.parameters: list = []
        self.buffers: list = []
        self.plain: list = []  # (label, owner dict, key): the PlainAttributes
        self.held: list = []  # every object whose id a watch list names
        self._seen: dict[int, str] = {}
        self._codes: set = set()
        self._global_keys: set = set()
        self._class_keys: set = set()
        self._n_functions = 0

        named = list(model.named_modules(remove_duplicate=True))
        self.modules = [m for _, m in named]
        self._paths = {id(m): path for path, m in named}
        self._inputs = {id(t) for t in itertools.chain(model.parameters(), model.buffers())}
        for path, module in named:
            self._module(path, module, tree=True)
        for name in sorted(k for k in _GLOBAL_HOOKS if k.startswith("_global_")):
            self._global(_GLOBAL_HOOKS, name, 0)
        self.held.extend(self.modules)
        self._ids = self._identities()

    # the state read on every call ------------------------------------------------------
    def copies(self) -> tuple[list, list, list]:
        """(the empty containers, the others, copies of the others): most containers (hook dicts,
        a leaf's submodules) are empty, and `any` over them is the cheapest check there is."""
        empty = [c for c in self.containers if not len(c)]
        filled = [c for c in self.containers if len(c)]
        return empty, filled, [_copy(c) for c in filled]

    def _identities(self) -> tuple:
        """Identities, types and versions that a container's `==` does not see, in C-level loops."""
        identities, numbers, globals_ = self.identities, self.numbers, self.globals
        return (
            tuple(map(id, map(operator.getitem, *identities))),
            tuple(map(type, map(operator.getitem, *numbers))),
            tuple(map(id, map(dict.get, *globals_, itertools.repeat(_MISSING)))),
            tuple(map(id, map(types.MappingProxyType.get, *self.class_names, itertools.repeat(_MISSING)))),
            tuple(map(_FUNCTION_STATE, self.functions)),  # code, defaults and closures (identical, or equal)
            tuple(map(id, map(_CELL, self.closure_cells))),
            tuple(map(_VERSION, self.tensors)),
            tuple(map(_PARAMETER_STATE, self.parameters)), tuple(map(_BUFFER_STATE, self.buffers)),
        )

    def matches(self, copies: tuple[list, list, list]) -> bool:
        """Whether nothing watched changed since `copies` (of this walk's containers) were made."""
        empty, filled, copied = copies
        try:  # a container equal to its copy, value by value: identical values compare in C
            return not any(empty) and copied == filled and self._identities() == self._ids
        except Exception:  # a value's `==` that cannot answer (a tensor's) or a missing key: compare exactly
            return False

    def modes(self) -> tuple:
        return tuple(map(_TRAINING, self.modules))

    # modules ----------------------------------------------------------------------------
    def _module(self, path: str, module: torch.nn.Module, tree: bool) -> None:
        self._seen[id(module)] = f"module '{path}'"
        prefix = f"{path}." if path else ""
        self._class(type(module), _CALLED)
        attributes = vars(module)
        self._watch(attributes)
        torch_class = type(module).__module__.partition(".")[0] == "torch"
        for key, value in attributes.items():
            if key == "training" or key in _NOT_READ:  # the modes: a capture per combination, not a change
                continue
            if key in ("_parameters", "_buffers") and type(value) is dict:
                self._watch(value)
                kind = "parameter" if key == "_parameters" else "buffer"
                for name, t in value.items():
                    if t is not None:
                        (self.parameters if kind == "parameter" else self.buffers).append(t)
                        self._identity(value, name)
                    self.entries[f"{kind} {prefix}{name}"] = _Same(None) if t is None else _Tensor(t, True)
            elif key == "_modules" and type(value) is dict:
                self._watch(value)
                for name, sub in value.items():
                    self.entries[f"submodule {prefix}{name}"] = _Same(sub)
            elif torch_class and key.startswith("_") and key not in _HOOKS:
                continue  # torch's own modules' private caches (RNN's _flat_weights), derived from the parameters above
            elif key in _HOOK_FLAGS:
                self.entries[f"{key.strip('_').replace('_', ' ')} of module '{path}'"] = _Plain(
                    tuple(value.items()) if isinstance(value, dict) else value)
            else:
                label = f"{key.strip('_').replace('_', ' ')} of module '{path}'" if key in _HOOKS \
                    else f"attribute {prefix}{key}"
                self.entries[label] = self._value(value, label, 0, attributes, key)
                if tree and (type(value) in (bool, int, float, str, type(None)) or type(value) is tuple and all(
                        type(v) in (bool, int, float, str, type(None)) for v in value)):
                    self.plain.append((f"{prefix}{key}", attributes, key))
        forward = attributes.get("forward", getattr(type(module), "forward", None))
        self._reads(forward, type(module), 0)

    def _class(self, cls: type, names) -> None:
        """Watch `names` on `cls`: in the dict of every class of its MRO up to the one that
        defines each (a method patched on the class, or an override added to a subclass)."""
        mro = cls.__mro__[:-1]  # object's dict is not the model's
        for name in names:
            upto = next((i for i, c in enumerate(mro) if name in vars(c)), None)
            for c in mro[:upto + 1] if upto is not None else ():
                if (id(c), name) in self._class_keys:
                    continue
                self._class_keys.add((id(c), name))
                attributes = vars(c)
                self.class_names[0].append(attributes)
                self.class_names[1].append(name)
                self.held.append(c)
                value = attributes.get(name, _MISSING)
                label = f"class {c.__module__}.{c.__qualname__}: {name}"
                self.entries[label] = _Same(value) if value is _MISSING or isinstance(value, types.FunctionType) \
                    else self._value(value, label, 1)

    # code: the globals a forward reads ------------------------------------------------------
    def _reads(self, fn, owner: type | None, depth: int) -> None:
        """Watch the globals that `fn`'s code names, and the methods of `owner` (and of the
        user classes it names) that it names, transitively through user code, within bounds."""
        fn = getattr(fn, "__func__", fn)
        if not isinstance(fn, types.FunctionType) or _library(fn.__globals__):
            return
        code = fn.__code__
        if (code, owner) in self._codes or self._n_functions >= _FUNCTIONS or depth > _CODE_DEPTH:
            return
        self._codes.add((code, owner))
        self._n_functions += 1
        names = _names(code)
        loaded = _global_loads(code)
        globals_ = fn.__globals__
        classes = [owner] if owner is not None else []
        for name in loaded:
            if name not in globals_:
                continue
            self._global(globals_, name, depth + 1)
            value = globals_[name]
            if isinstance(value, types.ModuleType) and not _library(vars(value)):
                for attribute in names:  # `config.SCALE` through a user module
                    if attribute in vars(value):
                        self._global(vars(value), attribute, depth + 1)
            elif isinstance(value, type) and _user_class(value):
                classes.append(value)
                if issubclass(value, torch.autograd.Function):  # called by autograd, not by name
                    self._class(value, _FUNCTION_METHODS)
                    for method in _FUNCTION_METHODS:
                        self._reads(getattr(value, method, None), value, depth + 1)
        for cls in classes:  # `self.helper(x)`, `self.scale`, `Helper.apply(x)`: what the code names on a class
            self._class(cls, names)
            for name in names:
                self._reads(next((vars(c)[name] for c in cls.__mro__[:-1] if name in vars(c)), None), cls, depth + 1)

    def _global(self, globals_: dict, name: str, depth: int) -> None:
        if (id(globals_), name) in self._global_keys:
            return
        self._global_keys.add((id(globals_), name))
        self.globals[0].append(globals_)
        self.globals[1].append(name)
        self.held.append(globals_)
        label = f"global {globals_.get('__name__', '?')}.{name}"
        self.entries[label] = self._value(globals_[name], label, depth)

    # values -------------------------------------------------------------------------------
    def _value(self, value, label: str, depth: int, owner=None, key=None):
        """`value`'s fingerprint; registers what a call must watch to see it change (`owner[key]`
        is where it is held, when in a watched container)."""
        if _is_plain(value):
            if isinstance(value, _NUMBERS) and owner is not None:
                self.numbers[0].append(owner)
                self.numbers[1].append(key)
            return _Plain(value)
        if owner is not None and type(value).__eq__ is not object.__eq__ and not isinstance(value, _CONTAINERS):
            self._identity(owner, key)  # `==` would call an equal new one the same (containers: compared deeply)
        if isinstance(value, torch.Tensor):
            if id(value) not in self._inputs:
                self.tensors.append(value)
            self.held.append(value)
            return _Tensor(value, id(value) in self._inputs)
        if isinstance(value, _OPAQUE) or depth > _DEPTH:
            return _Same(value)
        seen = self._seen.get(id(value))
        if seen is not None:
            return ("same as", seen)
        self._seen[id(value)] = label
        self.held.append(value)
        if isinstance(value, torch.nn.Module):
            if id(value) not in self._paths:  # a module outside the tree (in a plain list): walked like one
                self._module(label, value, tree=False)
            return _Same(value)
        if isinstance(value, dict):
            self._watch(value)
            return (type(value), tuple((k, self._value(v, f"{label}[{k!r}]", depth + 1, value, k))
                                       for k, v in value.items()))
        if isinstance(value, (list, deque)):
            self._watch(value)
            return (type(value), tuple(self._value(v, f"{label}[{i}]", depth + 1, value, i)
                                       for i, v in enumerate(value)))
        if isinstance(value, (set, frozenset)):
            if isinstance(value, set):
                self._watch(value)
            return (type(value), tuple(self._value(v, f"{label} item", depth + 1) for v in value))
        if isinstance(value, tuple):
            return (type(value), tuple(self._value(v, f"{label}[{i}]", depth + 1) for i, v in enumerate(value)))
        if isinstance(value, types.FunctionType):
            self.functions.append(value)
            self._reads(value, None, depth)
            cells = ()
            for cell in value.__closure__ or ():
                try:
                    contents = cell.cell_contents
                except ValueError:  # not yet bound: watched through __closure__'s identity only
                    continue
                self.closure_cells.append(cell)
                cells += (self._value(contents, f"{label} closure", depth + 1),)
            defaults = self._value((value.__defaults__, value.__kwdefaults__), f"{label} defaults", depth + 1)
            return ("function", _Same(value), defaults, cells)
        if isinstance(value, types.MethodType):
            return ("method", self._value(value.__func__, label, depth + 1), self._value(value.__self__, label, depth + 1))
        if isinstance(value, functools.partial):
            return ("partial", self._value(value.func, label, depth + 1),
                    self._value((value.args, value.keywords), label, depth + 1))
        if _user_class(type(value)) and isinstance(getattr(value, "__dict__", None), dict):
            self._class(type(value), ("__call__",))
            self._reads(getattr(type(value), "__call__", None), type(value), depth)
            attributes = vars(value)
            self._watch(attributes)
            return ("object", _Same(type(value)),
                    tuple((k, self._value(v, f"{label}.{k}", depth + 1, attributes, k)) for k, v in attributes.items()))
        return _Same(value)

    def _watch(self, container) -> None:
        self.containers.append(container)
        self.held.append(container)

    def _identity(self, owner, key) -> None:
        self.identities[0].append(owner)
        self.identities[1].append(key)


def _names(code: types.CodeType) -> list[str]:
    """The names `code` and the code nested in it (lambdas, comprehensions, inner functions) read."""
    names, stack = [], [code]
    while stack:
        c = stack.pop()
        names.extend(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return list(dict.fromkeys(names))


def _global_loads(code: types.CodeType) -> list[str]:
    """The global names `code` (and the code nested in it) loads: `self.norm` names the attribute
    `norm`, not the module-level `norm` a `from scipy.stats import norm` binds."""
    names, stack = [], [code]
    while stack:
        c = stack.pop()
        names.extend(i.argval for i in dis.get_instructions(c) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME"))
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return list(dict.fromkeys(names))


# -- the public pieces ------------------------------------------------------------------------
class PlainAttributes:
    """Every plain attribute of the model's modules and of the configs they hold (an object with
    `to_json_string`, as Hugging Face's): their names, and their present values read in one
    C-level loop. The torch.compile operator's architecture key is made of them."""

    def __init__(self, walk: _Walk):
        self.labels, self._dicts, self._keys = [], [], []
        configs = {}
        for label, owner, key in walk.plain:
            self._add(label, owner, key)
        for path, module in zip(walk._paths.values(), walk.modules):
            for key, value in vars(module).items():
                if hasattr(type(value), "to_json_string") and id(value) not in configs:
                    configs[id(value)] = (f"{path}.{key}" if path else key, value)
        for label, config in configs.values():
            for key, value in vars(config).items():
                if type(value) in (bool, int, float, str, type(None)) or (
                        type(value) is tuple and all(type(v) in (bool, int, float, str, type(None)) for v in value)):
                    self._add(f"{label}.{key}", vars(config), key)

    def _add(self, label: str, owner: dict, key: str) -> None:
        self.labels.append(label)
        self._dicts.append(owner)
        self._keys.append(key)

    def values(self) -> tuple:
        return tuple(map(dict.get, self._dicts, self._keys, itertools.repeat(_MISSING)))


class ModelGuard:
    """What a capture of `model` read (`_Walk`), and the cheap check of it on every call."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._walk = _Walk(model)
        self.attributes = PlainAttributes(self._walk)
        self._copies = {self._walk.modes(): self._walk.copies()}  # per combination of training flags
        self._changed: _Walk | None = None

    def check(self) -> tuple | None:
        """None when anything the capture read changed; else every module's training flag (a
        capture is made per combination of modes, like per input signature)."""
        modes = self._walk.modes()
        copies = self._copies.get(modes)
        if copies is not None and self._walk.matches(copies):
            return modes
        return modes if self._revalidate() else None

    def _revalidate(self) -> bool:
        """Something cheap changed (a mode, an identity, a version): walk again and compare the
        values. Equal values keep the capture, watching the objects that hold them now."""
        walk = _Walk(self.model)
        if walk.entries != self._walk.entries:
            self._changed = walk
            return False
        if len(walk.containers) != len(self._walk.containers) or not all(
                map(operator.is_, walk.containers, self._walk.containers)):
            self._copies = {}  # equal values in new objects: the copies of other modes are of the old ones
        self._walk = walk
        self._copies[walk.modes()] = walk.copies()
        return True

    def changed_since(self) -> str | None:
        """What changed since this snapshot, or None (after a capture: what the capture's own
        run of the forward changed)."""
        return None if self._revalidate() else self.describe_change()

    @contextlib.contextmanager
    def watching_the_trace(self):
        """While torch.export traces the model: the values the forward assigned to the state it
        reads, seen at the end of its run (export restores module attributes after its trace,
        so a counter the forward increments would otherwise run frozen at its traced value).
        Yields a list that holds the description, if any."""
        changes: list[str] = []

        def after_forward(module, args, output):
            walk = _Walk(self.model)  # during the trace: parameters are export's, hooks and patches its own
            was = {k: v for k, v in self._walk.entries.items() if k.startswith(("attribute ", "global "))
                   and not k.startswith("global torch.") and k in walk.entries}
            change = _difference(was, {k: walk.entries[k] for k in was})
            if change:
                changes.append(change)

        handle = self.model.register_forward_hook(after_forward, always_call=True)
        try:
            yield changes
        finally:
            handle.remove()

    def describe_change(self) -> str:
        """What differs from the snapshot, in words."""
        walk = self._changed or _Walk(self.model)
        return _difference(self._walk.entries, walk.entries) or "a training flag changed"


def _difference(was: dict, now: dict, most: int = 6) -> str:
    lines = []
    for label in [*was, *(k for k in now if k not in was)]:
        a, b = was.get(label, _MISSING), now.get(label, _MISSING)
        read = label.startswith(("global", "class"))  # present when some code names it
        if a is _MISSING:
            lines.append(f"{label} is now read" if read else f"{label} was added")
        elif b is _MISSING:
            lines.append(f"{label} is no longer read" if read else f"{label} was deleted")
        elif isinstance(a, _Tensor) and isinstance(b, _Tensor):
            if a != b:
                lines.append(f"{label} {a.change(b)}")
        elif isinstance(a, _Same) and isinstance(b, _Same) and label.startswith(("submodule", "parameter", "buffer")):
            if a != b:
                lines.append(f"{label} was {'removed' if b.obj is None else 'added' if a.obj is None else 'replaced'}")
        elif a != b:
            lines.append(f"{label} was {_show(a)}, now {_show(b)}")
    more = f"; and {len(lines) - most} more" if len(lines) > most else ""
    return "; ".join(lines[:most]) + more
