"""The OpenAPI document as the server behaves: its real status codes, OpenAI's error body, SSE.

FastAPI documents every body route with 200 and 422; this server never sends 422 (validation
failures are OpenAI's 400) and does send 400/401/404/413/429/500/503, and the generation routes
stream ``text/event-stream`` when ``stream`` is true. :func:`install_openapi` rewrites the
generated document accordingly (once, cached by FastAPI).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kubeinfer_serving.api.auth import BEARER, OPEN_PATHS

_ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_REASONS = {
    400: "Invalid request (OpenAI error body; ``param`` names the field)",
    401: "Missing or invalid API key",
    403: "Not allowed for this key, or a cross-site request to an admin route",
    404: "Unknown model or route",
    408: "The request body did not arrive in time",
    413: "Request body larger than the server's limit",
    429: "Queue or tenant limit reached; retry after ``Retry-After`` seconds",
    500: "The server failed this request",
    503: "Model unavailable, engine stopped, or the server is shutting down",
}

_GENERATION = (400, 401, 404, 408, 413, 429, 500, 503)
#: Status codes per path prefix (first match wins).
_STATUSES: list[tuple[str, tuple[int, ...]]] = [
    ("/v1/completions", _GENERATION),
    ("/v1/chat/completions", _GENERATION),
    ("/v1/responses", _GENERATION),
    ("/v1/embeddings", (400, 401, 404, 408, 413, 429, 500, 503)),
    ("/v1/models", (401, 404)),
    ("/tokenize", (400, 401, 404, 408, 413, 500, 503)),
    ("/detokenize", (400, 401, 404, 408, 413, 500, 503)),
    ("/tokenizer_info", (400, 401, 404, 500, 503)),
    ("/version", (401,)),
    ("/admin/", (401, 403, 404, 503)),
    ("/health", (503,)),
    ("/ready", (503,)),
]
_STREAMING = {"/v1/completions", "/v1/chat/completions", "/v1/responses"}


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with a generator of the corrected document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        doc.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = _ERROR_SCHEMA
        scheme = BEARER.model.model_dump(mode="json", by_alias=True, exclude_none=True)
        doc["components"]["securitySchemes"] = {BEARER.scheme_name: scheme}
        ref = {"$ref": "#/components/schemas/ErrorResponse"}
        for path, ops in doc.get("paths", {}).items():
            statuses = next((codes for prefix, codes in _STATUSES if path.startswith(prefix)), ())
            for op in ops.values():
                if path not in OPEN_PATHS:
                    op["security"] = [{BEARER.scheme_name: []}]
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                for code in statuses:
                    responses[str(code)] = {"description": _REASONS[code], "content": {"application/json": {"schema": ref}}}
                if path in _STREAMING and "200" in responses:
                    responses["200"].setdefault("content", {})["text/event-stream"] = {
                        "schema": {"type": "string",
                                   "description": "Server-sent events: `data: <chunk JSON>` per chunk, then `data: [DONE]`"}
                    }
        doc.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        doc.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
