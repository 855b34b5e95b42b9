"""The opt-in result cache: deterministic requests only, hits marked, streams replayed, reloads invalidate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.registry.catalogue import Catalogue, ModelEntry
from kubeinfer_serving.registry.manager import ModelRegistry

from tests.api.conftest import MAX_MODEL_LEN, MODEL, ServerThread, metric_value

CACHED = "tiny-cached"


@pytest.fixture(scope="module")
def cache_server(model_dir: Path) -> Iterator[ServerThread]:
    catalogue = Catalogue(models=[
        ModelEntry(name=MODEL, source=f"builtin://{MODEL}", preload=True, max_model_len=MAX_MODEL_LEN),
        ModelEntry(name=CACHED, source=str(model_dir), max_model_len=MAX_MODEL_LEN, result_cache=True),
    ], max_num_seqs=4)
    srv = ServerThread(create_app(ModelRegistry(catalogue, device="cpu"),
                                  settings=ServerSettings(host="127.0.0.1", port=0)))
    srv.start()
    yield srv
    srv.stop()


def complete(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)


GREEDY = {"model": CACHED, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}


def test_a_greedy_request_is_answered_from_the_cache(cache_server) -> None:
    first = complete(cache_server, GREEDY)
    assert first.status_code == 200 and first.headers["x-kubeinfer-result-cache"] == "miss"
    assert "result_cache_hit" not in first.json()["usage"]
    hits_before = metric_value(cache_server.base_url, "kubeinfer_result_cache_requests_total", model_name=CACHED,
                               outcome="hit")
    second = complete(cache_server, {**GREEDY, "user": "someone"})  # user does not change the output
    assert second.headers["x-kubeinfer-result-cache"] == "hit"
    a, b = first.json(), second.json()
    assert b["choices"] == a["choices"] and b["id"] != a["id"]
    assert b["usage"]["result_cache_hit"] is True and b["usage"]["completion_tokens"] == 24
    assert metric_value(cache_server.base_url, "kubeinfer_result_cache_requests_total", model_name=CACHED,
                        outcome="hit") == hits_before + 1


def test_a_stream_replays_the_cached_response(cache_server) -> None:
    body = {**GREEDY, "prompt": "The river ran", "max_tokens": 40}
    text = complete(cache_server, body).json()["choices"][0]["text"]
    with httpx.stream("POST", f"{cache_server.base_url}/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.headers["x-kubeinfer-result-cache"] == "hit"
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len(chunks) > 2  # replayed in pieces
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
    assert chunks[-1]["usage"]["result_cache_hit"] is True


def test_sampled_requests_and_other_models_are_not_cached(cache_server) -> None:
    sampled = {**GREEDY, "temperature": 0.8}
    for _ in range(2):
        assert "x-kubeinfer-result-cache" not in complete(cache_server, sampled).headers
    seeded = {**sampled, "seed": 7}
    assert complete(cache_server, seeded).headers["x-kubeinfer-result-cache"] == "miss"
    assert complete(cache_server, seeded).headers["x-kubeinfer-result-cache"] == "hit"
    other = {**GREEDY, "model": MODEL}
    for _ in range(2):
        assert "x-kubeinfer-result-cache" not in complete(cache_server, other).headers


def test_a_reload_invalidates_the_cache(cache_server) -> None:
    body = {**GREEDY, "prompt": "Reload me"}
    complete(cache_server, body)
    assert complete(cache_server, body).headers["x-kubeinfer-result-cache"] == "hit"
    base = cache_server.base_url
    assert httpx.post(f"{base}/admin/models/{CACHED}/unload", timeout=60).status_code == 200
    assert httpx.post(f"{base}/admin/models/{CACHED}/load", timeout=120).status_code == 200
    assert complete(cache_server, body).headers["x-kubeinfer-result-cache"] == "miss"


def test_lru_bound_in_bytes_and_ttl() -> None:
    import time

    from kubeinfer_serving.api.result_cache import ResultCache

    cache = ResultCache(max_bytes=300, ttl_seconds=0.2, models={"m"})
    body = {"object": "text_completion", "id": "x", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": "a" * 50, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1}}
    for k in ("k1", "k2", "k3"):
        cache.put(k, body)
    assert cache.bytes <= 300
    assert cache.get("k1", "m") is None and cache.get("k3", "m") is not None  # the oldest went first
    time.sleep(0.25)
    assert cache.get("k3", "m") is None  # expired


def test_a_read_keeps_an_entry_and_the_bytes_gauge_follows() -> None:
    from kubeinfer_serving import metrics
    from kubeinfer_serving.api.result_cache import ResultCache

    body = {"object": "text_completion", "id": "x", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": "b" * 50, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1}}
    size = len(json.dumps(body, separators=(",", ":")))
    cache = ResultCache(max_bytes=2 * size, ttl_seconds=60, models={"m"})
    cache.put("k1", body)
    cache.put("k2", body)
    assert cache.bytes == 2 * size
    assert metrics.REGISTRY.get_sample_value("kubeinfer_result_cache_bytes") == 2 * size
    assert cache.get("k1", "m") is not None  # k1 is now the most recently used
    cache.put("k3", body)
    assert cache.get("k2", "m") is None and cache.get("k1", "m") is not None and cache.get("k3", "m") is not None
    cache.put("big", {**body, "choices": [{"index": 0, "text": "c" * (3 * size)}]})  # over the budget: skipped
    assert cache.get("big", "m") is None and cache.bytes == 2 * size
    assert ResultCache(max_bytes=0, ttl_seconds=60, models={"m"}).key("r", "t", "m", "e", None) is None
