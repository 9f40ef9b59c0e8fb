"""The package metadata agrees with its dependencies: an installer (pip, or Flower's uv sync behind `flwr run .`)
must never be told a Python works that one of the pinned dependencies refuses."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
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


@pytest.mark.slow  # resolves about 150 packages against the package index: 1.5 min
def test_the_app_and_its_extras_resolve_as_an_installer_would(tmp_path):
    """What Flower's dependency sync behind `flwr run .` needs: the app's metadata resolves, without
    installing anything (pip's resolver, against the index this environment uses)."""
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                          "--disable-pip-version-check", "--report", str(report), f"{ROOT}[models,onnx,baselines]"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"seedtune", "flwr", "torch", "onnxruntime", "opacus"} <= names
