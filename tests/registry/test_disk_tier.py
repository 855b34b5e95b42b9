"""DiskTier start-up: leftovers of a crashed pod never count, foreign files are left alone."""

from __future__ import annotations

import json

from kubeinfer_serving.registry.disk import MANIFEST, DiskTier


def test_startup_drops_partial_and_manifestless_snapshots_and_keeps_complete_ones(tmp_path):
    (tmp_path / ".partial-s3--b--x-1234").mkdir()
    (tmp_path / ".partial-s3--b--x-1234" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "hf--o--n--main").mkdir()  # renamed but no manifest: not ours to trust
    (tmp_path / "lost+found").mkdir()
    done = tmp_path / "s3--bucket--m"
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / MANIFEST).write_text(json.dumps({"source": "s3://bucket/m", "revision": "r1", "bytes": 2}))
    disk = DiskTier(tmp_path, 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lost+found", "s3--bucket--m"]
    assert [(s.source, s.revision, s.bytes) for s in disk.snapshots()] == [("s3://bucket/m", "r1", 2)]
    assert disk.used_bytes() == 2
