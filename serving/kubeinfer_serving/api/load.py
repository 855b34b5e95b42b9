"""What a router needs from the pod: ``GET /kubeinfer/load`` and the ``x-kubeinfer-resident`` header.

The fleet router (``kubeinfer_router``) sends each request to a pod that already holds the model.
It learns where models are from two sources:

* ``GET /kubeinfer/load`` (open like ``/metrics``, polled about once a second): the pod's queue,
  batch, KV-cache usage, memory budget and every catalogue model's tier, as JSON built from the
  registry's :meth:`~kubeinfer_serving.registry.protocol.ModelProvider.usage` and
  :meth:`~kubeinfer_serving.registry.protocol.ModelProvider.list_models` (no Prometheus parsing).
* :class:`ResidentHeaderMiddleware`: every HTTP response carries ``x-kubeinfer-resident``, the
  models loaded on the device when the response started, so a load the router caused is seen at
  once (for a stream the headers go out after the model was acquired, so the model is listed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request

from kubeinfer_serving.registry.protocol import ModelUsage

#: The response header listing the device-tier models (ids percent-encoded, joined by ", ").
RESIDENT_HEADER = b"x-kubeinfer-resident"
#: The load report's path (served without an API key, see :mod:`.auth`).
LOAD_PATH = "/kubeinfer/load"

router = APIRouter()


def resident_header_value(names: list[str]) -> bytes:
    """The ``x-kubeinfer-resident`` value: each name ``urllib.parse.quote(name, safe="")``, joined by ", "."""
    return ", ".join(quote(n, safe="") for n in names).encode("ascii")


class ResidentHeaderMiddleware:
    """Pure ASGI middleware adding ``x-kubeinfer-resident`` to every HTTP response.

    Only the ``http.response.start`` message is edited (streams pass through unbuffered).

    Args:
        app: the wrapped ASGI app.
        resident: returns the names of the loaded models (the provider's ``resident_models``).
    """

    def __init__(self, app: Any, *, resident: Callable[[], list[str]]) -> None:
        self.app = app
        self.resident = resident

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_resident(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != RESIDENT_HEADER]
                message = {**message, "headers": headers + [(RESIDENT_HEADER, resident_header_value(self.resident()))]}
            await send(message)

        await self.app(scope, receive, send_with_resident)


@router.get(LOAD_PATH)
async def load_report(request: Request) -> dict[str, Any]:
    """The pod's load for a router: totals over the models, ``draining``, ``warm_tier``,
    ``memory`` (``budget_bytes``, ``used_bytes``, ``evictable_bytes``,
    ``max_loaded_models`` and ``loaded_models``: the count limit and the slots held) and per
    catalogue model its ``id``, ``kind``, ``state``, ``tier``, ``parent`` (the base model of an adapter; null),
    ``queue_length``, ``running`` and ``kv_cache_usage`` (see
    :class:`~kubeinfer_serving.registry.protocol.ModelUsage`). ``kv_cache_usage`` at the top is
    the maximum over the models."""
    provider = request.app.state.provider
    usage = provider.usage()
    per_model = {u.name: u for u in usage.models}
    models = []
    for info in provider.list_models():
        use = per_model.get(info.name) or ModelUsage(info.name)
        models.append({"id": info.name, "kind": info.kind.value, "state": info.state.value, "tier": info.tier.value,
                       "parent": info.parent, "queue_length": use.queue_length, "running": use.running,
                       "kv_cache_usage": use.kv_cache_usage})
    drain = request.app.state.drain
    return {
        "queue_length": sum(m["queue_length"] for m in models),
        "running": sum(m["running"] for m in models),
        "kv_cache_usage": max((m["kv_cache_usage"] for m in models), default=0.0),
        "draining": drain.draining,
        "warm_tier": usage.warm_tier,
        "memory": {"budget_bytes": usage.budget_bytes, "used_bytes": usage.used_bytes,
                   "evictable_bytes": usage.evictable_bytes, "max_loaded_models": usage.max_loaded_models,
                   "loaded_models": usage.loaded_models},
        "models": models,
    }
