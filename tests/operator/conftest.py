"""Operator tests: pure renderer/status/schema tests, and ``cluster`` tests against the real API server.

The session fixture ``cluster`` comes from ``tests/cluster_fixture.py`` through the top-level
``tests/conftest.py`` (one control plane per session).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "deploy" / "crds" / "serving.kubeinfer.io_inferenceservices.yaml"
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))


def load_yaml_docs(path: Path) -> list[dict]:
    """Every non-empty YAML document of ``path``."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="session")
def crd() -> dict:
    """The InferenceService CRD as a dict."""
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="session")
def examples() -> dict[str, dict]:
    """File name -> the InferenceService in each deploy/examples/*.yaml, in name order."""
    out = {}
    for path in EXAMPLES:
        for doc in load_yaml_docs(path):
            if doc.get("kind") == "InferenceService":
                out[path.name] = doc
    return out
