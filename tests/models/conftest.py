"""Fixtures: tiny models built once per test module into temporary directories."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubeinfer_serving.models.build_tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_seed0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, seed 0, default shape."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-seed0"), seed=0)
