"""``GET /kubeinfer/load`` and the ``x-kubeinfer-resident`` header: what the fleet router learns from a pod.

One real uvicorn server with API keys on, two copies of the tiny model, ``maxLoadedModels: 1`` and a
warm tier, so every load of one model evicts the other into host RAM.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import openai
import pytest
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.api.load import resident_header_value
from kubeinfer_serving.api.tenancy import ADMIN_API_KEYS_ENV, KeyStore
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.registry.catalogue import Catalogue, ModelEntry
from kubeinfer_serving.registry.manager import ModelRegistry

from tests.api.conftest import MAX_MODEL_LEN, MODEL, ServerThread

#: A second copy of the tiny model (a plain local path), so the two evict each other.
OTHER = "tiny-llama-other"
#: The admin key of the test server (admin keys may call /v1 and /admin).
KEY = "sk-load-report-admin"


@pytest.fixture(scope="module")
def pod(model_dir: Path) -> Iterator[ServerThread]:
    """Two on-demand models, one loaded at a time, evicted weights kept in host RAM, keys on."""
    catalogue = Catalogue(
        models=[
            ModelEntry(name=MODEL, source=f"builtin://{MODEL}", max_model_len=MAX_MODEL_LEN),
            ModelEntry(name=OTHER, source=str(model_dir), max_model_len=MAX_MODEL_LEN),
        ],
        max_num_seqs=4, max_num_batched_tokens=512, max_loaded_models=1,
        warm_cache_bytes=1024**3, memory_budget_bytes=4 * 1024**3,
    )
    srv = ServerThread(create_app(ModelRegistry(catalogue, device="cpu"), settings=ServerSettings(),
                                  keys=KeyStore.load(env={ADMIN_API_KEYS_ENV: KEY})))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(pod: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pod.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


def report(pod: ServerThread) -> dict:
    """The load report, fetched without an API key."""
    r = httpx.get(f"{pod.base_url}/kubeinfer/load", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def tiers(pod: ServerThread) -> dict[str, str]:
    return {m["id"]: m["tier"] for m in report(pod)["models"]}


def card_tiers(pod: ServerThread) -> dict[str, str]:
    r = httpx.get(f"{pod.base_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    return {c["id"]: c["tier"] for c in r.json()["data"]}


def resident(headers: httpx.Headers) -> list[str]:
    value = headers["x-kubeinfer-resident"]
    return value.split(", ") if value else []


def admin(pod: ServerThread, name: str, action: str) -> dict:
    r = httpx.post(f"{pod.base_url}/admin/models/{name}/{action}", headers={"Authorization": f"Bearer {KEY}"},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_tiers_follow_loads_evictions_and_unloads(pod: ServerThread, client: openai.OpenAI) -> None:
    for name in (MODEL, OTHER):  # a clean start whatever ran before
        if tiers(pod)[name] == "device":
            admin(pod, name, "unload")
    r = httpx.get(f"{pod.base_url}/kubeinfer/load", timeout=10)
    assert r.headers["x-kubeinfer-resident"] == ""
    assert all(m["tier"] in ("absent", "host") for m in r.json()["models"])  # local sources: never "disk"
    body = r.json()
    assert body["warm_tier"] is True and body["draining"] is False
    assert body["memory"]["budget_bytes"] == 4 * 1024**3

    raw = client.completions.with_raw_response.create(model=MODEL, prompt="hello", max_tokens=4)
    assert resident(raw.headers) == [MODEL]
    assert tiers(pod)[MODEL] == "device" and card_tiers(pod)[MODEL] == "device"
    body = report(pod)
    loaded = next(m for m in body["models"] if m["id"] == MODEL)
    assert loaded["state"] == "loaded" and loaded["kind"] == "generate" and loaded["parent"] is None
    assert body["memory"]["used_bytes"] > 0
    assert body["memory"]["evictable_bytes"] == body["memory"]["used_bytes"]  # loaded, idle, not preloaded
    assert body["memory"]["max_loaded_models"] == 1 and body["memory"]["loaded_models"] == 1

    raw = client.completions.with_raw_response.create(model=OTHER, prompt="hello", max_tokens=4)
    assert resident(raw.headers) == [OTHER]  # the load evicted MODEL (maxLoadedModels: 1)
    assert tiers(pod) == {MODEL: "host", OTHER: "device"}
    assert card_tiers(pod) == {MODEL: "host", OTHER: "device"}

    assert admin(pod, OTHER, "unload")["tier"] == "host"
    assert tiers(pod) == {MODEL: "host", OTHER: "host"}
    assert report(pod)["memory"]["used_bytes"] == 0


def test_resident_header_on_streams_lists_exactly_the_loaded_model(pod: ServerThread, client: openai.OpenAI) -> None:
    for name in (OTHER, MODEL):
        with client.completions.with_streaming_response.create(model=name, prompt="hi", max_tokens=8,
                                                               stream=True) as resp:
            assert resident(resp.headers) == [name]  # acquired (and the other evicted) before headers
            text = "".join(resp.iter_lines())
        assert "[DONE]" in text
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True) as resp:
        assert resident(resp.headers) == [MODEL]


def test_report_shows_running_requests_and_busy_memory(pod: ServerThread, client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="count", max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    try:
        next(iter(stream))  # the request runs now
        body = report(pod)
        model = next(m for m in body["models"] if m["id"] == MODEL)
        assert model["running"] == 1 and body["running"] == 1
        assert 0 < model["kv_cache_usage"] <= 1 and body["kv_cache_usage"] == model["kv_cache_usage"]
        assert body["memory"]["evictable_bytes"] == 0  # a request holds the only loaded model
    finally:
        stream.close()


def test_open_routes_need_no_key_and_errors_carry_the_header(pod: ServerThread) -> None:
    assert httpx.get(f"{pod.base_url}/kubeinfer/load", timeout=10).status_code == 200
    refused = httpx.get(f"{pod.base_url}/v1/models", timeout=10)
    assert refused.status_code == 401
    assert "x-kubeinfer-resident" in refused.headers


def test_header_percent_encodes_ids() -> None:
    assert resident_header_value(["org/model a", "b,c"]) == f"{quote('org/model a', safe='')}, b%2Cc".encode()
