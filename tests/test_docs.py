"""The documentation holds together: a short README whose links resolve, pages that exist, and
comments that stand on their own, citing no document kept outside the repository."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# The README is the front door: what Sluice is, the quick start, the diagram, the module table,
# the guarantees and links. Everything longer lives in ops/*.md and sluice.example.toml.
README_MAX_LINES = 200

# The packages whose comments and docstrings are checked.
CODE_DIRS = ("shared", "producers", "consumers", "ops")

# Documents that live beside the repository, not in it: a reader of the code cannot open them.
OUTSIDE_DOCUMENT = re.compile(
    r"apis\.md|limits\.md|celery\.md|style\.md|peers\.md|DESIGN\.md|\bseeds? 00\d",
    re.IGNORECASE,
)

# A Markdown link's target: [text](target).
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def links(page: Path) -> list[str]:
    """The local targets a Markdown page links to (web links and in-page anchors left out)."""
    out = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        out.append(target.split("#", 1)[0])
    return out


def linked_pages() -> list[Path]:
    """README.md and every Markdown page it links to."""
    return [README] + [(README.parent / t).resolve() for t in links(README) if t.endswith(".md")]


def comments_and_docstrings(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text(encoding="utf-8")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                yield node.body[0].lineno, doc


def test_readme_is_a_short_front_door() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, (
        f"README.md has {len(lines)} lines (< {README_MAX_LINES} wanted): move detail to ops/*.md"
    )
    assert "## Quick start" in lines


def test_readme_gives_the_command_ci_runs() -> None:
    text = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for part in ("-e '.[test]' --config-settings editable_mode=strict", "python -m pytest -q"):
        assert part in ci, f".ci/run no longer runs {part!r}: update this test and the README"
        assert part in text, f"README.md's test command lacks {part!r}, which .ci/run uses"


def test_every_page_the_readme_links_to_exists() -> None:
    missing = [t for t in links(README) if not (ROOT / t).exists()]
    assert not missing, f"README.md links to what does not exist: {missing}"


def test_every_link_of_the_linked_pages_resolves() -> None:
    missing = [
        f"{page.relative_to(ROOT)} → {t}"
        for page in linked_pages()
        if page.exists()
        for t in links(page)
        if not (page.parent / t).exists()
    ]
    assert not missing, f"broken links: {missing}"


def test_code_comments_cite_no_document_outside_the_repository() -> None:
    found = []
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, text in comments_and_docstrings(path):
                match = OUTSIDE_DOCUMENT.search(text)
                if match:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {match.group(0)!r}")
    assert not found, "say the fact or the reason itself, not where it was read:\n" + "\n".join(
        found
    )


def test_docs_cite_no_document_outside_the_repository() -> None:
    found = [
        f"{page.relative_to(ROOT)}:{n}: {line.strip()}"
        for page in linked_pages()
        if page.exists()
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE_DOCUMENT.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_citation_check_catches_what_it_is_for() -> None:
    cited_forms = ("(apis.md §2.3)", "reference/limits.md F2", "celery.md", "seed 002's mapping")
    for cited in cited_forms:
        assert OUTSIDE_DOCUMENT.search(cited), cited
    for plain in ("https://developers.cloudflare.com/d1/platform/limits/", "seed=20261124"):
        assert not OUTSIDE_DOCUMENT.search(plain), plain
