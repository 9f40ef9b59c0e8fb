"""The package metadata agrees with its dependencies: an installer (pip, or Flower's uv sync behind `flwr run .`)
must never be told a Python works that one of the pinned dependencies refuses."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


def test_requires_python_admits_no_python_that_a_dependency_refuses():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = SpecifierSet(project["requires-python"])
    lowest = next(s.version for s in ours if s.operator == ">=")  # the oldest Python the metadata admits
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    refused = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate({"python_version": lowest, "extra": ""}):
            continue
        if not any(s.operator in ("==", "<", "<=", "~=") for s in req.specifier):
            continue  # open-ended: an installer may take an older release that supports the lowest Python
        try:
            theirs = metadata.metadata(req.name).get("Requires-Python")
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. an extra CI does not take): nothing to compare
        if theirs and lowest not in SpecifierSet(theirs):
            refused.append(f"{req.name} {metadata.version(req.name)} requires Python {theirs}")
    assert not refused, f"requires-python {ours} admits Python {lowest}, but " + "; ".join(refused)
