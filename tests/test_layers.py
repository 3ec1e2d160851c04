"""The layers point one way: `shared` (settings, records, sinks, the Cloudflare client, progress)
imports nothing above it, and producers and consumers never import each other; `ops` (the
command line) may import everything. Read from the sources' import statements."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Each layer, and the sluice packages it must never import.
FORBIDDEN = {
    "shared": ("sluice.producers", "sluice.consumers", "sluice.ops"),
    "producers": ("sluice.consumers", "sluice.ops"),
    "consumers": ("sluice.producers", "sluice.ops"),
}


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement of the file names (functions' imports included)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files
        for line, module in imports(path)
        if module.startswith(FORBIDDEN[layer])
    ]
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The reader of imports finds one hidden in a function, as a layer break would be."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from sluice.producers.registry import open_source\n")
    assert imports(module) == [(2, "sluice.producers.registry")]


def test_only_the_sluice_name_is_installed(tmp_path: Path) -> None:
    """Installed, the folders answer only under `sluice.`: `import shared` (or ops, producers,
    consumers) from outside the checkout finds nothing of ours, so no module loads twice."""
    code = (
        "import importlib.util, json\n"
        "names = ['shared', 'ops', 'producers', 'consumers']\n"
        "bare = {n: importlib.util.find_spec(n) is not None for n in names}\n"
        "ours = {n: importlib.util.find_spec('sluice.' + n) is not None for n in names}\n"
        "print(json.dumps([bare, ours]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    bare, ours = json.loads(out.stdout)
    assert bare == dict.fromkeys(bare, False), f"bare names importable: {bare}"
    assert ours == dict.fromkeys(ours, True), f"sluice.* missing: {ours}"
