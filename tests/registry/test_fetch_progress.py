"""A fetch into the disk tier logs a start line, progress lines (bytes, rate) while it runs, and the end."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest
from kubeinfer_serving.registry.disk import DiskTier
from kubeinfer_serving.registry.fetch import Listing, RemoteFile
from kubeinfer_serving.sources import parse_source

CHUNK = 256 * 1024


class SlowStore:
    """A store that writes ``config.json`` and a 2 MiB weights file over about one second, as a slow link would."""

    source = parse_source("s3://bucket/slow-model")

    def listing(self) -> Listing:
        return Listing("r1", (RemoteFile("config.json", 2), RemoteFile("model.safetensors", 8 * CHUNK)))

    def download(self, listing: Listing, dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        with (dest / "model.safetensors").open("wb") as f:
            for _ in range(8):
                f.write(b"\0" * CHUNK)
                f.flush()
                time.sleep(0.15)


def test_a_slow_fetch_logs_its_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = DiskTier(tmp_path, 1 << 30, progress_interval_s=0.2)
    with caplog.at_level(logging.INFO, logger="kubeinfer_serving"):
        snap = disk.ensure("s3--bucket--slow-model", SlowStore(), model="slow")
    assert not snap.hit and (snap.path / "model.safetensors").stat().st_size == 8 * CHUNK
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"fetching s3://bucket/slow-model for model 'slow': {8 * CHUNK + 2} bytes" in lines
    progress = [m for m in lines if re.fullmatch(r"fetching s3://bucket/slow-model for model 'slow': "
                                                 r"[\d.]+ of 2\.0 MiB \(\d+%\), [\d.]+ MiB/s", m)]
    assert len(progress) >= 2
    done = [float(re.search(r": ([\d.]+) of", m).group(1)) for m in progress]
    assert done == sorted(done) and done[-1] > 0
    assert any(m.startswith("fetched s3://bucket/slow-model (r1, 2097154 bytes) in ") and m.endswith("MiB/s")
               for m in lines)
