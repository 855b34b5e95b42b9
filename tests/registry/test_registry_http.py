"""The registry behind the real HTTP server: 60 concurrent completions over three models, two slots."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

import httpx
import uvicorn
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.registry import Catalogue, ModelEntry, ModelRegistry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sixty_http_requests_over_three_models(model_dirs) -> None:
    models = [ModelEntry(name=n, source=f"file://{p}", kvCacheBytes=2 << 20) for n, p in model_dirs.items()]
    reg = ModelRegistry(Catalogue(models=models, maxLoadedModels=2, acquireTimeoutSeconds=120), device="cpu")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(reg), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"

        async def complete(client: httpx.AsyncClient, model: str) -> str:
            r = await client.post(f"{base}/v1/completions", json={
                "model": model, "prompt": "The harbour was", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        async def run() -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                expected = {n: await complete(client, n) for n in model_dirs}
                assert len(set(expected.values())) == 3
                rng = random.Random(11)
                names = [rng.choice(list(model_dirs)) for _ in range(60)]
                texts = await asyncio.gather(*(complete(client, n) for n in names))
                assert texts == [expected[n] for n in names]
                listing = (await client.get(f"{base}/v1/models")).json()["data"]
                assert sorted(m["state"] for m in listing) == ["loaded", "loaded", "unloaded"]
                metrics = (await client.get(f"{base}/metrics")).text
                assert 'kubeinfer_model_evictions_total{model_name="tiny-' in metrics

        asyncio.run(run())
        evictions = [e for e in reg.events if e.action == "evict"]
        loads = [e for e in reg.events if e.action.endswith("load")]
        assert len(loads) >= 4 and len(evictions) == len(loads) - 2
    finally:
        server.should_exit = True
        thread.join(timeout=60)
