"""Polls every endpoint's ``GET /kubeinfer/load`` about once a second into the endpoint table.

The report (queue length, running requests, KV-cache usage, memory, draining, each catalogue
entry's tier) is what the picker's residency and cold-start steps read; the
``x-kubeinfer-resident`` header of each proxied answer updates residency in between. All
endpoints are polled at once each round, each with a timeout shorter than the interval, so one
slow pod never delays the others' reports. A failed poll changes nothing (the endpoint keeps its
last report; passive health judges only proxied requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import aiohttp

from kubeinfer_router.state import EndpointTable

log = logging.getLogger("kubeinfer.router.poller")

#: The serving pod's load report.
LOAD_PATH = "/kubeinfer/load"
#: Largest report read, bytes (a catalogue of thousands of models fits).
MAX_REPORT_BYTES = 4 * 1024 * 1024


class LoadPoller:
    """Poll the endpoints of ``table`` every ``interval`` seconds until :meth:`stop`.

    Args:
        table: the endpoint table the reports go into.
        session: the router's pooled client session.
        interval: seconds between the starts of two rounds (> 0).

    Attributes:
        rounds: rounds completed (tests and logs).
    """

    def __init__(self, table: EndpointTable, session: aiohttp.ClientSession, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive seconds, got {interval}")
        self.table = table
        self.session = session
        self.interval = interval
        self.rounds = 0
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        """Start polling on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="load-poller")

    def poke(self) -> None:
        """Poll now instead of at the next tick (new endpoints were discovered)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop polling and wait for the task to end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def poll_once(self) -> None:
        """One round: every endpoint's report, concurrently, each within ``0.9 * interval`` (at most 5 s)."""
        timeout = aiohttp.ClientTimeout(total=min(0.9 * self.interval, 5.0))
        await asyncio.gather(*(self._poll(ep.url, timeout) for ep in self.table.all()))
        self.rounds += 1

    async def _poll(self, url: str, timeout: aiohttp.ClientTimeout) -> None:
        try:
            async with self.session.get(url + LOAD_PATH, timeout=timeout) as resp:
                if resp.status != 200:
                    log.debug("%s%s answered %d", url, LOAD_PATH, resp.status)
                    return
                body = await resp.content.read(MAX_REPORT_BYTES)
            report = json.loads(body)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.debug("%s%s failed: %r", url, LOAD_PATH, exc)
            return
        if isinstance(report, dict) and self.table.get(url) is not None:
            try:
                self.table.apply_report(url, report)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("%s%s: unusable report (%r)", url, LOAD_PATH, exc)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            self._wake.clear()
            await self.poll_once()
            remaining = self.interval - (time.monotonic() - started)
            if remaining > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), remaining)
