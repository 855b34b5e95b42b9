"""The FastAPI application of the serving pod.

:func:`create_app` wires the routes to a :class:`~kubeinfer_serving.registry.protocol.ModelProvider`
(the registry in production). The app's lifespan starts the provider in the background, so
``/health`` answers at once while preloaded models load (``/ready`` says 503 until they are
loaded), and shuts it down when the server stops (after uvicorn drained in-flight requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry

from kubeinfer_serving import __version__, tracing
from kubeinfer_serving.api import (
    chat,
    completions,
    embeddings,
    health,
    load,
    lora,
    models,
    responses,
    tokenization,
    websocket,
)
from kubeinfer_serving.api.admission import FairAdmission
from kubeinfer_serving.api.auth import AuthMiddleware
from kubeinfer_serving.api.drain import Drain
from kubeinfer_serving.api.errors import install_error_handlers
from kubeinfer_serving.api.fields import ignored_header
from kubeinfer_serving.api.limits import BodyLimitMiddleware
from kubeinfer_serving.api.openapi import install_openapi
from kubeinfer_serving.api.request_log import RequestLogMiddleware
from kubeinfer_serving.api.request_trace import RequestTraceMiddleware
from kubeinfer_serving.api.result_cache import ResultCache
from kubeinfer_serving.api.tenancy import KeyStore
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.metrics import HTTPMetricsMiddleware, ModelStateCollector
from kubeinfer_serving.registry.protocol import ModelProvider

log = logging.getLogger(__name__)

#: The request-id header: echoed when the client sends one, else generated (as vLLM does).
REQUEST_ID_HEADER = b"x-request-id"
#: Response headers a web page of an allowed origin may read (CORS ``Access-Control-Expose-Headers``).
EXPOSED_HEADERS = ("x-request-id", "x-kubeinfer-ignored-fields", "x-kubeinfer-resident", "x-kubeinfer-result-cache",
                   "retry-after")


class RequestIdMiddleware:
    """Pure ASGI middleware: every HTTP response carries ``X-Request-Id`` (the client's or a new uuid4 hex),
    and ``x-kubeinfer-ignored-fields`` when the route ignored request fields (:mod:`.fields`).

    Works for streamed responses too (it only edits the ``http.response.start`` message).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = next((v for k, v in scope.get("headers", []) if k.lower() == REQUEST_ID_HEADER), None)
        rid = rid or uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = rid.decode("latin-1")  # for the request log

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                headers.append((b"x-request-id", rid))
                ignored = ignored_header(scope)
                if ignored is not None:
                    headers.append(ignored)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _result_cache(provider: ModelProvider) -> ResultCache:
    """The result cache: the catalogue's opted-in models and sizes (``--result-cache`` opts the
    single model in); a provider without a catalogue caches nothing."""
    catalogue = getattr(provider, "catalogue", None)
    if catalogue is None:
        return ResultCache(0, 600.0, set())
    models = {m.name for m in catalogue.models if m.result_cache}
    return ResultCache(catalogue.result_cache_bytes, catalogue.result_cache_ttl_seconds, models)


def create_app(
    provider: ModelProvider, *, settings: ServerSettings | None = None, keys: KeyStore | None = None
) -> FastAPI:
    """Build the HTTP app over ``provider``.

    Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/responses``, ``POST /v1/embeddings``,
    ``GET /v1/models``, ``GET /v1/models/{name}``, ``POST /admin/models/{name}/load|unload``,
    vLLM's ``POST /v1/load_lora_adapter|unload_lora_adapter``,
    ``GET /health``, ``GET /ready``, ``GET /metrics``, ``GET /kubeinfer/load`` (the router's
    load report), and vLLM's ``POST /tokenize``, ``POST /detokenize``, ``GET /version``. Every
    error has OpenAI's error body; every response carries ``X-Request-Id`` and
    ``x-kubeinfer-resident`` (:mod:`.load`). With ``settings.allowed_origins`` (vLLM's
    ``--allowed-origins``), web pages of those origins may call the API (CORS, Starlette's
    ``CORSMiddleware``) and open its WebSockets. With an OTLP endpoint (``settings.otlp_traces_endpoint``
    or the ``OTEL_EXPORTER_OTLP_*`` variables), each request is traced (:mod:`.request_trace`) by the
    tracer provider kept as ``app.state.tracing`` (None: traces off).

    Args:
        provider: hands out models by name; started by the lifespan (``provider.start()`` as a
            background task) and shut down when the app stops (``provider.shutdown()``).
        settings: the server settings, kept as ``app.state.settings``.
        keys: API keys and tenants (default: read from ``settings.api_keys_file`` and the
            environment, :meth:`KeyStore.load`); kept as ``app.state.keys``.

    Raises:
        KeysFileError: the API keys file is invalid.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def start() -> None:
            try:
                await provider.start()
            except Exception:
                log.exception("starting the model provider failed; /ready stays 503")

        starting = asyncio.ensure_future(start())
        try:
            yield
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await provider.shutdown()
            if app.state.tracing is not None:
                await asyncio.to_thread(app.state.tracing.shutdown)  # export the last spans

    settings = settings or ServerSettings()
    app = FastAPI(title="kubeinfer serving", version=__version__, lifespan=lifespan)
    app.state.provider = provider
    app.state.settings = settings
    # Per-app series (the model states of this app's provider), served after the global registry.
    app.state.metrics_registry = CollectorRegistry(auto_describe=True)
    app.state.metrics_registry.register(ModelStateCollector(provider.list_models, provider.is_ready))
    app.add_middleware(HTTPMetricsMiddleware)
    app.state.drain = Drain()
    app.state.keys = keys if keys is not None else KeyStore.load(settings.api_keys_file, api_keys=settings.api_keys)
    fair = settings.fair_admission if settings.fair_admission is not None else app.state.keys.enabled
    app.state.admission = FairAdmission(enabled=fair)
    app.state.result_cache = _result_cache(provider)
    app.state.tracing = tracing.from_settings(settings.otlp_traces_endpoint)
    install_error_handlers(app)
    for module in (completions, chat, responses, embeddings, models, health, load, tokenization, websocket, lora):
        app.include_router(module.router)
    install_openapi(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes,
                       body_timeout=settings.timeout_request_body)
    app.add_middleware(AuthMiddleware, keys=app.state.keys,  # refuse before reading a body
                       allowed_origins=settings.allowed_origins)
    if settings.allowed_origins:  # outside auth: a browser's preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=list(EXPOSED_HEADERS))
    app.add_middleware(load.ResidentHeaderMiddleware, resident=provider.resident_models)
    if app.state.tracing is not None:  # inside the log (its record gives model and usage), outside auth
        app.add_middleware(RequestTraceMiddleware, tracing=app.state.tracing)
    app.add_middleware(RequestLogMiddleware)  # logs 401s and 413s too
    app.add_middleware(RequestIdMiddleware)  # outermost: 401s and 413s carry X-Request-Id too
    return app
