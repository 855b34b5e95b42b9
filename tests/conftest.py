"""Shared pytest configuration: CPU-friendly torch settings and the CUDA skip marker."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Without a GPU, Triton kernels (tests/layers) run on CPU tensors under Triton's interpreter.
# triton.jit picks the interpreter when a kernel is defined, so this must precede every
# import of triton (transformers imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``cuda`` when no CUDA device is present (they run on GPU machines)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# The session-scoped real control plane (tests/cluster), shared by every test marked ``cluster``.
from tests.cluster_fixture import cluster  # noqa: E402, F401
