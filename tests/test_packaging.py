"""The package metadata agrees with its dependencies: an installer (pip, or Flower's uv sync behind `flwr run .`)
must never be told a Python works that one of the pinned dependencies refuses."""

from __future__ import annotations

import json
import os
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
                          "--disable-pip-version-check", "--report", str(report), f"{ROOT}[onnx,baselines,tracking]"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"seedtune", "flwr", "torch", "onnxruntime", "opacus"} <= names


FOLDERS = ("client", "server", "shared", "simulations")


def _clean_env() -> dict[str, str]:
    """This process's environment without what would point a fresh interpreter at other code: PYTHONPATH and
    its kin, and the active venv. A test that builds or probes an installed wheel must see only the wheel (and
    the dependency folder it is given), whatever an earlier test left in this worker (issue 36)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}


def _build_wheel(out: Path) -> Path:
    """The wheel as pip builds it from this checkout's files (setuptools, no isolation: offline), in a copy of
    them: an in-tree build/ folder left by an earlier build would be reused."""
    import shutil

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    src = out.parent / "src"
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(out), str(src)], capture_output=True, text=True, timeout=300, env=_clean_env())
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = out.glob("seedtune-*.whl")
    return wheel


def _fresh_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300, env=_clean_env())
    return path / "bin" / "python"


def _site_packages(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip())


# What an installed seedtune is asked: the API, a folder subpackage, and where it all came from.
_PROBE = """
import json, sys, seedtune, seedtune.shared.task.models, seedtune.client.app, seedtune.server.app
from seedtune.cli import build_parser
print(json.dumps({"seedtune": seedtune.__file__, "api": callable(seedtune.PrivateZO),
                  "shared": seedtune.shared.task.models.__file__, "path": list(seedtune.__path__)}))
"""


def _check_installed(python: Path, tmp_path: Path) -> None:
    site = _site_packages(python)
    claimed = sorted(name for name in FOLDERS if (site / name).exists() or (site / f"{name}.py").exists())
    assert claimed == [], f"top-level names in site-packages: {claimed}"
    out = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=_clean_env())
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["api"] and probe["path"] == [str(site / "seedtune")]  # the wheel's own folders, not a checkout
    assert Path(probe["shared"]).is_relative_to(site / "seedtune" / "shared")
    cli = subprocess.run([str(python.parent / "seedtune"), "--help"], capture_output=True, text=True, timeout=300,
                         env=_clean_env())
    assert cli.returncode == 0 and "replay" in cli.stdout


def test_the_wheel_holds_everything_under_seedtune(tmp_path):
    """The built wheel installed into a fresh venv (without its dependencies, which come from this environment
    through a path entry): import seedtune works, and no generic top-level name is claimed."""
    import zipfile

    wheel = _build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"seedtune", "seedtune-0.1.0.dist-info"}
    proto = sorted(n for n in names if "/proto/" in n)
    assert "seedtune/shared/protocol/proto/seedtune_pb2.pyi" in proto, proto  # package data: the messages' type stubs
    python = _fresh_venv(tmp_path / "venv")
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                                str(wheel)], capture_output=True, text=True, timeout=300, env=_clean_env())
    assert installed.returncode == 0, installed.stderr[-3000:]
    # The dependencies: this environment's site-packages as a plain path entry, after the venv's own (its .pth
    # files, this checkout's editable install among them, are not read from there).
    ours = Path(next(p for p in sys.path if p.endswith("site-packages")))
    (_site_packages(python) / "deps.pth").write_text(f"{ours}\n")
    _check_installed(python, tmp_path)


@pytest.mark.slow  # installs torch, transformers, flwr and the rest from the package index: minutes
def test_the_wheel_installs_with_its_dependencies_into_a_fresh_venv(tmp_path):
    """As a user would: the wheel and every dependency from the index pip is configured with (offline here:
    the local index); the CPU torch wheel first, as scripts/setup.sh installs it."""
    wheel = _build_wheel(tmp_path / "dist")
    python = _fresh_venv(tmp_path / "venv")
    for args in (["torch==2.13.0"], [str(wheel)]):
        installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], capture_output=True,
                                   text=True, timeout=1800, env=_clean_env())
        assert installed.returncode == 0, installed.stderr[-3000:]
    _check_installed(python, tmp_path)
