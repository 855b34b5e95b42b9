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
    parent: str | None = None


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
