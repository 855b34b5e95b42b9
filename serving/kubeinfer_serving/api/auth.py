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
"""

from __future__ import annotations

from urllib.parse import urlsplit

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


def cross_site_reason(scope: Scope) -> str | None:
    """Why a request looks like a browser's cross-site simple request, or None when it does not."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {fetch_site!r}"
    origin = headers.get("origin")
    if origin is not None:
        host = headers.get("host", "")
        if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
            return "the Origin is another site"
    ctype = headers.get("content-type")
    if ctype is not None and ctype.split(";", 1)[0].strip().lower() in SIMPLE_CONTENT_TYPES:
        return f"Content-Type {ctype.split(';', 1)[0].strip()!r} is not accepted here (use application/json or none)"
    return None


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class AuthMiddleware:
    """Authenticate requests against ``keys`` (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        keys: the configured keys; with none, every request is the anonymous ``default`` tenant.
    """

    def __init__(self, app: ASGIApp, *, keys: KeyStore) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Attach the identity and pass the request on, or answer 401/403."""
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        admin_route = scope["path"].startswith("/admin/") or scope["path"] in ADMIN_PATHS
        err: APIError | None = None
        if admin_route:
            reason = cross_site_reason(scope)
            if reason is not None:
                err = APIError(403, f"Cross-site requests to the admin API are refused: {reason}",
                               code="cross_site_request")
        identity = self.keys.anonymous
        if err is None and self.keys.enabled:
            token = _bearer(scope)
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
