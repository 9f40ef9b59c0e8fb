"""Shared fixtures: tiny randomly initialised models (seeded, identical in every process)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from seedtune.shared.task.config import ModelConfig
from seedtune.shared.task.loading import load_task_model
from seedtune.shared.task.models import TextClassifier

# What libraries set in the process on their first import or use, once and always to the same value, whichever
# test comes first: added, these are no test's doing (changed or removed, they are).
LIBRARY_FIRST_USE = {
    "GRPC_VERBOSITY",  # flwr.supercore.grpc, at import
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV",  # flwr.simulation, at import
    "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK",  # scikit-learn and joblib, at import
    "TORCHINDUCTOR_CACHE_DIR",  # torch._inductor, at its first compile
}
State = tuple[dict[str, str], str, list[str]]


def _process_state() -> State:
    """The environment (less PYTEST_CURRENT_TEST, which pytest itself sets per phase), cwd and sys.path."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    return environ, os.getcwd(), list(sys.path)


def _restore_and_name_leaks(before: State) -> list[str]:
    """What differs from `before` (environment, working directory, import path), each put back; a library's
    first-use settings and the folders inside installed packages that its import adds to sys.path excepted."""
    environ, cwd, path = before
    now = _process_state()[0]
    leaks = []
    changed = sorted(k for k in environ.keys() | now.keys() if environ.get(k) != now.get(k)
                     and not (k in LIBRARY_FIRST_USE and k not in environ))
    if changed:
        leaks.append(f"environment variables {changed}")
        for key in now.keys() - environ.keys() - LIBRARY_FIRST_USE:
            del os.environ[key]
        os.environ.update(environ)
    if os.getcwd() != cwd:
        leaks.append(f"working directory {os.getcwd()!r} (was {cwd!r})")
        os.chdir(cwd)
    added = [p for p in sys.path if p not in path and "site-packages" not in Path(p).parts]
    removed = [p for p in path if p not in sys.path]
    if added or removed:
        leaks.append(f"sys.path added {added}, removed {removed}")
        sys.path[:] = path + [p for p in sys.path if p not in path and p not in added]
    return leaks


@pytest.fixture(autouse=True, scope="module")
def _module_leaves_process_unchanged():
    """A test module, with its module fixtures (some run whole federations), leaves the process as it found it:
    the environment, the working directory and the import path are inherited by every later module in this
    worker and by every subprocess they start (issue 36: a PYTHONPATH leaked by Flower's Ray backend made a
    fresh venv import this checkout instead of the wheel under test, depending on which file ran first)."""
    before = _process_state()
    yield
    leaks = _restore_and_name_leaks(before)
    assert not leaks, "the module's fixtures left process-wide state changed: " + "; ".join(leaks)


@pytest.fixture(autouse=True)
def _test_leaves_process_unchanged():
    """The same per test; the state is put back, so that the next test is not judged by this one's leak. It
    must be set up before monkeypatch (so that it checks after monkeypatch has undone its changes): the fixtures
    below that use monkeypatch ask for it first."""
    before = _process_state()
    yield
    leaks = _restore_and_name_leaks(before)
    assert not leaks, "the test left process-wide state changed: " + "; ".join(leaks)


@pytest.fixture(params=["tiny-encoder", "tiny-decoder"])
def tiny_task(request) -> TextClassifier:
    return load_task_model(ModelConfig(name=request.param))


@pytest.fixture
def tiny_decoder() -> TextClassifier:
    return load_task_model(ModelConfig(name="tiny-decoder"))


@pytest.fixture(autouse=True, scope="module")
def _module_privacy_ledger(_module_leaves_process_unchanged, tmp_path_factory):
    """Simulated data holders get a fresh privacy ledger per test module (module fixtures run federations)..."""
    saved = {key: os.environ.get(key) for key in ("SEEDTUNE_PRIVACY_LEDGER", "SEEDTUNE_ANCHORS")}
    home = tmp_path_factory.mktemp("holders")
    os.environ["SEEDTUNE_PRIVACY_LEDGER"] = str(home / "privacy-ledger.sqlite")
    os.environ["SEEDTUNE_ANCHORS"] = str(home / "anchors")  # runs' anchors outside their folders (run_folder)
    yield
    for key, before in saved.items():
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


@pytest.fixture(autouse=True)
def _privacy_ledger(_test_leaves_process_unchanged, tmp_path, monkeypatch):
    """... and per test, so that no test's spending refuses another's (subprocesses inherit it)."""
    monkeypatch.setenv("SEEDTUNE_PRIVACY_LEDGER", str(tmp_path / "privacy-ledger.sqlite"))
    monkeypatch.setenv("SEEDTUNE_ANCHORS", str(tmp_path / "anchors"))


def pytest_terminal_summary(terminalreporter, config):
    """Name the shuffled order's seed at the end, where -q still prints it, so that a failure can be rerun in the
    same order with --randomly-seed."""
    seed = getattr(config.option, "randomly_seed", None)
    if config.pluginmanager.hasplugin("randomly") and seed is not None:
        terminalreporter.write_line(f"test order: --randomly-seed={seed}")
