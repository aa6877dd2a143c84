"""Where a graph node came from in the user's program."""
from __future__ import annotations

import os
import re

import torch

_TORCH_DIR = os.path.dirname(torch.__file__)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bkfx/_ir/source.py
_OWN_DIRS = tuple(_ROOT + os.sep + d for d in ("bkfx", "passes"))
_FRAME = re.compile(r'\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')


def _frames(trace: str) -> list[tuple[str, str, str, str]]:
    """(file, line, function, code) for each frame of a formatted stack trace."""
    frames, lines = [], trace.splitlines()
    for i, text in enumerate(lines):
        m = _FRAME.match(text)
        if m:
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            code = "" if _FRAME.match(lines[i + 1] if i + 1 < len(lines) else "") else nxt
            frames.append((m["file"], m["line"], m["func"], code))
    return frames


def user_source_line(node) -> str | None:
    """The innermost frame of `node`'s stack trace outside torch itself: 'file:line (func): code'."""
    trace = node.meta.get("stack_trace") if hasattr(node, "meta") else None
    frames = [f for f in _frames(trace or "") if not f[0].startswith((_TORCH_DIR, *_OWN_DIRS))]
    if not frames:
        return _module_description(node)
    file, line, func, code = frames[-1]
    return f"{file}:{line} ({func}): {code}" if code else f"{file}:{line} ({func})"


def _module_description(node) -> str | None:
    """For code that lives in torch itself (nn.Sequential of built-in layers): the module."""
    stack = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
    return f"module '{path}' ({kind}), built-in code"


def module_path(node) -> str:
    """The dotted path of the innermost nn.Module that created `node`, '' for the root."""
    stack = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
    if not stack:
        return ""
    return list(stack.values())[-1][0]
