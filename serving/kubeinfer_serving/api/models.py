"""``GET /v1/models`` (OpenAI's model list, with catalogue state) and the admin load/unload routes."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from fastapi import APIRouter, Request

from kubeinfer_serving.api.errors import APIError, redact
from kubeinfer_serving.api.schemas import ModelCard, ModelList
from kubeinfer_serving.registry.protocol import ModelInfo

router = APIRouter()


def model_card(info: ModelInfo) -> ModelCard:
    """OpenAI's ``model`` object for one catalogue entry, plus ``kind``, ``state``, ``bytes``, ``max_model_len``,
    ``source``, the pinned ``revision`` of a remote source, the ``tier`` its weights are in
    (device, host, disk or absent) and, for a LoRA adapter, its base as ``parent``."""
    return ModelCard(
        id=info.name,
        created=info.created,
        kind=info.kind.value,
        state=info.state.value,
        bytes=info.bytes,
        preload=info.preload,
        max_model_len=info.max_model_len,
        message=redact(info.message),
        idle_timeout_seconds=info.idle_timeout_seconds,
        source=info.source,
        revision=info.revision,
        parent=info.parent,
        tier=info.tier.value,
    )


def info_json(info: ModelInfo) -> dict[str, Any]:
    """A :class:`ModelInfo` as JSON-ready dict (enums as their values)."""
    out = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(info).items()}
    out["message"] = redact(out.get("message", ""))
    return out


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """Every model of the catalogue, loaded or not (a request for an unloaded one loads it)."""
    return ModelList(data=[model_card(i) for i in request.app.state.provider.list_models()])


@router.get("/v1/models/{name:path}")
async def retrieve_model(name: str, request: Request) -> ModelCard:
    """One model of the catalogue. Errors: 404 ``model_not_found``."""
    for info in request.app.state.provider.list_models():
        if info.name == name:
            return model_card(info)
    raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")


@router.post("/admin/models/{name}/load")
async def load_model(name: str, request: Request) -> dict[str, Any]:
    """Load ``name`` now (evicting idle models if the memory budget needs it); returns its ModelInfo.

    Errors: 404 unknown model; 503 the load failed or memory could not be freed.
    """
    return info_json(await request.app.state.provider.load(name))


@router.post("/admin/models/{name}/unload")
async def unload_model(name: str, request: Request) -> dict[str, Any]:
    """Unload ``name`` (frees its weights and KV pool); returns its ModelInfo.

    Errors: 404 unknown model; 503 the model is busy or preloaded.
    """
    return info_json(await request.app.state.provider.unload(name))
