"""The house's dependencies flow one way: entry points (seedtune/, simulations/) -> client/ and server/ ->
shared/. shared/ imports neither side, and client/ and server/ never import each other (docs/engine.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"shared": {"client", "server", "simulations", "seedtune"},
             "client": {"server", "simulations", "seedtune"},
             "server": {"client", "simulations", "seedtune"}}


def _modules(folder: str) -> list[str]:
    names = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if "proto" in path.relative_to(ROOT).parts[1:2] and path.name.endswith("_pb2.py"):
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_importing_a_folder_loads_nothing_it_must_not_depend_on(folder):
    """Import every module of the folder in a fresh interpreter, one after another, and name each module that
    brought in a top-level package the folder must not depend on."""
    script = f"""
import importlib, json, sys
bad = {{}}
forbidden = {sorted(FORBIDDEN[folder])!r}
for name in {_modules(folder)!r}:
    before = set(sys.modules)
    importlib.import_module(name)
    loaded = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in forbidden)
    if loaded:
        bad[name] = loaded
print(json.dumps(bad))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_lazy_import_crosses_the_line_either(folder):
    """Imports inside functions (the CLI's lazy ones, optional backends) count too: read every import statement."""
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                    if n.split(".")[0] in FORBIDDEN[folder]]
    assert bad == []
