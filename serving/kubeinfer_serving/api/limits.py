"""Limits on what one client can make the server hold: body size, body and header read time.

* :class:`BodyLimitMiddleware` (ASGI): a body larger than ``max_bytes`` gets 413 in OpenAI's
  error body, at once when ``Content-Length`` says so, else as soon as the bytes received pass
  the limit (chunked uploads); a body that does not arrive within ``body_timeout`` seconds gets
  408. Nothing is parsed or tokenized before the body is known to be within the limit. A request
  with both ``Content-Length`` and ``Transfer-Encoding`` gets 400 and the connection is closed
  (RFC 9112 section 6.3: its framing is ambiguous, the classic request-smuggling vector, so
  nothing sent behind it on the connection may be read as a request).
* :class:`OffLoopJSONRoute`: the API routes parse a large JSON body on a worker thread.
* :class:`GuardedH11Protocol` (uvicorn's h11 protocol): closes a connection whose request
  headers have not arrived completely within ``header_timeout`` seconds of their first byte
  (slowloris), which uvicorn alone never does. Idle keep-alive connections are closed by
  uvicorn's ``timeout_keep_alive``. It subclasses a private class of uvicorn (its
  ``data_received``, ``connection_lost``, ``conn``, ``loop``, ``transport`` and ``logger``), so
  uvicorn is pinned to the minor version this is tested with (pyproject.toml;
  tests/api/test_uvicorn_pin.py checks the installed version and that surface, and
  test_hardening.py's D13 test the behaviour through a real server).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

import h11
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from kubeinfer_serving.api.errors import APIError, error_response


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` (413) or slower than ``body_timeout`` seconds (408).

    Args:
        app: the wrapped ASGI app.
        max_bytes: the largest body accepted, bytes.
        body_timeout: seconds from the first ``receive()`` until the body's last chunk.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check ``Content-Length`` up front and count the bytes of the body as they arrive."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in scope.get("headers", ())}
        if b"content-length" in names and b"transfer-encoding" in names:
            response = error_response(APIError(
                400, "A request must not have both Content-Length and Transfer-Encoding (RFC 9112 section 6.3)",
                code="invalid_request"))
            response.headers["Connection"] = "close"  # the server closes the connection after it
            await response(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length > self.max_bytes:
                    await error_response(self._too_large())(scope, receive, send)
                    return
        loop = asyncio.get_running_loop()
        state = {"received": 0, "done": False, "deadline": None}

        async def limited_receive() -> Message:
            if state["done"]:
                return await receive()
            if state["deadline"] is None:
                state["deadline"] = loop.time() + self.body_timeout
            try:
                message = await asyncio.wait_for(receive(), max(0.0, state["deadline"] - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"The request body did not arrive within {self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    raise HTTPException(413, self._too_large().message)
                if not message.get("more_body", False):
                    state["done"] = True
            else:
                state["done"] = True
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than the limit of {self.max_bytes} bytes",
                        code="request_too_large")


#: Request bodies larger than this many bytes are parsed as JSON on a worker thread.
OFF_LOOP_JSON_BYTES = 64 * 1024


class _OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        """The body as JSON; a large body is parsed on a worker thread, off the event loop."""
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = await asyncio.to_thread(json.loads, body) if len(body) > OFF_LOOP_JSON_BYTES else json.loads(body)
        return self._json


class OffLoopJSONRoute(APIRoute):
    """A FastAPI route whose JSON body, when larger than :data:`OFF_LOOP_JSON_BYTES`, is parsed on a
    worker thread: a 16 MB body of small objects takes about a second to parse, which on the event
    loop would stall every other request (``/health`` included)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, given the request as an :class:`_OffLoopJSONRequest`."""
        handler = super().get_route_handler()

        async def off_loop_handler(request: Request) -> Response:
            return await handler(_OffLoopJSONRequest(request.scope, request.receive))

        return off_loop_handler


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request's headers.

    The timer starts with the first byte of a request and is cancelled once h11 has parsed its
    headers; when it fires first, the connection is closed (no response: the client never sent
    a request).
    """

    header_timeout: float = 30.0

    def data_received(self, data: bytes) -> None:
        """Feed h11 as uvicorn does, arming or clearing the header deadline around it."""
        waiting_headers = self.conn.their_state is h11.IDLE
        if waiting_headers and getattr(self, "_header_timer", None) is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._clear_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the timer with the connection."""
        self._clear_header_timer()
        super().connection_lost(exc)

    def _clear_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took over %g s", self.header_timeout)
            self.transport.close()


def guarded_h11_protocol(header_timeout: float) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass with ``header_timeout`` seconds (for ``uvicorn.Config(http=...)``)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": float(header_timeout)})
