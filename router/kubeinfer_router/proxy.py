"""The router's HTTP server: read the body once, pick an endpoint, forward, stream the answer back.

Per request (any path but the router's own ``/health``, ``/ready``, ``/metrics``):

1. The body is read once, up to ``--max-body-bytes`` (beyond it 413 with OpenAI's body, code
   ``request_too_large``, as the pod answers); JSON gives the routing key (model, adapter,
   session or prompt prefix: :func:`kubeinfer_router.keys.routing_key`) and ``priority``. A body
   that is not a JSON object routes to any endpoint, which answers the error.
2. :meth:`Picker.pick <kubeinfer_router.picker.Picker.pick>` chooses an endpoint. When none is
   usable (scaled to zero, all unready or ejected) the request is *held*: it waits for discovery
   or a cool-down to bring one, at most ``--hold-timeout-seconds`` and with at most
   ``--max-held-requests`` held at once; then 503 + ``Retry-After`` with OpenAI's body (code
   ``no_ready_endpoints``). ``kubeinfer_router_held_requests`` counts the held requests.
3. The request goes to the endpoint over one pooled keep-alive client session with the client's
   headers minus hop-by-hop ones; the answer's status and headers come back the same way, plus
   ``x-kubeinfer-endpoint`` (the endpoint's name) and ``x-kubeinfer-route`` (the picker's reason),
   and its body is relayed chunk by chunk as it arrives (SSE is never buffered).
4. Failures: a connection error or a 5xx answer counts against the endpoint's passive health
   (ejection after ``--eject-after-failures`` in a row). Before anything was sent to the client, a
   connection error or a draining pod's 503 is retried on another endpoint
   (:func:`kubeinfer_router.health.is_retryable`, at most ``--max-retries``); after the first
   byte never: an upstream cut mid-stream cuts the client's connection too, so the client sees an
   incomplete response (an error), never a hang or a silently shortened answer.

``/v1/models`` and ``/v1/models/{id}`` go to an endpoint like any request (so its API-key check
applies); a 200 answer becomes the union of all endpoints' models, each card with ``endpoints:
[{"name", "url", "tier"}]``. WebSocket routes (``/v1/ws/...``) are accepted by the router, routed
by their first request frame (model and prompt as for HTTP) and then relayed frame by frame in both
directions to that endpoint for the connection's life.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CONTENT_TYPE_LATEST
from yarl import URL

from kubeinfer_router.config import RouterSettings
from kubeinfer_router.discovery import EndpointMap, EndpointSource, KubernetesDiscovery, StaticDiscovery
from kubeinfer_router.health import EjectionPolicy, is_retryable
from kubeinfer_router.keys import RoutingKey, request_priority, routing_key
from kubeinfer_router.metrics import NONE, RouterMetrics, endpoint_state
from kubeinfer_router.picker import Decision, Picker
from kubeinfer_router.poller import LoadPoller
from kubeinfer_router.state import EndpointState, EndpointTable

log = logging.getLogger("kubeinfer.router")

#: Hop-by-hop headers (RFC 9110 7.6.1, plus ``Keep-Alive``/``Proxy-Connection``): never forwarded.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"})
#: Request headers the upstream request sets itself (the router has read the body: no ``Expect``).
_REQUEST_OWN = frozenset({"host", "content-length", "expect"})
#: WebSocket handshake headers (the upstream handshake makes its own).
_WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                           "sec-websocket-protocol", "sec-websocket-accept"})
#: Response headers naming the endpoint that answered and why it was picked.
ENDPOINT_HEADER = "x-kubeinfer-endpoint"
ROUTE_HEADER = "x-kubeinfer-route"
#: The serving pod's residency header (ids on its device, percent-encoded, ", "-joined).
RESIDENT_HEADER = "x-kubeinfer-resident"
#: ``Retry-After`` (seconds) of the 503 a held request gets at the end of its hold.
HOLD_RETRY_AFTER_SECONDS = 5
#: Seconds between two checks of a held request when nothing wakes it (ejection cool-downs end
#: without an event).
HOLD_RECHECK_SECONDS = 0.25
#: Largest 503 body read to decide whether it is a draining pod's (retryable) answer.
MAX_RETRY_PROBE_BYTES = 64 * 1024
#: Seconds an idle upstream keep-alive connection is kept: below the pod's (uvicorn) 5 s, so the
#: router never sends a request on a connection the pod is closing.
UPSTREAM_KEEPALIVE_SECONDS = 4.0
#: Routes the router answers with the union of its endpoints' models.
MODELS_PATH = "/v1/models"
#: Path prefix of the serving pod's WebSocket routes.
WS_PREFIX = "/v1/ws/"


def openai_error(message: str, code: str, type_: str) -> dict:
    """OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _error_response(status: int, message: str, code: str, type_: str,
                    headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(openai_error(message, code, type_)),
                        content_type="application/json", headers=headers)


def forward_headers(headers: Mapping[str, str], drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """``headers`` minus hop-by-hop ones, those the ``Connection`` header names, and ``drop`` (lower case).

    Repeated headers stay repeated, in order.
    """
    named = {t.strip().lower() for v in headers.getall("connection", []) for t in v.split(",")} \
        if isinstance(headers, (CIMultiDict, CIMultiDictProxy)) else set()
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        low = k.lower()
        if low in HOP_BY_HOP or low in named or low in drop:
            continue
        out.add(k, v)
    return out


def parse_request(body: bytes, headers: Mapping[str, str], prefix_chars: int) -> tuple[RoutingKey, int, str | None]:
    """The routing key, priority and model of a request body (JSON object; anything else routes to any endpoint).

    Returns:
        ``(key, priority, model)``: priority is the body's integer ``priority`` (0 when absent or
        not an integer); model is ``body["model"]`` when it is a string.
    """
    obj: object = None
    if body:
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            obj = None
    if not isinstance(obj, dict):
        return routing_key(None, headers, prefix_chars=prefix_chars), 0, None
    key = routing_key(obj, headers, prefix_chars=prefix_chars)
    return key, request_priority(obj), key.model


def _never_sent(exc: BaseException) -> BaseException:
    """A connect timeout as the connection error it is for the retry rule (the request never left the
    router; ``health.is_connection_error`` keeps other timeouts unretryable)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectionError(f"connect timeout: {exc!r}")
    return exc


@dataclass
class _Outcome:
    """What the client got, for ``kubeinfer_router_requests_total``."""

    code: int = 0
    endpoint: str = NONE
    reason: str = NONE


class _Retry(Exception):
    """Internal: this attempt failed before anything reached the client and may go elsewhere."""

    def __init__(self, reason: str, answer: tuple[int, CIMultiDict[str], bytes] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answer = answer


class _HeadersWithBody(web.StreamResponse):
    """A relayed answer whose headers leave in one write with the first body bytes (aiohttp buffers them
    until the first ``write``/``write_eof``, as its ``web.Response`` does): one send and one wake-up of
    the client less per answer. :meth:`Router._relay` writes the headers alone at once when the
    upstream's body has not begun, so they are never held back waiting for it."""

    _send_headers_immediately = False


class Router:
    """The router's state and request handling (one per process, one asyncio loop, no locks).

    Args:
        settings: the router's settings.
        discovery: the endpoint source (None: from the settings, ``--endpoints`` or ``--kube-service``).
        clock: monotonic clock in seconds (the table's, the picker's and the ejections').

    Attributes:
        table: every endpoint's state.
        synced: True once discovery reported at least once (``/ready``).
    """

    def __init__(self, settings: RouterSettings, discovery: EndpointSource | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        if discovery is None:
            discovery = (StaticDiscovery(settings.endpoints) if settings.endpoints is not None
                         else KubernetesDiscovery(settings.kube_service or "", settings.namespace()))
        self.discovery = discovery
        policy = EjectionPolicy(failures=settings.eject_after_failures, base_seconds=settings.eject_base_seconds,
                                max_seconds=settings.eject_max_seconds)
        self.table = EndpointTable(clock=clock, policy=policy)
        self.picker = Picker(load_factor=settings.load_factor, virtual_nodes=settings.virtual_nodes,
                             imbalance_min_requests=settings.imbalance_min_requests,
                             imbalance_ratio=settings.imbalance_ratio, clock=clock,
                             affinity_ttl_seconds=settings.affinity_ttl_seconds, affinity_keys=settings.affinity_keys)
        self.metrics = RouterMetrics(self.table.all, clock)
        self.synced = False
        self.session: aiohttp.ClientSession | None = None
        self.poller: LoadPoller | None = None
        self._held = 0
        self._changed = asyncio.Event()
        self._connect_timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_seconds,
                                                      connect=settings.connect_timeout_seconds)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, _app: web.Application | None = None) -> None:
        """Open the pooled client session, start discovery and the load poller."""
        # No connection cap: every concurrent stream holds one upstream connection (256+ streams, 256+
        # connections); idle ones are reused (keep-alive) and closed before the pod would close them.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False, timeout=self._connect_timeout,
                                             skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"))
        self.poller = LoadPoller(self.table, self.session, self.settings.poll_interval_seconds)
        self.poller.start()
        await self.discovery.start(self.on_endpoints)

    async def stop(self, _app: web.Application | None = None) -> None:
        """Stop discovery and the poller, close the session."""
        await self.discovery.stop()
        if self.poller is not None:
            await self.poller.stop()
        if self.session is not None:
            await self.session.close()

    def on_endpoints(self, endpoints: EndpointMap) -> None:
        """Discovery's callback: sync the table, poll new endpoints now, wake held requests."""
        known = {ep.url for ep in self.table.all()}
        self.table.sync(endpoints)
        if not self.synced:
            log.info("discovery synced: %d endpoint(s), %d ready", len(endpoints),
                     sum(1 for _, ready in endpoints.values() if ready))
        elif set(endpoints) != known:
            log.info("endpoints now: %s", ", ".join(f"{n}{'' if r else ' (unready)'}" for n, r in endpoints.values())
                     or "none")
        self.synced = True
        if self.poller is not None:
            self.poller.poke()
        self.wake()

    def wake(self) -> None:
        """Let every held request try to pick again."""
        self._changed.set()
        self._changed = asyncio.Event()

    # -- the router's own routes -----------------------------------------------------------------

    async def health(self, _: web.Request) -> web.Response:
        """``GET /health``: 200 while the process serves."""
        return web.json_response({"status": "ok"})

    async def ready(self, _: web.Request) -> web.Response:
        """``GET /ready``: 200 once discovery synced (with endpoints, or none while holding at zero), else 503."""
        if not self.synced:
            return web.json_response({"status": "discovering endpoints"}, status=503)
        counts: dict[str, int] = {}
        now = self.clock()
        for ep in self.table.all():
            state = endpoint_state(ep, now)
            counts[state] = counts.get(state, 0) + 1
        return web.json_response({"status": "ok", "endpoints": counts, "held_requests": self._held})

    async def metrics_route(self, _: web.Request) -> web.Response:
        """``GET /metrics``: the ``kubeinfer_router_*`` metrics."""
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- proxying --------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every other route: hold, pick, forward (see the module docstring)."""
        received = time.perf_counter()
        if request.path.startswith(WS_PREFIX) and request.headers.get("upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        outcome = _Outcome()
        model: str | None = None
        try:
            limit = self.settings.max_body_bytes
            if request.content_length is not None and request.content_length > limit:
                outcome.reason = "too_large"
                return self._too_large(outcome)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                outcome.reason = "too_large"
                return self._too_large(outcome)
            key, priority, model = parse_request(body, request.headers, self.settings.prefix_chars)
            transform = None
            if request.method == "GET" and (request.path == MODELS_PATH or request.path.startswith(MODELS_PATH + "/")):
                transform = self._models_union
            return await self._forward(request, body, key, priority, received, outcome, transform)
        finally:
            self.metrics.count_request(model, outcome.endpoint, outcome.reason, outcome.code)

    def _too_large(self, outcome: _Outcome) -> web.Response:
        outcome.code = 413
        return _error_response(413, f"The request body is larger than the limit of {self.settings.max_body_bytes} bytes",
                               "request_too_large", "invalid_request_error", headers={"Connection": "close"})

    def _no_endpoint(self, outcome: _Outcome) -> web.Response:
        """503 ``no_ready_endpoints`` at a hold's end (timed out, or the hold was full)."""
        outcome.code = 503
        self.metrics.hold_timeouts.inc()
        name = self.settings.service_name()
        why = "hold timeout" if outcome.reason == "hold_timeout" else "too many requests held"
        return _error_response(
            503, f"No serving endpoint of {name} became ready ({why}); retry after the Retry-After header's seconds",
            "no_ready_endpoints", "service_unavailable",
            headers={"Retry-After": str(HOLD_RETRY_AFTER_SECONDS), "x-should-retry": "true"})

    @staticmethod
    def _unreachable(outcome: _Outcome, message: str) -> web.Response:
        """502 ``endpoint_unreachable``: the attempt failed before an answer and no retry is left."""
        outcome.code = 502
        return _error_response(502, message, "endpoint_unreachable", "server_error")

    @staticmethod
    async def _refuse_ws(client: web.WebSocketResponse, answer: web.Response) -> web.WebSocketResponse:
        """An HTTP error answer as WebSocket frames (its body, then ``[DONE]``), then close 1013 (try again later)."""
        assert answer.text is not None
        await client.send_str(answer.text)
        await client.send_str("[DONE]")
        await client.close(code=aiohttp.WSCloseCode.TRY_AGAIN_LATER)
        return client

    async def _pick(self, key: RoutingKey, priority: int, exclude: set[str], outcome: _Outcome) -> Decision | None:
        """A decision, holding while no endpoint is usable; None at the hold's end (``outcome`` says why).

        A retry (``exclude`` not empty) never holds: every usable endpoint was tried, and the client
        gets the last failure at once.
        """
        decision = self.picker.pick(self.table.all(), key, priority, frozenset(exclude))
        if decision is not None:
            return decision
        if exclude:
            outcome.reason = "retries_exhausted"
            return None
        if self._held >= self.settings.max_held_requests:
            outcome.reason = "held_full"
            return None
        deadline = self.clock() + self.settings.hold_timeout_seconds
        self._held += 1
        self.metrics.held.inc()
        try:
            while True:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    outcome.reason = "hold_timeout"
                    return None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(remaining, HOLD_RECHECK_SECONDS))
                decision = self.picker.pick(self.table.all(), key, priority, frozenset(exclude))
                if decision is not None:
                    return decision
        finally:
            self._held -= 1
            self.metrics.held.dec()

    def _failed(self, ep: EndpointState) -> None:
        if self.table.record_failure(ep.url):
            self.metrics.ejections.labels(ep.name).inc()
            log.warning("endpoint %s ejected for %.1f s (ejection %d in a row)", ep.name,
                        max(0.0, ep.ejected_until - self.clock()), ep.ejection_count)

    async def _forward(self, request: web.Request, body: bytes, key: RoutingKey, priority: int, received: float,
                       outcome: _Outcome,
                       transform: Callable[[bytes, str], Awaitable[bytes | None]] | None) -> web.StreamResponse:
        headers = forward_headers(request.headers, _REQUEST_OWN | ({"accept-encoding"} if transform else frozenset()))
        peer = request.remote or ""
        prior = headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        headers.setdefault("X-Forwarded-Proto", request.scheme)
        if request.host:
            headers.setdefault("X-Forwarded-Host", request.host)
        exclude: set[str] = set()
        last_answer: tuple[int, CIMultiDict[str], bytes] | None = None
        attempts = 0
        while True:
            decision = await self._pick(key, priority, exclude, outcome)
            if decision is None:
                if last_answer is not None:  # the draining pod's own 503, as the client would have seen it
                    outcome.code = last_answer[0]
                    return web.Response(status=last_answer[0], body=last_answer[2], headers=last_answer[1])
                if outcome.reason == "retries_exhausted":
                    return self._unreachable(outcome, "Every endpoint tried for this request failed to answer")
                return self._no_endpoint(outcome)
            ep = decision.endpoint
            outcome.endpoint, outcome.reason = ep.name, decision.reason
            try:
                return await self._attempt(request, body, headers, key, decision, received, outcome, transform,
                                           may_retry=attempts < self.settings.max_retries)
            except _Retry as retry:
                attempts += 1
                exclude.add(ep.url)
                last_answer = retry.answer
                self.metrics.retries.labels(retry.reason).inc()
                log.info("retrying %s %s elsewhere: %s from %s", request.method, request.path, retry.reason, ep.name)

    async def _attempt(self, request: web.Request, body: bytes, headers: CIMultiDict[str], key: RoutingKey,
                       decision: Decision, received: float, outcome: _Outcome,
                       transform: Callable[[bytes, str], Awaitable[bytes | None]] | None,
                       may_retry: bool) -> web.StreamResponse:
        """One try on one endpoint; raises :class:`_Retry` when it failed before the client got anything."""
        assert self.session is not None
        ep = decision.endpoint
        url = URL(ep.url + request.raw_path, encoded=True)
        self.table.begin(ep.url)
        ttfb: float | None = None
        resp: aiohttp.ClientResponse | None = None
        try:
            sent = time.perf_counter()
            overhead = sent - received
            try:
                resp = await self.session.request(request.method, url, headers=headers, data=body or None,
                                                  allow_redirects=False, timeout=self._connect_timeout)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
                self._failed(ep)
                log.warning("%s %s to %s failed before an answer: %r", request.method, request.path, ep.name, exc)
                if may_retry and is_retryable(_never_sent(exc), None, None, 0):
                    raise _Retry("connection_error") from exc
                return self._unreachable(outcome,
                                         f"The endpoint {ep.name} failed before answering: {type(exc).__name__}")
            headers_at = time.perf_counter()
            ttfb = headers_at - sent
            self.metrics.observe_ttfb(ep.name, ttfb)
            status = resp.status
            if status >= 500:
                self._failed(ep)
            else:
                self.table.record_success(ep.url)
            resident = resp.headers.get(RESIDENT_HEADER)
            self.table.apply_resident_header(ep.url, key.model, resident, status)
            out_headers = forward_headers(resp.headers)
            out_headers[ENDPOINT_HEADER] = ep.name
            out_headers[ROUTE_HEADER] = decision.reason
            if status == 503:
                data = await resp.content.read(MAX_RETRY_PROBE_BYTES + 1)
                if len(data) <= MAX_RETRY_PROBE_BYTES and is_retryable(None, 503, data, 0):
                    self.table.mark_draining(ep.url)
                    if may_retry:
                        out_headers.popall("Content-Length", None)
                        raise _Retry("draining", (status, out_headers, data))
                outcome.code = status
                rest = await resp.read() if len(data) > MAX_RETRY_PROBE_BYTES else b""
                out_headers.popall("Content-Length", None)
                return web.Response(status=status, body=data + rest, headers=out_headers)
            if transform is not None and status == 200:
                data = await resp.read()
                changed = await transform(data, request.path)
                out_headers.popall("Content-Length", None)
                outcome.code = status
                self.metrics.overhead.observe(overhead + time.perf_counter() - headers_at)
                return web.Response(status=status, body=changed if changed is not None else data, headers=out_headers)
            return await self._relay(request, resp, out_headers, ep, outcome, overhead, headers_at)
        finally:
            if resp is not None:
                resp.close()
            self.table.end(ep.url, ttfb)

    async def _relay(self, request: web.Request, resp: aiohttp.ClientResponse, out_headers: CIMultiDict[str],
                     ep: EndpointState, outcome: _Outcome, overhead: float, headers_at: float) -> web.StreamResponse:
        """Stream the upstream answer to the client chunk by chunk; cut the client if the upstream cuts."""
        out = _HeadersWithBody(status=resp.status, reason=resp.reason, headers=out_headers)
        outcome.code = resp.status
        await out.prepare(request)
        self.metrics.overhead.observe(overhead + time.perf_counter() - headers_at)
        content = resp.content
        head = True
        while True:
            try:
                # first the body bytes that came with the headers (they leave in the headers' write)
                chunk = content.read_nowait() if head else await content.readany()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                self._failed(ep)
                log.warning("%s %s: %s cut the answer after it began (%r); cutting the client's connection too",
                            request.method, request.path, ep.name, exc)
                self._cut(request)
                return out
            if head:
                head = False
                if not chunk and not content.at_eof():
                    # the body has not begun (a stream's first token is still being computed): the headers
                    # go now, so the client sees the answer begin when the pod's answer did
                    try:
                        await out.write(b"")
                    except ConnectionError:
                        return out
                    continue
            if not chunk:
                break
            try:
                await out.write(chunk)
            except ConnectionError:  # the client left: the finally of _attempt drops the upstream connection
                return out
        with contextlib.suppress(ConnectionError):  # a client that stops reading at [DONE] may be gone already
            await out.write_eof()
        return out

    @staticmethod
    def _cut(request: web.Request) -> None:
        """Close the client's connection mid-answer, so it sees an incomplete response (not a short one)."""
        transport = request.transport
        if transport is not None:
            transport.abort()

    async def _models_union(self, data: bytes, path: str) -> bytes | None:
        """An endpoint's 200 ``/v1/models[/{id}]`` answer with every endpoint's models and where each is."""
        try:
            answer = json.loads(data)
        except ValueError:
            return None
        if not isinstance(answer, dict):
            return None
        view = self.table.models_view()

        def where(model_id: str) -> list[dict]:
            return [{"name": ep.name, "url": ep.url, "tier": tier.value} for ep, tier in view.get(model_id, [])]

        if path == MODELS_PATH:
            cards = {c["id"]: c for c in answer.get("data") or [] if isinstance(c, dict) and "id" in c}
            for model_id in view:
                cards.setdefault(model_id, {"id": model_id, "object": "model", "created": 0, "owned_by": "kubeinfer"})
            for model_id, card in cards.items():
                card["endpoints"] = where(model_id)
            answer["data"] = list(cards.values())
        elif "id" in answer:
            answer["endpoints"] = where(answer["id"])
        return json.dumps(answer).encode()

    # -- WebSocket -------------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        """Accept, route by the first request frame, then relay frames both ways to that endpoint."""
        assert self.session is not None
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        client = web.WebSocketResponse(protocols=protocols, max_msg_size=self.settings.max_body_bytes,
                                       autoping=True)
        await client.prepare(request)
        outcome = _Outcome()
        model: str | None = None
        try:
            first = await client.receive()
            if first.type != WSMsgType.TEXT:
                outcome.code = 101
                return client
            key, priority, model = parse_request(first.data.encode(), request.headers, self.settings.prefix_chars)
            headers = forward_headers(request.headers, _REQUEST_OWN | _WS_HANDSHAKE)
            exclude: set[str] = set()
            attempts = 0
            while True:
                decision = await self._pick(key, priority, exclude, outcome)
                if decision is None:
                    answer = (self._unreachable(outcome, "Every endpoint tried for this request failed to answer")
                              if outcome.reason == "retries_exhausted" else self._no_endpoint(outcome))
                    return await self._refuse_ws(client, answer)
                ep = decision.endpoint
                outcome.endpoint, outcome.reason = ep.name, decision.reason
                try:
                    upstream = await self.session.ws_connect(
                        URL(ep.url + request.raw_path, encoded=True), headers=headers, protocols=protocols,
                        timeout=aiohttp.ClientWSTimeout(ws_close=5.0), max_msg_size=0, autoping=True,
                        autoclose=False)
                except (aiohttp.ClientConnectionError, aiohttp.WSServerHandshakeError, asyncio.TimeoutError,
                        OSError) as exc:
                    if not (isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status < 500):
                        self._failed(ep)
                    if attempts < self.settings.max_retries and is_retryable(_never_sent(exc), None, None, 0):
                        attempts += 1
                        exclude.add(ep.url)
                        self.metrics.retries.labels("connection_error").inc()
                        continue
                    return await self._refuse_ws(client, self._unreachable(
                        outcome, f"The endpoint {ep.name} refused the WebSocket: {type(exc).__name__}"))
                break
            self.table.record_success(ep.url)
            outcome.code = 101
            await self._relay_ws(client, upstream, ep, first.data)
            return client
        finally:
            self.metrics.count_request(model, outcome.endpoint, outcome.reason, outcome.code)

    async def _relay_ws(self, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                        ep: EndpointState, first: str) -> None:
        """Frames both ways until either side closes; each request frame counts in flight until its ``[DONE]``."""
        outstanding = 0

        def begin() -> None:
            nonlocal outstanding
            outstanding += 1
            self.table.begin(ep.url)

        async def client_to_upstream() -> None:
            async for msg in client:
                if msg.type == WSMsgType.TEXT:
                    begin()
                    await upstream.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await upstream.send_bytes(msg.data)
                else:
                    break

        async def upstream_to_client() -> None:
            nonlocal outstanding
            async for msg in upstream:
                if msg.type == WSMsgType.TEXT:
                    await client.send_str(msg.data)
                    if msg.data == "[DONE]" and outstanding:
                        outstanding -= 1
                        self.table.end(ep.url, None)
                elif msg.type == WSMsgType.BINARY:
                    await client.send_bytes(msg.data)
                else:
                    break

        begin()
        try:
            await upstream.send_str(first)
            tasks = [asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client())]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
            upstream_gone = tasks[1] in done
            if upstream_gone and outstanding and not client.closed:
                self._failed(ep)
                body = openai_error(f"The endpoint {ep.name} closed the connection mid-answer",
                                    "endpoint_disconnected", "server_error")
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await client.send_str(json.dumps(body))
                    await client.send_str("[DONE]")
            if not client.closed:
                await client.close(code=upstream.close_code or aiohttp.WSCloseCode.OK)
            if not upstream.closed:
                await upstream.close()
        finally:
            for _ in range(outstanding):
                self.table.end(ep.url, None)


#: Where the app keeps its :class:`Router`.
ROUTER = web.AppKey("router", Router)


def create_app(settings: RouterSettings, discovery: EndpointSource | None = None,
               clock: Callable[[], float] = time.monotonic) -> web.Application:
    """The router's aiohttp application (start it with ``web.run_app`` or an ``AppRunner``).

    The :class:`Router` is ``app[ROUTER]``; its session, poller and discovery start with the
    app and stop with it. Run the app with ``handler_cancellation=True`` so a client that leaves
    ends its request here and upstream.

    Args:
        settings: the router's settings.
        discovery: an endpoint source with ``start(on_change)``/``stop()`` (None: from the settings).
        clock: monotonic clock in seconds.
    """
    router = Router(settings, discovery, clock)
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[ROUTER] = router
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    app.router.add_get("/health", router.health)
    app.router.add_get("/ready", router.ready)
    app.router.add_get("/metrics", router.metrics_route)
    app.router.add_route("*", "/{tail:.*}", router.handle)
    return app
