"""WebSocket streaming: ``/v1/ws/chat/completions`` and ``/v1/ws/completions``.

The client sends one text frame per request: the JSON body of ``POST /v1/chat/completions``
(or ``/v1/completions``), same schema; ``stream`` is forced on. The server answers with the
same chunks as the SSE stream, one text frame per chunk (the JSON that follows ``data: ``), and
a ``[DONE]`` frame; an error is OpenAI's error body in one frame, then ``[DONE]``. Several
requests may follow one another on one connection (each after the previous ``[DONE]``).

What a socket may hold is bounded: a binary frame closes it with 1003, a frame larger than
``--max-request-body-bytes`` with 1009, and more than :data:`MAX_PENDING_FRAMES` requests (or
that many bytes) queued behind the running one with 1008. On shutdown the running request
finishes (or ends at the drain deadline, as an SSE stream does), then the socket closes with
1012; a request sent meanwhile gets the 503 ``server_shutting_down`` error.

Each request runs through the app exactly as an HTTP request does (the authentication with the
handshake's ``Authorization`` header, body limit, validation, tenants' admission, drain), as an
in-process ASGI sub-request, so there is one code path for both transports. When the socket
closes mid-stream the sub-request sees ``http.disconnect``: its engine requests are aborted and
their KV blocks freed, as for an HTTP client that leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import APIRouter, WebSocket
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect

from kubeinfer_serving.api.drain import Drain, shutting_down_error
from kubeinfer_serving.api.errors import error_body

router = APIRouter()
#: Handshake headers passed on to each sub-request.
_FORWARDED = (b"authorization", b"host", b"user-agent")
#: Requests a socket may queue behind the one that runs; one more closes the socket (1008).
MAX_PENDING_FRAMES = 8
#: Close codes (RFC 6455 section 7.4.1; 1012 from IANA's registry).
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SERVICE_RESTART = 1012


@router.websocket("/v1/ws/chat/completions")
async def ws_chat_completions(ws: WebSocket) -> None:
    """Chat completions over a WebSocket (see the module docstring)."""
    await _serve(ws, "/v1/chat/completions")


@router.websocket("/v1/ws/completions")
async def ws_completions(ws: WebSocket) -> None:
    """Completions over a WebSocket (see the module docstring)."""
    await _serve(ws, "/v1/completions")


async def _close(ws: WebSocket, gone: asyncio.Event, code: int, reason: str) -> None:
    """Close the socket with ``code`` (the running request, if any, sees the disconnect and is aborted)."""
    gone.set()
    with contextlib.suppress(Exception):  # already closed by the client or the server
        await ws.close(code, reason)


async def _serve(ws: WebSocket, path: str) -> None:
    await ws.accept()
    app_state = ws.scope["app"].state
    drain: Drain = app_state.drain
    max_bytes: int = app_state.settings.max_request_body_bytes
    inbox: asyncio.Queue[str | None] = asyncio.Queue()
    gone = asyncio.Event()
    pending = {"bytes": 0}

    async def read() -> None:
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None:
                    await _close(ws, gone, CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted: send each "
                                 "request as one JSON text frame")
                    return
                if len(text) > max_bytes:
                    await _close(ws, gone, CLOSE_TOO_BIG, f"a request frame is larger than {max_bytes} bytes")
                    return
                if inbox.qsize() >= MAX_PENDING_FRAMES or pending["bytes"] + len(text) > max_bytes:
                    await _close(ws, gone, CLOSE_POLICY_VIOLATION, "too many requests queued on this socket: "
                                 "send the next one after [DONE]")
                    return
                pending["bytes"] += len(text)
                inbox.put_nowait(text)
        except (WebSocketDisconnect, RuntimeError):
            return
        finally:
            gone.set()
            inbox.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while True:
            text = await inbox.get()
            if text is None:
                return
            pending["bytes"] -= len(text)
            if drain.closing:
                err = shutting_down_error()
                await _send(ws, gone, json.dumps(error_body(err.status, err.message, code=err.code)))
                await _send(ws, gone, "[DONE]")
            else:
                with drain.websocket_request():
                    await _one_request(ws, path, text, gone)
            if gone.is_set():
                return
            if drain.closing:
                await _close(ws, gone, CLOSE_SERVICE_RESTART, "the server is shutting down")
                return
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _send(ws: WebSocket, gone: asyncio.Event, text: str) -> None:
    if gone.is_set():
        return
    try:
        await ws.send_text(text)
    except (WebSocketDisconnect, RuntimeError):
        gone.set()


async def _one_request(ws: WebSocket, path: str, text: str, gone: asyncio.Event) -> None:
    """Run one request as an in-process HTTP sub-request and forward its SSE events as frames."""
    try:
        body = json.loads(text)
    except ValueError as exc:
        await _send(ws, gone, json.dumps(error_body(400, f"Invalid JSON: {exc}", code="invalid_json")))
        await _send(ws, gone, "[DONE]")
        return
    if isinstance(body, dict):
        body["stream"] = True
    raw = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    headers += [(k, v) for k, v in ws.scope.get("headers", ()) if k in _FORWARDED]
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": ws.scope.get("root_path", ""), "headers": headers, "client": ws.scope.get("client"),
        "server": ws.scope.get("server"), "state": {},
    }
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    status = 200
    buffer = b""
    done = False

    async def send(message: Message) -> None:
        nonlocal status, buffer, done
        if message["type"] == "http.response.start":
            status = message["status"]
            return
        if message["type"] != "http.response.body":
            return
        buffer += message.get("body", b"")
        if status != 200:
            return
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.decode("utf-8").splitlines():
                if line.startswith("data: "):
                    payload = line[len("data: "):]
                    done = done or payload == "[DONE]"
                    await _send(ws, gone, payload)

    await ws.scope["app"](scope, receive, send)
    if status != 200:
        await _send(ws, gone, buffer.decode("utf-8", "replace"))
    if not done:
        await _send(ws, gone, "[DONE]")
