"""bkfx's layers, checked on the imports themselves (parsed with `ast`, nothing imported).

A module imports only from its own layer or from below, and the module graph has no cycle:

    rank  layer      modules
    0     base       bkfx._ir, bkfx.errors,     the IR passes and runtime share, the error classes,
                     bkfx._torch                the one door to torch's private APIs
    1     rules      bkfx.rules                 gradient rules, factors, precision
    2     passes     passes                     the compiler      } side by side: neither
    2     runtime    bkfx._runtime              what a step runs  } imports the other
    3     training   bkfx.training              optimizer, data, accounting, checkpoints, ...
    4     tools      bkfx.tools                 explain and graph: read a compiled model's plan
    5     api        bkfx, bkfx.dpmodel, bkfx.privacy, bkfx.audit, bkfx.testing
    6     entry      bkfx.tools.cli, bkfx.integrations   users of the API: the command, adapters

An import that breaks the order is allowed only where EXCEPTIONS lists it with its reason.
"""
from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# module prefix -> (rank, layer); the longest matching prefix decides
LAYERS = {
    "bkfx._ir": (0, "base"),
    "bkfx.errors": (0, "base"),
    "bkfx._torch": (0, "base"),
    "bkfx.rules": (1, "rules"),
    "passes": (2, "passes"),
    "bkfx._runtime": (2, "runtime"),
    "bkfx.training": (3, "training"),
    "bkfx.tools": (4, "tools"),
    "bkfx": (5, "api"),
    "bkfx.dpmodel": (5, "api"),
    "bkfx.privacy": (5, "api"),
    "bkfx.audit": (5, "api"),
    "bkfx.testing": (5, "api"),
    "bkfx._moved": (5, "api"),
    "bkfx.tools.cli": (6, "entry"),
    "bkfx.integrations": (6, "entry"),
}

# (importer, imported) -> why this import may break the order (and is left out of the cycle check)
EXCEPTIONS = {
    ("passes", "bkfx"): "package bootstrap: `import bkfx` first, so that a pass imported on its own does not "
                        "find itself half-initialised inside bkfx/__init__ -> dpmodel -> passes; no name is used",
}


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("bkfx", "passes"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> tuple[int, str] | None:
    """The layer of the longest prefix in LAYERS; `bkfx` itself (the package's __init__) matches only itself."""
    best = max((p for p in LAYERS if module == p or (p != "bkfx" and module.startswith(p + "."))), key=len, default=None)
    return LAYERS[best] if best else None


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module of bkfx or passes, line) for every import statement, in functions too."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for a in node.names:
                out.append((f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source, node.lineno))
    return [(m, line) for m, line in out if m in MODULES and m != module]


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == []


def test_no_import_runs_up_or_across():
    bad = []
    for module, imports in GRAPH.items():
        rank, layer = _layer(module)
        for imported, line in imports:
            their_rank, their_layer = _layer(imported)
            ok = their_rank < rank or (their_rank == rank and their_layer == layer)
            if not ok and (module, imported) not in EXCEPTIONS:
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {module} ({layer}) imports {imported} "
                           f"({their_layer})")
    assert bad == [], "\n".join(bad)


def test_exceptions_are_still_needed():
    edges = {(m, i) for m, imports in GRAPH.items() for i, _ in imports}
    assert [e for e in EXCEPTIONS if e not in edges] == []


def test_no_cycles():
    edges = {m: sorted({i for i, _ in imports if (m, i) not in EXCEPTIONS}) for m, imports in GRAPH.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []


def test_public_modules_have_all():
    """A module whose path has no `_` part is API and says what it exports."""
    missing = []
    for module, path in MODULES.items():
        if any(part.startswith("_") for part in module.split(".")):
            continue
        tree = ast.parse(path.read_text())
        has_all = any(isinstance(t, ast.Name) and t.id == "__all__"
                      for n in tree.body if isinstance(n, ast.Assign) for t in n.targets)
        defines = any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body)
        if defines and not has_all:
            missing.append(module)
    assert missing == []


def test_old_public_module_paths_warn_and_are_the_same_module():
    import bkfx
    from bkfx._moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        bkfx.__dict__.pop(old.rpartition(".")[2], None)
        with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
            assert importlib.import_module(old) is importlib.import_module(new)
        bkfx.__dict__.pop(old.rpartition(".")[2], None)
        with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
            assert getattr(bkfx, old.rpartition(".")[2]) is importlib.import_module(new)
        assert importlib.import_module(new).__spec__.name == new


def test_bkfx_compile_is_the_function():
    import bkfx

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert callable(bkfx.compile) and bkfx.compile.__module__ == "bkfx.dpmodel"
