"""The pages in docs/: every ```python block runs as written, and every relative link leads to a file.

A block is skipped only when the line before its fence is ``<!-- not-run -->``
(a fragment, or something that needs what a test cannot have).  Each block
runs in a fresh namespace with a temporary directory as its working
directory, and must leave no node, BlockBackend or throttle group behind.
"""
import re
from pathlib import Path

import pytest

from qblock.block import block_backend, graph, throttle_groups

DOCS = Path(__file__).resolve().parents[2] / "docs"
NOT_RUN = "<!-- not-run -->"
_LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md")) + sorted(DOCS.glob("drivers/*.md"))


def _python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """(line number of the fence, code, skipped) for each ```python block of ``page``."""
    blocks = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    prev = ""
    while i < len(lines):
        line = lines[i]
        if line.strip() == "```python":
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            blocks.append((start, "\n".join(lines[start:j]) + "\n", prev.strip() == NOT_RUN))
            i = j + 1
            prev = ""
            continue
        if line.strip():
            prev = line
        i += 1
    return blocks


def _cases():
    for page in _pages():
        for lineno, code, skipped in _python_blocks(page):
            rel = page.relative_to(DOCS).as_posix()
            yield pytest.param(rel, lineno, code, skipped, id=f"{rel}:{lineno}")


def _leftovers():
    return (len(graph.all_bdrv_states), len(block_backend.block_backends), len(throttle_groups.throttle_groups))


@pytest.mark.parametrize("page, lineno, code, skipped", list(_cases()))
def test_python_block_runs(page, lineno, code, skipped, tmp_path, monkeypatch):
    """The block runs without an error in a fresh namespace and cleans up after itself."""
    if skipped:
        pytest.skip(f"marked {NOT_RUN}")
    monkeypatch.chdir(tmp_path)
    before = _leftovers()
    namespace = {"__name__": "__docs__"}
    exec(compile(code, f"docs/{page}, block at line {lineno}", "exec"), namespace)
    assert _leftovers() == before, "the example left nodes, BlockBackends or throttle groups open"


def test_every_page_has_a_runnable_block_or_none_is_expected():
    """Each per-layer page carries at least one block that runs (the index, tour and guide excepted)."""
    exempt = {"README.md", "tour.md", "writing-a-driver.md"}
    missing = [p.relative_to(DOCS).as_posix() for p in _pages()
               if p.relative_to(DOCS).as_posix() not in exempt
               and not any(not skipped for _, _, skipped in _python_blocks(p))]
    assert missing == []


def test_relative_links_point_to_files():
    """Every relative link in docs/ names a file that exists."""
    broken = []
    for page in sorted(DOCS.rglob("*.md")):
        for target in _LINK_RE.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(DOCS)} -> {target}")
    assert broken == []


def test_index_lists_every_page():
    """docs/README.md links every other page, so none is orphaned."""
    index = DOCS / "README.md"
    linked = {(DOCS / t.split("#", 1)[0]).resolve() for t in _LINK_RE.findall(index.read_text(encoding="utf-8"))}
    missing = [p.relative_to(DOCS).as_posix() for p in sorted(DOCS.rglob("*.md"))
               if p != index and p.resolve() not in linked]
    assert missing == []
