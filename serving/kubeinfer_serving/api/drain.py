"""The end of a graceful shutdown: requests still running at the drain deadline end cleanly.

On SIGTERM uvicorn stops accepting connections and waits ``--timeout-graceful-shutdown``
seconds for in-flight requests; past that it cancels them, which a client sees as a bare
``500 Internal Server Error`` (text/plain) or a stream cut without ``[DONE]``. :class:`Drain`
ends them first, at the deadline: each tracked :class:`~kubeinfer_serving.api.generation.GenerationRun`
is interrupted with a 503 ``server_shutting_down`` error, so a non-streaming request gets OpenAI's
503 body (with ``Retry-After``) and a stream gets an error event and ``data: [DONE]``; the
engine requests are aborted and their KV blocks freed.
"""

from __future__ import annotations

import logging
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
        self.signalled = False

    @property
    def draining(self) -> bool:
        """True from the shutdown signal on (``/kubeinfer/load`` tells routers to send no more)."""
        return self.signalled or self.expired

    def begin(self) -> None:
        """The shutdown signal arrived (call on the event loop); the deadline is armed separately."""
        self.signalled = True

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
