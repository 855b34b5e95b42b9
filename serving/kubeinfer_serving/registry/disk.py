"""The local disk tier: remote models (``hf://``, ``s3://``) fetched once into a bounded cache directory.

The tier below host RAM (DESIGN.md section 5: GPU -> host RAM -> local disk -> remote store).
The directory is the pod's ``emptyDir`` (with ``sizeLimit``) or a PersistentVolumeClaim; its
budget is in bytes.

Rules:

* **Disk first.** :meth:`DiskTier.ensure` returns the snapshot directory of a source if it is on
  disk (a hit: no network at all), else fetches it (a miss).
* **Single flight.** Concurrent calls for one source fetch once; the others wait for it and then
  hit the disk (threads: the registry plans loads in worker threads).
* **Never partial.** A fetch writes under ``.partial-*`` in the cache directory, checks every
  file's size and published checksum (:meth:`~.fetch.RemoteFile.verify`), writes a manifest and
  only then renames the directory into place (atomic on one filesystem). Leftover ``.partial-*``
  directories of a crashed pod are removed at start-up; a snapshot without its manifest never counts.
* **Bounded.** Before a fetch writes a byte, least-recently-used snapshots are deleted until
  the snapshots plus every fetch in flight fit the budget. Pinned snapshots (models loaded in
  memory) are never deleted; if they alone leave no room the fetch fails with the reason.
* **Failure.** A failed fetch deletes its staging directory and raises :class:`~.fetch.FetchError`;
  other snapshots are untouched.

Metrics (:mod:`kubeinfer_serving.metrics`): ``kubeinfer_disk_cache_hits``, ``..._misses``,
``kubeinfer_model_fetch_seconds``, ``kubeinfer_model_fetch_bytes``, ``kubeinfer_disk_cache_usage_bytes``,
``kubeinfer_disk_cache_capacity_bytes``, ``kubeinfer_disk_cache_evictions``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kubeinfer_serving import metrics
from kubeinfer_serving.registry.fetch import Fetcher, FetchError
from kubeinfer_serving.registry.progress import PROGRESS_INTERVAL_S, FetchProgress

log = logging.getLogger(__name__)

MANIFEST = ".kubeinfer-snapshot.json"
_PARTIAL = ".partial-"
#: Names this tier writes (cache keys start with their scheme, see ModelSource.cache_key).
_OWN_PREFIXES = (_PARTIAL, "hf--", "s3--")


@dataclass
class Snapshot:
    """A complete model on disk.

    Attributes:
        key: the source's cache key (directory name).
        path: the snapshot directory (a Hugging Face model directory).
        source: the source URI it came from.
        revision: pinned revision (hub commit sha, or the S3 listing digest).
        bytes: sum of the file sizes.
        last_used: ``time.time()`` of the last hit or fetch (the LRU order; the manifest's mtime on disk).
        hit: whether the latest :meth:`DiskTier.ensure` found it on disk (False: it was fetched).
        fetch_seconds: wall time of the fetch that wrote it (0.0 for a hit).
    """

    key: str
    path: Path
    source: str
    revision: str
    bytes: int
    last_used: float
    hit: bool = True
    fetch_seconds: float = 0.0


class DiskTier:
    """Bounded, LRU, single-flight cache of fetched model snapshots under ``root``.

    Args:
        root: the cache directory (created if missing).
        budget_bytes: most bytes of snapshots plus fetches in flight.

    Attributes:
        hits, misses: :meth:`ensure` calls served from disk / that fetched.
        progress_interval_s: seconds between two progress lines of a fetch (:mod:`.progress`).
    """

    def __init__(self, root: str | Path, budget_bytes: int, *, progress_interval_s: float = PROGRESS_INTERVAL_S) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"disk cache budget must be positive, got {budget_bytes}")
        self.progress_interval_s = progress_interval_s
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}
        self._inflight: dict[str, threading.Event] = {}
        self._reserved: dict[str, int] = {}
        self._pins: Counter[str] = Counter()
        self._scan()
        metrics.DISK_CACHE_CAPACITY.set(budget_bytes)
        self._publish()

    # ------------------------------------------------------------------ public
    def used_bytes(self) -> int:
        """Bytes of complete snapshots on disk plus the reservations of fetches in flight."""
        with self._lock:
            return self._used()

    def snapshots(self) -> list[Snapshot]:
        """Complete snapshots, least recently used first."""
        with self._lock:
            return sorted(self._snapshots.values(), key=lambda s: s.last_used)

    def pin(self, key: str) -> None:
        """Keep ``key`` on disk (its model is loaded in memory); pins nest."""
        with self._lock:
            self._pins[key] += 1

    def has(self, key: str) -> bool:
        """Whether the complete snapshot ``key`` is on disk now (no fetch, not a hit)."""
        with self._lock:
            return key in self._snapshots

    def pin_if_present(self, key: str) -> bool:
        """Pin ``key`` if its snapshot is on disk (no fetch, not a hit); returns whether it pinned."""
        with self._lock:
            if key not in self._snapshots:
                return False
            self._pins[key] += 1
            return True

    def pinned(self, key: str) -> int:
        """How many pins ``key`` holds (0: evictable)."""
        with self._lock:
            return self._pins.get(key, 0)

    def unpin(self, key: str) -> None:
        """Undo one :meth:`pin`."""
        with self._lock:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    def ensure(self, key: str, fetcher: Fetcher, *, model: str, pin: bool = False) -> Snapshot:
        """The snapshot of ``fetcher.source`` on disk, fetching it first on a miss. Blocking.

        Args:
            key: the source's cache key (:meth:`~kubeinfer_serving.sources.ModelSource.cache_key`).
            fetcher: lists and downloads the source.
            model: the model name, for metrics and messages.
            pin: pin the snapshot before returning it (atomically, so no other fetch can evict it
                first); the caller must :meth:`unpin` it later.

        Raises:
            FetchError: the listing or download failed, a file is partial or corrupt, the model is
                larger than the whole budget, or pinned snapshots leave no room.
        """
        while True:
            with self._lock:
                snap = self._snapshots.get(key)
                if snap is not None:
                    snap.last_used = time.time()
                    snap.hit, snap.fetch_seconds = True, 0.0
                    self.hits += 1
                    metrics.DISK_CACHE_HITS.labels(model_name=model).inc()
                    _touch(snap.path / MANIFEST)
                    if pin:
                        self._pins[key] += 1
                    return snap
                waiting = self._inflight.get(key)
                if waiting is None:
                    done = self._inflight[key] = threading.Event()
                    self.misses += 1
                    metrics.DISK_CACHE_MISSES.labels(model_name=model).inc()
                    break
            waiting.wait()  # another thread fetches it; then look again (a hit, or fetch ourselves if it failed)
        try:
            return self._fetch(key, fetcher, model, pin)
        finally:
            with self._lock:
                del self._inflight[key]
                self._reserved.pop(key, None)
                self._publish()
            done.set()

    # ------------------------------------------------------------------ internals
    def _used(self) -> int:
        return sum(s.bytes for s in self._snapshots.values()) + sum(self._reserved.values())

    def _publish(self) -> None:
        metrics.DISK_CACHE_USAGE.set(self._used())

    def _scan(self) -> None:
        """Index complete snapshots already on disk (a PVC, or a restarted container); drop partial ones."""
        for child in self.root.iterdir():
            if not child.name.startswith(_OWN_PREFIXES):
                continue  # not ours (e.g. a PVC's lost+found)
            if child.name.startswith(_PARTIAL):
                shutil.rmtree(child, ignore_errors=True)
                continue
            manifest = child / MANIFEST
            try:
                data = json.loads(manifest.read_text())
                self._snapshots[child.name] = Snapshot(
                    child.name, child, data["source"], data["revision"], int(data["bytes"]), manifest.stat().st_mtime
                )
            except (OSError, ValueError, KeyError):
                if child.is_dir():
                    log.warning("disk cache: removing %s (no complete manifest)", child)
                    shutil.rmtree(child, ignore_errors=True)

    def _make_room(self, key: str, need: int, model: str) -> None:
        """Reserve ``need`` bytes for ``key``, deleting LRU unpinned snapshots (lock held)."""
        if need > self.budget_bytes:
            raise FetchError(f"model {model!r} needs {need} bytes on disk, more than the whole disk cache "
                             f"of {self.budget_bytes} bytes (raise modelCache.size)")
        for snap in sorted(self._snapshots.values(), key=lambda s: s.last_used):
            if self._used() + need <= self.budget_bytes:
                break
            if self._pins.get(snap.key):
                continue
            del self._snapshots[snap.key]
            shutil.rmtree(snap.path, ignore_errors=True)
            metrics.DISK_CACHE_EVICTIONS.labels(model_name=model).inc()
            log.info("disk cache: evicted %s (%d bytes) for %s", snap.source, snap.bytes, model)
        if self._used() + need > self.budget_bytes:
            pinned = ", ".join(s.source for s in self._snapshots.values() if self._pins.get(s.key)) or "none"
            raise FetchError(f"no room on disk for model {model!r} ({need} bytes): {self._used()} of "
                             f"{self.budget_bytes} bytes are held by loaded models ({pinned}) and fetches in flight")
        self._reserved[key] = need
        self._publish()

    def _fetch(self, key: str, fetcher: Fetcher, model: str, pin: bool) -> Snapshot:
        t0 = time.perf_counter()
        listing = fetcher.listing()
        with self._lock:
            self._make_room(key, listing.total_bytes, model)
        staging = self.root / f"{_PARTIAL}{key}-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir()
            with FetchProgress(f"{fetcher.source.uri} for model {model!r}", staging, listing.total_bytes,
                               self.progress_interval_s):
                fetcher.download(listing, staging)
            for f in listing.files:
                f.verify(staging / f.path)
            shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
            (staging / MANIFEST).write_text(json.dumps({
                "source": fetcher.source.uri, "revision": listing.revision, "bytes": listing.total_bytes,
                "files": [f.path for f in listing.files],
            }))
            final = self.root / key
            if final.exists():  # a snapshot without manifest left by an old pod
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        seconds = time.perf_counter() - t0
        snap = Snapshot(key, final, fetcher.source.uri, listing.revision, listing.total_bytes, time.time(),
                        hit=False, fetch_seconds=seconds)
        with self._lock:
            self._snapshots[key] = snap
            if pin:
                self._pins[key] += 1
        metrics.MODEL_FETCH_SECONDS.labels(model_name=model).observe(seconds)
        metrics.MODEL_FETCH_BYTES.labels(model_name=model).inc(listing.total_bytes)
        log.info("fetched %s (%s, %d bytes) in %.3f s, %.1f MiB/s", fetcher.source.uri, listing.revision,
                 listing.total_bytes, seconds, listing.total_bytes / 1024**2 / max(seconds, 1e-9))
        return snap


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
