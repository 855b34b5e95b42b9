"""The contract between the HTTP API and whatever holds the models (the registry).

The API never touches weights or engines directly: it asks a :class:`ModelProvider` for a
model by its OpenAI ``model`` name and holds the returned :class:`ServedModel` for the
duration of one request. Holding it marks the model busy, so it is never evicted mid-request.
"""

from __future__ import annotations

import enum
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol


class ModelState(str, enum.Enum):
    """Lifecycle of a catalogue entry as shown by ``GET /v1/models``."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class ModelTier(str, enum.Enum):
    """Where a model's weights are on this pod, best first (what a router prefers).

    DEVICE: loaded in the engine (GPU memory, or the CPU device of a CPU pod); HOST: evicted
    weights kept in the warm tier (host RAM, :mod:`.warm`); DISK: a remote source (``hf://``,
    ``s3://``) in the pod's disk tier (:mod:`.disk`); ABSENT: none of these, a load reads the
    model from its source (fetches a remote one; reads a local path, PVC or built-in model, which
    gives this pod no head start over its peers, so a router treats it as not held).
    """

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"
    ABSENT = "absent"


class ModelKind(str, enum.Enum):
    """What a model serves: text generation (completions, chat) or embeddings."""

    GENERATE = "generate"
    EMBED = "embed"


@dataclass
class ModelInfo:
    """One catalogue entry's public state.

    Attributes:
        name: the OpenAI ``model`` name.
        kind: generate or embed.
        state: current lifecycle state.
        bytes: bytes held on the device while loaded (weights + KV pool), else 0.
        message: the failure reason when ``state`` is FAILED, else "".
        preload: loaded at start-up and never evicted.
        max_model_len: context length in tokens, when known.
        created: Unix time (seconds) the entry was registered.
        idle_timeout_seconds: unloaded after this long without requests (None: never).
        source: the catalogue ``source`` URI (never carries credentials).
        revision: pinned revision of a remote source (hub commit sha, S3 listing digest) once fetched, else None.
        tier: where the weights are now (:class:`ModelTier`).
        parent: for a LoRA adapter, the name of its base model (vLLM's ``parent``); None for a model.
    """

    name: str
    kind: ModelKind
    state: ModelState
    bytes: int = 0
    message: str = ""
    preload: bool = False
    max_model_len: int | None = None
    created: int = 0
    idle_timeout_seconds: float | None = None
    source: str = ""
    revision: str | None = None
    tier: ModelTier = ModelTier.ABSENT
    parent: str | None = None


@dataclass
class ModelUsage:
    """One catalogue model's load now (zeros while it is not loaded).

    Attributes:
        name: the OpenAI ``model`` name.
        queue_length: requests waiting: for the model to load, plus those queued in its engine
            (the engine's ``num_waiting``, the number ``kubeinfer_queue_length`` reports).
        running: requests in the engine's running batch (an embedding model: requests holding it).
        kv_cache_usage: fraction of the engine's KV blocks in use, 0..1 (0 for embedding models).
    """

    name: str
    queue_length: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0


@dataclass
class PodUsage:
    """The pod's load and memory now, as ``GET /kubeinfer/load`` reports it to a router.

    Attributes:
        budget_bytes: the device memory budget of the models, bytes.
        used_bytes: bytes of the budget reserved now (loaded, loading and still-evicting models).
        evictable_bytes: bytes held by loaded models an eviction could free now (idle, not
            preloaded, not already being evicted).
        warm_tier: whether evicted weights are kept in host RAM (``warmCacheBytes > 0``).
        models: every catalogue model, in catalogue order.
        max_loaded_models: the catalogue's ``maxLoadedModels`` (None: no count limit).
        loaded_models: models holding a slot of that limit now (loaded, loading or being evicted).
    """

    budget_bytes: int
    used_bytes: int
    evictable_bytes: int
    warm_tier: bool
    models: list[ModelUsage]
    max_loaded_models: int | None = None
    loaded_models: int = 0


class ModelError(Exception):
    """Base class of model-lookup errors; ``status`` is the HTTP status the API returns."""

    status: int = 500
    code: str = "model_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ModelNotFoundError(ModelError):
    """The name is not in the catalogue (HTTP 404, OpenAI code ``model_not_found``)."""

    status = 404
    code = "model_not_found"


class ModelUnavailableError(ModelError):
    """The model exists but cannot serve now: its load failed, or no memory could be freed in time (HTTP 503)."""

    status = 503
    code = "model_unavailable"


class AdapterRequestError(ModelError):
    """A LoRA adapter cannot be added or removed as asked (HTTP 400): name taken, bad source or
    base, or an adapter that does not fit its base (the message says why)."""

    status = 400
    code = "invalid_lora_adapter"


class WrongModelKindError(ModelError):
    """E.g. an embedding model asked for a chat completion (HTTP 400)."""

    status = 400
    code = "model_not_supported"


class ServedModel(Protocol):
    """A loaded model, valid while the ``acquire`` context that returned it is open.

    Attributes:
        name: the OpenAI ``model`` name.
        kind: generate or embed.
        tokenizer: the Hugging Face tokenizer loaded from the model directory.
        max_model_len: maximum prompt + output length in tokens.
        engine: the :class:`kubeinfer_serving.engine.async_engine.AsyncLLMEngine` for generate models, else None.
        embedder: the embedding runner for embed models, else None.
    """

    name: str
    kind: ModelKind
    tokenizer: Any
    max_model_len: int
    engine: Any
    embedder: Any


class ModelProvider(Protocol):
    """Holds the model catalogue and hands out loaded models (implemented by the registry)."""

    def list_models(self) -> list[ModelInfo]:
        """All catalogue entries with their current state."""

    def acquire(self, name: str) -> AbstractAsyncContextManager[ServedModel]:
        """Load ``name`` if needed and hold it busy until the context exits.

        Raises:
            ModelNotFoundError: ``name`` is not in the catalogue.
            ModelUnavailableError: the load failed, or memory could not be freed before the timeout.
        """

    def resident_models(self) -> list[str]:
        """Names of the models loaded now (tier DEVICE), in catalogue order; cheap (every response asks)."""

    def usage(self) -> PodUsage:
        """The pod's load and memory now (``GET /kubeinfer/load``); cheap, no blocking I/O after the first call."""

    def is_ready(self) -> bool:
        """True once the preloaded models finished loading and some model can serve (the ``/ready`` probe)."""

    def dead_models(self) -> list[str]:
        """Names of loaded models whose engine crashed (the ``/health`` liveness probe fails on any)."""

    async def start(self) -> None:
        """Load the preloaded models."""

    async def shutdown(self) -> None:
        """Stop every engine and release memory."""

    async def load(self, name: str) -> ModelInfo:
        """Load a model explicitly (admin API); same errors as :meth:`acquire`."""

    async def unload(self, name: str) -> ModelInfo:
        """Unload an idle model explicitly (admin API).

        Raises:
            ModelNotFoundError: unknown name.
            ModelUnavailableError: the model is busy or preloaded.
        """
