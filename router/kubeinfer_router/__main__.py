"""``kubeinfer-router`` / ``python -m kubeinfer_router``: run the fleet router until SIGINT/SIGTERM.

On SIGTERM the router stops accepting connections and lets the requests in flight through it
finish for up to ``--timeout-graceful-shutdown`` seconds; held requests keep waiting within that
time too. What a restart loses is only what was in flight through this process then (see
``router/README.md``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiohttp import web

from kubeinfer_router.config import parse_settings
from kubeinfer_router.proxy import create_app

#: Pending connections the listening socket queues (bursts of hundreds of streams at once).
LISTEN_BACKLOG = 2048


def event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when the package is installed (its transports and scheduling are C: about a
    sixth less router CPU per relayed stream in ``bench.fleet_bench``'s overhead workload), else
    asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and environment, build the app and serve it."""
    settings = parse_settings(argv)
    logging.basicConfig(level=getattr(logging, settings.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = (f"endpoints {','.join(settings.endpoints)}" if settings.endpoints is not None
              else f"Service {settings.namespace()}/{settings.kube_service}")
    loop = event_loop()
    logging.getLogger("kubeinfer.router").info("kubeinfer-router on %s:%d routing to %s (event loop: %s)",
                                               settings.host, settings.port, source, type(loop).__module__)
    web.run_app(create_app(settings), host=settings.host, port=settings.port, access_log=None, print=None,
                shutdown_timeout=settings.timeout_graceful_shutdown, handler_cancellation=True,
                backlog=LISTEN_BACKLOG, loop=loop)


if __name__ == "__main__":
    main()
