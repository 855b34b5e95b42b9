"""Progress lines while a remote model is fetched: bytes on disk so far, of how many, and the rate.

The fetchers (:mod:`.fetch`) write into a staging directory; a watcher thread sums the sizes of
the files under it (partial downloads included) every ``interval_s`` seconds and logs one info
line, so a pod that takes minutes to start says why (``kubectl logs``) without a progress bar.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger("kubeinfer_serving.registry.fetch")

#: Seconds between two progress lines of one fetch.
PROGRESS_INTERVAL_S = 10.0
_MIB = 1024 * 1024


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (hidden ones too; files that vanish meanwhile count 0)."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


class FetchProgress:
    """A context manager logging a fetch's progress until it exits.

    Args:
        what: the source and model, as the log lines name them.
        staging: the directory being filled.
        total_bytes: the listing's total size, bytes.
        interval_s: seconds between lines.
    """

    def __init__(self, what: str, staging: Path, total_bytes: int, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.what, self.staging, self.total_bytes, self.interval_s = what, staging, total_bytes, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fetch-progress", daemon=True)
        self._t0 = 0.0

    def line(self) -> str:
        """The current progress line: ``N MiB of M MiB (P%), R MiB/s``."""
        done = tree_bytes(self.staging)
        seconds = max(time.monotonic() - self._t0, 1e-9)
        pct = 100.0 * done / self.total_bytes if self.total_bytes else 100.0
        return (f"fetching {self.what}: {done / _MIB:.1f} of {self.total_bytes / _MIB:.1f} MiB ({pct:.0f}%), "
                f"{done / _MIB / seconds:.1f} MiB/s")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            log.info("%s", self.line())

    def __enter__(self) -> FetchProgress:
        self._t0 = time.monotonic()
        log.info("fetching %s: %d bytes", self.what, self.total_bytes)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
