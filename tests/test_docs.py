"""The documentation runs: every ```python block of README.md and docs/*.md is executed, in order,
one namespace per page (a page's later blocks use what its first ones built), in a temporary
working directory. A block that cannot run here (it needs several processes or a GPU, or is a
fragment) is preceded by `<!-- not-run: the reason -->`; such blocks must still parse, must say
why, and stay few. Also: docs/ops.md is the output of docs/gen_ops_table.py, the README stays a
front page, and the README's and docs' relative links point at files that exist."""
from __future__ import annotations

import glob
import importlib.util
import os
import re
from dataclasses import dataclass

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
NOT_RUN = re.compile(r"^<!--\s*not-run:(.*)-->\s*$")
MAX_NOT_RUN = 8  # across all pages: a block that does not run is a block nobody checks
README_MAX_LINES = 250
# pages written on other branches, linked from the index before they are merged
PENDING: set = set()


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    not_run: str | None  # the reason given, or None for a block that runs


def blocks(path: str) -> list[Block]:
    """The ```python blocks of a Markdown file, each with the not-run reason written just before it."""
    lines = open(path, encoding="utf-8").read().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            match = NOT_RUN.match(lines[k].strip()) if k >= 0 else None
            found.append(Block(i + 1, "\n".join(lines[i + 1:end]) + "\n", match.group(1).strip() if match else None))
            i = end
        i += 1
    return found


def _name(path: str) -> str:
    return os.path.relpath(path, ROOT)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a block writes (checkpoints, plots) land here
    for folder in ("examples", "benchmarks"):  # paths in the docs are relative to the repository's root
        (tmp_path / folder).symlink_to(os.path.join(ROOT, folder))
    monkeypatch.syspath_prepend(ROOT)
    torch.manual_seed(0)
    namespace = {"__name__": "docs_" + re.sub(r"\W", "_", _name(page))}
    try:
        for block in blocks(page):
            code = compile(block.code, f"{_name(page)}:{block.line}", "exec")  # a not-run block must parse too
            if block.not_run is None:
                exec(code, namespace)
    finally:
        torch._dynamo.reset()  # a page's torch.compile leaves no graphs to later tests


def test_not_run_blocks_say_why_and_are_few():
    skipped = [(_name(p), b.line, b.not_run) for p in PAGES for b in blocks(p) if b.not_run is not None]
    assert all(reason for _, _, reason in skipped), f"a not-run block without its reason: {skipped}"
    assert len(skipped) <= MAX_NOT_RUN, f"{len(skipped)} blocks do not run (at most {MAX_NOT_RUN}): {skipped}"


def test_ops_table_is_the_generated_one():
    spec = importlib.util.spec_from_file_location("gen_ops_table", os.path.join(ROOT, "docs", "gen_ops_table.py"))
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    with open(os.path.join(ROOT, "docs", "ops.md"), encoding="utf-8") as f:
        assert f.read() == generator.render(), "docs/ops.md is out of date: run python docs/gen_ops_table.py"


def test_readme_is_a_front_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= README_MAX_LINES


LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def test_relative_links_point_at_files():
    missing = []
    for page in PAGES:
        text = open(page, encoding="utf-8").read()
        for target in LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target))
            if not os.path.exists(path) and os.path.relpath(path, ROOT) not in PENDING:
                missing.append(f"{_name(page)} -> {target}")
    assert not missing, missing
