"""The house's dependencies flow one way: entry points (seedtune's own modules such as seedtune.cli, and
seedtune.simulations) -> seedtune.client and seedtune.server -> seedtune.shared. shared imports neither side, and
client and server never import each other (docs/engine.md). Every module imports the folders as
``seedtune.<folder>``: a bare ``shared``/``client`` import would load a second copy of a module under another
name in a checkout and fail outright in an installed wheel."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("shared", "client", "server", "simulations")
FORBIDDEN = {"shared": {"client", "server", "simulations", "entry"},
             "client": {"server", "simulations", "entry"},
             "server": {"client", "simulations", "entry"}}


def layer(module: str) -> str | None:
    """Which part of the house a dotted module name belongs to: a folder, "entry" for seedtune's own modules
    (seedtune.cli, the public API), None for the seedtune package itself and for anything else."""
    parts = module.split(".")
    if parts[0] != "seedtune" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in FOLDERS else "entry"


def _modules(folder: str) -> list[str]:
    names = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path.name.endswith("_pb2.py"):
            continue
        parts = ("seedtune", *path.relative_to(ROOT).with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute import of a file, lazy ones (inside functions: the CLI's, optional backends) included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.append((node.lineno, node.module or ""))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "seedtune"]
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_importing_a_folder_loads_nothing_it_must_not_depend_on(folder):
    """Import every module of the folder in a fresh interpreter, one after another, and name each module that
    brought in a part of the house the folder must not depend on."""
    script = f"""
import importlib, json, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from test_layout import FORBIDDEN, layer
bad = {{}}
for name in {_modules(folder)!r}:
    before = set(sys.modules)
    importlib.import_module(name)
    loaded = sorted(m for m in set(sys.modules) - before if layer(m) in FORBIDDEN[{folder!r}])
    if loaded:
        bad[name] = loaded
print(json.dumps(bad))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_lazy_import_crosses_the_line_either(folder):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in sorted((ROOT / folder).rglob("*.py"))
           for line, name in _imports(path) if layer(name) in FORBIDDEN[folder]]
    assert bad == []


def test_every_module_imports_the_folders_through_seedtune():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for top in (*FOLDERS, "seedtune", "tests", "examples") if (ROOT / top).is_dir()
           for path in sorted((ROOT / top).rglob("*.py"))
           for line, name in _imports(path) if name.split(".")[0] in FOLDERS]
    assert bad == []


def test_the_layer_rule_itself():
    assert layer("seedtune.shared.task.models") == "shared" and layer("seedtune.cli") == "entry"
    assert layer("seedtune") is None and layer("torch.nn") is None
    assert "entry" in FORBIDDEN["shared"]


def test_the_package_links_each_folder_for_static_tools():
    """seedtune/<folder> links to the checkout's <folder>, so mypy and editors resolve ``seedtune.<folder>`` from
    the source tree (seedtune/__init__.py's finder serves trees without the links, such as a Flower app bundle)."""
    for folder in FOLDERS:
        link = ROOT / "seedtune" / folder
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), f"{link} is not a link to {folder}/"


def _module_map() -> dict[str, list[str]]:
    """docs/engine.md's module map: each folder's bullet and the names in backquotes under it."""
    text = (ROOT / "docs" / "engine.md").read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    names: dict[str, list[str]] = {}
    for bullet in re.split(r"\n(?=- \*\*)", section)[1:]:
        folder = re.match(r"- \*\*(\w+)/\*\*", bullet).group(1)
        names[folder] = re.findall(r"`([^`\s]+)`", bullet)
    return names


@pytest.mark.parametrize("folder", [*FOLDERS, "seedtune"])
def test_the_module_map_names_every_module_and_no_other(folder):
    """Every module of the folder is named in its bullet (a pattern such as ``bench_*.py`` counts), and every
    ``*.py`` its bullet names exists: a map that misses a new module or keeps a removed one fails."""
    names = _module_map()[folder]
    modules = [p.relative_to(ROOT / folder).as_posix() for p in sorted((ROOT / folder).rglob("*.py"))
               if p.name != "__init__.py" and not p.name.endswith("_pb2.py")]
    if folder == "seedtune":
        modules = [m for m in modules if "/" not in m]  # its links are the other folders
    unnamed = [m for m in modules if not any(fnmatch.fnmatch(m, n) or fnmatch.fnmatch(m.split("/")[-1], n)
                                             for n in names)]
    own = [n for n in names if n.endswith(".py") and ("/" not in n or (ROOT / folder / n.split("/")[0]).is_dir())]
    stale = [n for n in own if not any(fnmatch.fnmatch(m, n) or m.endswith("/" + n) for m in modules)]
    assert unnamed == [] and stale == [], f"docs/engine.md's module map, {folder}/: unnamed {unnamed}, stale {stale}"
