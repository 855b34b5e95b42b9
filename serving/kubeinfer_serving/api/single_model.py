"""A :class:`ModelProvider` serving exactly one generative model directory (vLLM-style single-model mode).

``kubeinfer-serve --model-dir DIR --served-model-name NAME`` uses it: the model is preloaded at
start-up, never evicted, and ``/ready`` turns 200 once it is loaded. For a catalogue of several
models with load-on-demand and LRU eviction, the server uses the registry instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeinfer_serving import metrics
from kubeinfer_serving.engine.async_engine import AsyncLLMEngine
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.engine.llm_engine import LLMEngine
from kubeinfer_serving.registry.protocol import (
    ModelInfo,
    ModelKind,
    ModelNotFoundError,
    ModelState,
    ModelUnavailableError,
)

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """The :class:`~kubeinfer_serving.registry.protocol.ServedModel` of a loaded generative model."""

    name: str
    kind: ModelKind
    tokenizer: Any
    max_model_len: int
    engine: Any
    embedder: Any = None


class SingleModelProvider:
    """Serves one Hugging Face model directory under one name.

    Args:
        model_dir: the model directory (``config.json``, ``*.safetensors``, tokenizer files).
        name: the OpenAI ``model`` name.
        engine_config: the engine's batching and KV-cache settings.

    The model is ``preload``: :meth:`start` loads it, :meth:`unload` refuses (503), and every
    request for another name gets 404.
    """

    def __init__(self, model_dir: str | Path, name: str, engine_config: EngineConfig | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.name = name
        self.engine_config = engine_config or EngineConfig()
        self._created = int(time.time())
        self._state = ModelState.UNLOADED
        self._message = ""
        self._served: LoadedModel | None = None
        self._lock = asyncio.Lock()

    def list_models(self) -> list[ModelInfo]:
        """The one entry, with its state and, when loaded, its context length."""
        return [
            ModelInfo(
                name=self.name,
                kind=ModelKind.GENERATE,
                state=self._state,
                bytes=self._bytes(),
                message=self._message,
                preload=True,
                max_model_len=self._served.max_model_len if self._served else None,
                created=self._created,
            )
        ]

    def _bytes(self) -> int:
        """Bytes the loaded model holds (weights + KV pool), else 0."""
        return int(self._served.engine.memory_bytes) if self._served is not None else 0

    def _check_name(self, name: str) -> None:
        if name != self.name:
            raise ModelNotFoundError(f"The model '{name}' does not exist; this server serves '{self.name}'")

    async def _ensure_loaded(self) -> LoadedModel:
        """Load the model once (concurrent callers wait for the same load).

        Raises:
            ModelUnavailableError: the load failed (the reason is kept and shown in ``/v1/models``).
        """
        async with self._lock:
            if self._served is not None:
                return self._served
            self._state, self._message = ModelState.LOADING, ""
            t0 = time.perf_counter()
            try:
                llm = await asyncio.to_thread(
                    LLMEngine.from_model_dir, self.model_dir, model_name=self.name, config=self.engine_config
                )
                llm.add_stat_logger(metrics.EngineMetrics(self.name))
                engine = AsyncLLMEngine(llm)
            except Exception as exc:
                self._state, self._message = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
                metrics.MODEL_LOAD_FAILURES.labels(model_name=self.name).inc()
                log.exception("loading %s from %s failed", self.name, self.model_dir)
                raise ModelUnavailableError(f"Model '{self.name}' failed to load: {self._message}") from exc
            self._served = LoadedModel(self.name, ModelKind.GENERATE, engine.tokenizer, engine.max_model_len, engine)
            self._state = ModelState.LOADED
            metrics.MODEL_LOADS.labels(model_name=self.name).inc()
            metrics.MODEL_LOAD_SECONDS.labels(model_name=self.name).observe(time.perf_counter() - t0)
            metrics.MODEL_LOADED_BYTES.labels(model_name=self.name).set(self._bytes())
            log.info("loaded %s from %s in %.2f s", self.name, self.model_dir, time.perf_counter() - t0)
            return self._served

    @asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[LoadedModel]:
        """Hold the model for one request, loading it first if needed.

        Raises:
            ModelNotFoundError: ``name`` is not this server's model (404).
            ModelUnavailableError: the load failed (503).
        """
        self._check_name(name)
        yield await self._ensure_loaded()

    def is_ready(self) -> bool:
        """True once the model is loaded."""
        return self._state is ModelState.LOADED

    def dead_models(self) -> list[str]:
        """``[name]`` when the engine loop crashed, else ``[]``."""
        served = self._served
        return [self.name] if served is not None and served.engine.is_dead else []

    async def start(self) -> None:
        """Load the model (preload); a failure is recorded and leaves ``/ready`` at 503."""
        try:
            await self._ensure_loaded()
        except ModelUnavailableError:
            pass

    async def shutdown(self) -> None:
        """Stop the engine (aborting what still runs) and drop the model."""
        async with self._lock:
            if self._served is not None:
                await self._served.engine.shutdown()
                self._served = None
                self._state = ModelState.UNLOADED
                metrics.MODEL_LOADED_BYTES.labels(model_name=self.name).set(0)

    async def load(self, name: str) -> ModelInfo:
        """Load the model if it is not loaded (admin API). Raises as :meth:`acquire`."""
        self._check_name(name)
        await self._ensure_loaded()
        return self.list_models()[0]

    async def unload(self, name: str) -> ModelInfo:
        """Always refused: the single model is preloaded and never unloaded while the server runs.

        Raises:
            ModelNotFoundError: unknown name (404).
            ModelUnavailableError: the model is preloaded (503).
        """
        self._check_name(name)
        raise ModelUnavailableError(f"Model '{name}' is preloaded (single-model mode) and cannot be unloaded")
