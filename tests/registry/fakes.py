"""A loader that sizes and "loads" models instantly, for testing the registry's scheduling logic.

It records what a device would see: which models are resident, their bytes, the peak of both,
and every load/close, so tests can assert the budget and count limits were never broken.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

from kubeinfer_serving.models.loader import ModelLoadError
from kubeinfer_serving.registry.catalogue import ModelEntry
from kubeinfer_serving.registry.loading import LoadedModel, LoadPlan
from kubeinfer_serving.registry.protocol import ModelKind
from kubeinfer_serving.registry.warm import HostSnapshot


class FakeLoader:
    """Models of fixed sizes; ``plan_errors``/``load_errors`` make a name fail at that step."""

    def __init__(self, sizes: dict[str, int], *, load_seconds: float = 0.02,
                 plan_errors: dict[str, Exception] | None = None,
                 load_errors: dict[str, Exception] | None = None) -> None:
        self.sizes = sizes
        self.load_seconds = load_seconds
        self.plan_errors = plan_errors or {}
        self.load_errors = load_errors or {}
        self.loads: Counter[str] = Counter()
        self.warm_loads: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.resident: dict[str, int] = {}
        self.peak_bytes = 0
        self.peak_count = 0
        self._lock = threading.Lock()

    def plan(self, entry: ModelEntry) -> LoadPlan:
        if entry.name in self.plan_errors:
            raise self.plan_errors[entry.name]
        return LoadPlan(Path("/fake") / entry.name, self.sizes[entry.name], 0)

    def load(self, entry: ModelEntry, plan: LoadPlan, warm: HostSnapshot | None) -> LoadedModel:
        time.sleep(self.load_seconds)
        if entry.name in self.load_errors:
            raise self.load_errors[entry.name]
        if warm is not None:
            assert warm.payload == f"weights of {entry.name}"
        name, size = entry.name, plan.total_bytes
        with self._lock:
            assert name not in self.resident, f"{name} loaded twice"
            self.resident[name] = size
            self.peak_bytes = max(self.peak_bytes, sum(self.resident.values()))
            self.peak_count = max(self.peak_count, len(self.resident))
            (self.warm_loads if warm is not None else self.loads)[name] += 1

        async def close() -> None:
            with self._lock:
                del self.resident[name]
                self.closes[name] += 1

        async def offload() -> HostSnapshot:
            return HostSnapshot(f"weights of {name}", size)

        kind = entry.kind
        return LoadedModel(
            name, kind, tokenizer=None, max_model_len=128, memory_bytes=size, close=close,
            engine=f"engine of {name}" if kind is ModelKind.GENERATE else None,
            embedder=f"embedder of {name}" if kind is ModelKind.EMBED else None,
            offload=offload, warm=warm is not None,
        )


def missing_files(name: str) -> ModelLoadError:
    """The error the real loader raises for a directory without weights."""
    return ModelLoadError(f"no *.safetensors weight files in /models/{name}")
