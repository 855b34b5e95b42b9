"""The end of a graceful shutdown: requests still running at the drain deadline end cleanly.

On SIGTERM uvicorn stops accepting connections and waits ``--timeout-graceful-shutdown``
seconds for in-flight requests; past that it cancels them, which a client sees as a bare
``500 Internal Server Error`` (text/plain) or a stream cut without ``[DONE]``. :class:`Drain`
ends them first, at the deadline: each tracked :class:`~kubeinfer_serving.api.generation.GenerationRun`
is interrupted with a 503 ``server_shutting_down`` error, so a non-streaming request gets OpenAI's
503 body (with ``Retry-After``) and a stream gets an error event and ``data: [DONE]``; the
engine requests are aborted and their KV blocks freed.

WebSocket streams drain the same way: uvicorn closes every WebSocket (1012) as soon as the
shutdown starts, so :class:`~kubeinfer_serving.server.DrainingServer` first waits for the
WebSocket requests in flight (:meth:`Drain.websockets_idle`), which finish or end at the
deadline like SSE streams; a socket takes no new request once :attr:`Drain.closing` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from kubeinfer_serving.api.errors import APIError

log = logging.getLogger(__name__)


def shutting_down_error() -> APIError:
    """The 503 a request still running at the drain deadline ends with."""
    return APIError(503, "The server is shutting down; retry the request (another replica will serve it)",
                    code="server_shutting_down", retry_after=1.0)


class Drain:
    """The runs in flight, and whether the drain deadline has passed (one per app, ``app.state.drain``)."""

    def __init__(self) -> None:
        self._runs: set[Any] = set()
        self.expired = False
        #: True from the shutdown signal on: WebSockets take no new request and close (1012) after the current one.
        self.closing = False
        self._ws_requests = 0
        self._ws_idle = asyncio.Event()
        self._ws_idle.set()

    def begin_shutdown(self) -> None:
        """The shutdown signal came (call on the event loop)."""
        self.closing = True

    @contextlib.contextmanager
    def websocket_request(self) -> Iterator[None]:
        """Count a WebSocket request in flight for :meth:`websockets_idle` (uvicorn would cut its socket)."""
        self._ws_requests += 1
        self._ws_idle.clear()
        try:
            yield
        finally:
            self._ws_requests -= 1
            if self._ws_requests == 0:
                self._ws_idle.set()

    async def websockets_idle(self) -> None:
        """Return once no WebSocket request is in flight (at the deadline :meth:`expire` ends them)."""
        await self._ws_idle.wait()

    @property
    def draining(self) -> bool:
        """True from the shutdown signal on (``/kubeinfer/load`` tells routers to send no more)."""
        return self.closing or self.expired

    def track(self, run: Any) -> None:
        """Watch ``run`` (anything with ``interrupt(exc)``) until :meth:`untrack`; interrupt it now if past the deadline."""
        if self.expired:
            run.interrupt(shutting_down_error())
            return
        self._runs.add(run)

    def untrack(self, run: Any) -> None:
        """Stop watching ``run`` (it finished or its client left)."""
        self._runs.discard(run)

    def expire(self) -> None:
        """The deadline passed: interrupt every run still tracked (call on the event loop)."""
        self.expired = True
        runs, self._runs = list(self._runs), set()
        if runs:
            log.warning("drain deadline reached: ending %d request(s) with 503 server_shutting_down", len(runs))
        for run in runs:
            run.interrupt(shutting_down_error())
