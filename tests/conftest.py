"""Shared fixtures: tiny randomly initialised models (seeded, identical in every process)."""

from __future__ import annotations

import os

import pytest

from seedtune.shared.config import ModelConfig
from seedtune.shared.models import TextClassifier, load_task_model

@pytest.fixture(params=["tiny-encoder", "tiny-decoder"])
def tiny_task(request) -> TextClassifier:
    return load_task_model(ModelConfig(name=request.param))


@pytest.fixture
def tiny_decoder() -> TextClassifier:
    return load_task_model(ModelConfig(name="tiny-decoder"))


@pytest.fixture(autouse=True, scope="module")
def _module_privacy_ledger(tmp_path_factory):
    """Simulated data holders get a fresh privacy ledger per test module (module fixtures run federations)..."""
    before = os.environ.get("SEEDTUNE_PRIVACY_LEDGER")
    os.environ["SEEDTUNE_PRIVACY_LEDGER"] = str(tmp_path_factory.mktemp("holders") / "privacy-ledger.sqlite")
    yield
    if before is None:
        os.environ.pop("SEEDTUNE_PRIVACY_LEDGER", None)
    else:
        os.environ["SEEDTUNE_PRIVACY_LEDGER"] = before


@pytest.fixture(autouse=True)
def _privacy_ledger(tmp_path, monkeypatch):
    """... and per test, so that no test's spending refuses another's (subprocesses inherit it)."""
    monkeypatch.setenv("SEEDTUNE_PRIVACY_LEDGER", str(tmp_path / "privacy-ledger.sqlite"))
