"""Fixtures shared by the registry tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubeinfer_serving.models.build_tiny import build_tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny models with seeds 0, 1, 2, named tiny-0..tiny-2."""
    root = tmp_path_factory.mktemp("tiny3")
    return {f"tiny-{s}": build_tiny_model(root / f"seed{s}", seed=s) for s in range(3)}
