"""Authentication: ``Authorization: Bearer <key>`` as OpenAI's clients send it, mapped to a tenant.

Rules (:class:`AuthMiddleware`, pure ASGI so it costs one dict lookup per request):

* ``/health``, ``/ready``, ``/metrics`` and ``/kubeinfer/load`` stay open: the kubelet,
  Prometheus and the fleet router call them without credentials (put ``/metrics`` and
  ``/kubeinfer/load`` behind a NetworkPolicy if their numbers are sensitive).
* With keys configured (:mod:`.tenancy`), every other route, ``/docs`` and ``/openapi.json``
  included, needs a configured key: none or an unknown one gets 401 in OpenAI's body
  (``code: invalid_api_key``) with ``WWW-Authenticate: Bearer``. The request's
  :class:`~kubeinfer_serving.api.tenancy.Identity` is put in ``scope["state"]["identity"]``.
* ``/admin/*`` and vLLM's ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (:data:`ADMIN_PATHS`) need an admin key (403 ``admin_key_required`` for another valid key) and refuses
  what a browser can send cross-site without a CORS preflight (403 ``cross_site_request``):
  a cross-site ``Origin`` or ``Sec-Fetch-Site``, or a form/text ``Content-Type``. The last two
  rules hold even with no keys configured, so a web page cannot drive the admin API of an open
  development server.
* WebSocket handshakes are not covered by CORS at all (a browser opens a socket to any site), so
  the same cross-site rule refuses them (close 1008, an HTTP 403 to the handshake): a foreign
  ``Origin`` or ``Sec-Fetch-Site``, unless the origin is in ``allowed_origins``
  (``--allowed-origins``). Clients that are not browsers send no ``Origin`` and are unaffected.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import urlsplit

from fastapi.security import HTTPBearer
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from kubeinfer_serving import metrics
from kubeinfer_serving.api.errors import APIError, error_response
from kubeinfer_serving.api.load import LOAD_PATH
from kubeinfer_serving.api.tenancy import Identity, KeyStore

#: Paths served without credentials.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", LOAD_PATH})
#: Admin routes outside ``/admin/`` (vLLM's paths for them).
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
#: Content types a browser may POST cross-site without a preflight (the CORS "simple" ones).
SIMPLE_CONTENT_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})


def identity_of(scope: Scope, keys: KeyStore | None = None) -> Identity:
    """The identity :class:`AuthMiddleware` attached to ``scope`` (anonymous when there is none)."""
    identity = scope.get("state", {}).get("identity")
    if identity is None:
        return (keys or KeyStore({}, {})).anonymous
    return identity


def cross_site_reason(scope: Scope, allowed_origins: Collection[str] = ()) -> str | None:
    """Why a request looks like a browser's cross-site request, or None when it does not.

    Args:
        allowed_origins: origins trusted whatever the other headers say.
    """
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
    if headers.get("origin", "").rstrip("/") in allowed_origins:
        return None
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {fetch_site!r}"
    origin = headers.get("origin")
    if origin is not None:
        host = headers.get("host", "")
        if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
            return "the Origin is another site"
    ctype = headers.get("content-type")
    if ctype is not None and scope["type"] == "http" and ctype.split(";", 1)[0].strip().lower() in SIMPLE_CONTENT_TYPES:
        return f"Content-Type {ctype.split(';', 1)[0].strip()!r} is not accepted here (use application/json or none)"
    return None


#: The bearer scheme (FastAPI's): parses ``Authorization: Bearer <key>`` for :class:`AuthMiddleware`
#: and documents it in the OpenAPI document, so ``/docs`` can authorize.
BEARER = HTTPBearer(auto_error=False, scheme_name="APIKey",
                    description="An API key of the keys file, as OpenAI's clients send it.")


async def bearer_token(scope: Scope) -> str | None:
    """The request's bearer token (:data:`BEARER`'s reading of its ``Authorization`` header), or None."""
    credentials = await BEARER(HTTPConnection(scope))
    return credentials.credentials.strip() or None if credentials is not None else None


class AuthMiddleware:
    """Authenticate requests against ``keys`` (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        keys: the configured keys; with none, every request is the anonymous ``default`` tenant.
        allowed_origins: web origins whose pages may open WebSockets (``--allowed-origins``).
    """

    def __init__(self, app: ASGIApp, *, keys: KeyStore, allowed_origins: Collection[str] = ()) -> None:
        self.app = app
        self.keys = keys
        self.allowed_origins = frozenset(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Attach the identity and pass the request on, or answer 401/403."""
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        admin_route = scope["path"].startswith("/admin/") or scope["path"] in ADMIN_PATHS
        err: APIError | None = None
        if admin_route or scope["type"] == "websocket":
            reason = cross_site_reason(scope, self.allowed_origins if scope["type"] == "websocket" else ())
            if reason is not None:
                what = "the admin API" if admin_route else "WebSockets"
                err = APIError(403, f"Cross-site requests to {what} are refused: {reason}", code="cross_site_request")
        identity = self.keys.anonymous
        if err is None and self.keys.enabled:
            token = await bearer_token(scope)
            found = self.keys.lookup(token) if token is not None else None
            if found is None:
                metrics.AUTH_FAILURES.labels(reason="missing_key" if token is None else "invalid_key").inc()
                message = ("You didn't provide an API key. Send it in the Authorization header as "
                           "'Authorization: Bearer YOUR_KEY'") if token is None else "Incorrect API key provided"
                err = APIError(401, message, code="invalid_api_key")
            elif admin_route and not found.admin:
                err = APIError(403, "The admin API needs an admin key", code="admin_key_required")
            else:
                identity = found
        if err is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": err.message[:120]})
                return
            response = error_response(err)
            if err.status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["identity"] = identity
        await self.app(scope, receive, send)
