"""uvicorn's server with a clean end to graceful shutdown (see :mod:`kubeinfer_serving.api.drain`).

* At SIGTERM/SIGINT the drain deadline (``timeout_graceful_shutdown`` seconds) is armed; when it
  passes, :meth:`Drain.expire` ends the requests still running with a clean 503 / SSE error
  event. uvicorn's own cancellation deadline is set a little later, so it only fires when a
  request ignores the drain.
* After a shutdown that drained cleanly the process exits with status 0; uvicorn re-raises the
  signal, which makes the exit status 143 (128 + SIGTERM) although nothing went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from types import FrameType

import uvicorn

from kubeinfer_serving.api.drain import Drain

#: Seconds uvicorn waits past the drain deadline before cancelling what is left.
CANCEL_MARGIN = 3.0


class DrainingServer(uvicorn.Server):
    """A ``uvicorn.Server`` that expires ``drain`` at the graceful-shutdown deadline and exits 0 after it.

    Args:
        config: uvicorn's config; its ``timeout_graceful_shutdown`` should be the drain time plus
            :data:`CANCEL_MARGIN` (:func:`drain_config_timeout`).
        drain: the app's drain state.
        drain_seconds: seconds in-flight requests get after the signal.
    """

    def __init__(self, config: uvicorn.Config, *, drain: Drain, drain_seconds: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_seconds = drain_seconds
        self._armed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:  # noqa: ANN001 - uvicorn's signature
        """Remember the loop (the signal handler schedules the deadline on it), then serve."""
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's handler, plus arming the drain deadline at the first signal."""
        super().handle_exit(sig, frame)
        if not self._armed and self._loop is not None:
            self._armed = True
            loop, seconds = self._loop, self.drain_seconds
            loop.call_soon_threadsafe(self.drain.begin)
            loop.call_soon_threadsafe(lambda: loop.call_later(seconds, self.drain.expire))

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's signal capture, without re-raising the signal after a clean (not forced) exit."""
        with super().capture_signals():
            yield
            if not self.force_exit:
                self._captured_signals.clear()


def drain_config_timeout(drain_seconds: float) -> float:
    """uvicorn's ``timeout_graceful_shutdown`` for a drain of ``drain_seconds``."""
    return drain_seconds + CANCEL_MARGIN
