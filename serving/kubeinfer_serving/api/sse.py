"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` per chunk, then ``data: [DONE]``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    """One SSE ``data:`` event holding ``payload`` as compact JSON."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n"


class ClientStalled(Exception):
    """The client stopped reading: one event could not be sent within the stall timeout."""


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response that runs ``on_close`` however the stream ends.

    Starlette cancels the body iterator when the client disconnects; ``on_close`` (run shielded
    from that cancellation) is where the route aborts its engine requests and releases the model
    it acquired, also when the body was never iterated (the client left before the first byte).

    A client that stops reading is bounded: once the socket's buffers are full, sending blocks;
    when one event cannot be sent for ``stall_timeout`` seconds the stream ends there and the
    connection is closed (what it had not read is dropped).

    Args:
        content: the SSE events.
        on_close: run once when the response ends, however it ends.
        stall_timeout: seconds one event may wait to be sent (None: no limit).
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]],
                 stall_timeout: float | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close
        self._stall_timeout = stall_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the body; always run ``on_close`` afterwards."""

        async def send_or_stall(message: Message) -> None:
            try:
                with anyio.fail_after(self._stall_timeout):
                    await send(message)
            except TimeoutError:
                raise ClientStalled() from None

        try:
            await super().__call__(scope, receive, send_or_stall)
        except ClientStalled:  # Starlette's task group collapses a single error to itself
            log.info("closing a stream whose client read nothing for %g s", self._stall_timeout)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()
