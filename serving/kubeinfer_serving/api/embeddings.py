"""``POST /v1/embeddings``: sentence embeddings from an embedding model of the catalogue.

``encoding_format: base64`` returns each vector as base64 of little-endian float32 bytes (what
OpenAI's Python client asks for by default and decodes). ``dimensions`` is refused: the served
models have one fixed output size.
"""

from __future__ import annotations

import base64
from contextlib import AsyncExitStack

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kubeinfer_serving.api.auth import identity_of
from kubeinfer_serving.api.errors import APIError
from kubeinfer_serving.api.fields import check_fields
from kubeinfer_serving.api.generation import ClientDisconnected, until_disconnect
from kubeinfer_serving.api.limits import OffLoopJSONRoute
from kubeinfer_serving.api.prompts import split_inputs
from kubeinfer_serving.api.schemas import EmbeddingData, EmbeddingRequest, EmbeddingResponse, Usage
from kubeinfer_serving.api.serving import CLIENT_CLOSED, acquire
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


@router.post("/v1/embeddings", response_model=None)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """Embed each input; returns OpenAI's ``list`` of ``embedding`` objects with ``usage.prompt_tokens``.

    Errors (OpenAI body): 404 unknown model; 400 a generative model, empty input, ``dimensions``,
    more than ``--max-embedding-inputs`` inputs or ``--max-embedding-tokens`` tokens, an unknown or
    unimplemented field (e.g. vLLM's ``truncate_prompt_tokens``), or input the embedder rejects (e.g.
    too long); 503 model cannot be loaded. A client that leaves stops its work.
    """
    check_fields(request, body, defaults={"add_special_tokens": True})
    if body.dimensions is not None:
        raise APIError(400, "dimensions is not supported: the model's output size is fixed", param="dimensions",
                       code="unsupported_parameter")
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
        try:
            vectors, num_tokens = await until_disconnect(
                request, served.embedder.embed(items, max_total_tokens=settings.max_embedding_tokens))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        except ValueError as exc:
            raise APIError(400, str(exc), param="input") from exc
    admission.charge(tenant, int(num_tokens), "prompt")
    data = [EmbeddingData(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
    usage = Usage(prompt_tokens=int(num_tokens), total_tokens=int(num_tokens))
    resp = EmbeddingResponse(data=data, model=body.model, usage=usage)
    return JSONResponse(resp.model_dump(mode="json", exclude_none=True))
