"""``POST /v1/embeddings``: sentence embeddings from an embedding model of the catalogue.

``encoding_format: base64`` returns each vector as base64 of little-endian float32 bytes (what
OpenAI's Python client asks for by default and decodes). ``dimensions`` (OpenAI's) keeps the
first values of each vector and renormalises them, for models trained for it (Matryoshka:
``is_matryoshka`` or ``matryoshka_dimensions`` in their ``config.json``, as vLLM reads them);
other models accept only their own size. vLLM's ``normalize`` turns the L2 normalisation on or
off (default: as the model's pipeline does).
"""

from __future__ import annotations

import base64
from contextlib import AsyncExitStack
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kubeinfer_serving.api.auth import identity_of
from kubeinfer_serving.api.errors import CLIENT_CLOSED, APIError, ClientDisconnected
from kubeinfer_serving.api.fields import check_fields
from kubeinfer_serving.api.generation import until_disconnect
from kubeinfer_serving.api.limits import OffLoopJSONRoute
from kubeinfer_serving.api.prompts import split_inputs
from kubeinfer_serving.api.schemas import EmbeddingData, EmbeddingRequest, EmbeddingResponse, Usage
from kubeinfer_serving.api.serving import acquire
from kubeinfer_serving.registry.protocol import ModelKind

router = APIRouter(route_class=OffLoopJSONRoute)


def _inputs(raw: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    """The request's ``input`` as a list of strings or a list of token-id lists.

    Raises:
        APIError: 400 for an empty list or an empty string/token list.
    """
    items = split_inputs(raw, "input")
    if any(len(x) == 0 for x in items):
        raise APIError(400, "input must not contain empty strings or token lists", param="input")
    return items


def _encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    """One embedding as a float list, or base64 of its little-endian float32 bytes."""
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def check_dimensions(embedder: Any, dimensions: int | None, model: str) -> int | None:
    """The number of values to keep per vector (None: all), checked against the model.

    Raises:
        APIError: 400 ``param=dimensions`` for a size other than the model's own on a model not
            trained for truncation, one larger than the model's, or one outside its
            ``matryoshka_dimensions``.
    """
    if dimensions is None or dimensions == embedder.dim:
        return None
    if not embedder.is_matryoshka:
        raise APIError(400, f"Model {model!r} does not support Matryoshka representation; dimensions must be "
                       f"{embedder.dim} (its output size) or left out", param="dimensions",
                       code="unsupported_parameter")
    allowed = embedder.matryoshka_dimensions
    if dimensions > embedder.dim or (allowed and dimensions not in allowed):
        sizes = ", ".join(map(str, allowed)) if allowed else f"1 to {embedder.dim}"
        raise APIError(400, f"dimensions {dimensions} is not available for model {model!r} ({sizes})",
                       param="dimensions", code="invalid_value")
    return dimensions


@router.post("/v1/embeddings", response_model=None)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """Embed each input; returns OpenAI's ``list`` of ``embedding`` objects with ``usage.prompt_tokens``.

    Errors (OpenAI body): 404 unknown model; 400 a generative model, empty input, ``dimensions`` the
    model cannot give (:func:`check_dimensions`),
    more than ``--max-embedding-inputs`` inputs or ``--max-embedding-tokens`` tokens, an unknown or
    unimplemented field (e.g. vLLM's ``truncate_prompt_tokens``), or input the embedder rejects (e.g.
    too long); 503 model cannot be loaded. A client that leaves stops its work.
    """
    check_fields(request, body, defaults={"add_special_tokens": True})
    settings = request.app.state.settings
    items = _inputs(body.input)
    if len(items) > settings.max_embedding_inputs:
        raise APIError(400, f"input has {len(items)} items; at most {settings.max_embedding_inputs} are allowed "
                       "per request", param="input", code="invalid_value")
    tenant = identity_of(request.scope).tenant
    admission = request.app.state.admission
    admission.check_rate(tenant)
    async with AsyncExitStack() as stack:
        served = await acquire(request, stack, body.model, ModelKind.EMBED)
        dimensions = check_dimensions(served.embedder, body.dimensions, body.model)
        try:
            vectors, num_tokens = await until_disconnect(
                request, served.embedder.embed(items, max_total_tokens=settings.max_embedding_tokens,
                                               normalize=body.normalize, dimensions=dimensions))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        except ValueError as exc:
            raise APIError(400, str(exc), param="input") from exc
    admission.charge(tenant, int(num_tokens), "prompt")
    data = [EmbeddingData(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
    usage = Usage(prompt_tokens=int(num_tokens), total_tokens=int(num_tokens))
    resp = EmbeddingResponse(data=data, model=body.model, usage=usage)
    return JSONResponse(resp.model_dump(mode="json", exclude_none=True))
