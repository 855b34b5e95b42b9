"""The HTTP status of an ASGI response, seen by the middlewares that report it (metrics, request
log, traces): one wrapper of ``send`` instead of a copy of it in each."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]


class StatusRecorder:
    """An ASGI ``send`` that forwards every message and remembers the response's status code.

    ``status`` is 500 until ``http.response.start`` passes (an app that raises before answering is
    reported as the server error the client gets).
    """

    __slots__ = ("_send", "status")

    def __init__(self, send: Send) -> None:
        self._send = send
        #: the response's HTTP status code (500 until the response starts)
        self.status = 500

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        await self._send(message)
