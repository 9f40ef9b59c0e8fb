"""Shared fixtures: tiny randomly initialised models (seeded, identical in every process)."""

from __future__ import annotations

import pytest

from shared.config import ModelConfig
from shared.models import TextClassifier, load_task_model

@pytest.fixture(params=["tiny-encoder", "tiny-decoder"])
def tiny_task(request) -> TextClassifier:
    return load_task_model(ModelConfig(name=request.param))


@pytest.fixture
def tiny_decoder() -> TextClassifier:
    return load_task_model(ModelConfig(name="tiny-decoder"))
