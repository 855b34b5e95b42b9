"""The activator that answers a scaled-to-zero isvc's Service: a real process over real HTTP, with
the official openai client (which retries 503s and honours Retry-After)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from kubeinfer_operator.activator import PendingRequests, request_key
from prometheus_client.parser import text_string_to_metric_families

from tests.metrics_stack_fixture import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def activator() -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "serving")])}
    proc = subprocess.Popen([sys.executable, "-m", "kubeinfer_operator.activator", "--isvc", "chat",
                             "--host", "127.0.0.1", "--port", str(port), "--retry-after", "1", "--window", "60"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the activator did not start: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_api_request_gets_503_with_retry_after_and_openais_error_body(activator):
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/embeddings")):
        r = httpx.request(method, f"{activator}{path}", json={"model": "m"}, timeout=5)
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1" and r.headers["x-should-retry"] == "true"
        err = r.json()["error"]
        assert (err["code"], err["type"], err["param"]) == ("scaled_to_zero", "service_unavailable", None)
        assert "chat" in err["message"]
    assert httpx.get(f"{activator}/ready", timeout=5).status_code == 200


def test_openai_client_retries_after_the_header_and_a_retried_request_is_pending_once(activator):
    before = _metrics(activator)
    client = openai.OpenAI(base_url=f"{activator}/v1", api_key="k", max_retries=2, timeout=10)
    start = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="m", prompt="a prompt only this test sends", max_tokens=3)
    elapsed = time.monotonic() - start
    assert caught.value.status_code == 503 and caught.value.code == "scaled_to_zero"
    after = _metrics(activator)
    assert after["kubeinfer_activator_requests_total"] - before["kubeinfer_activator_requests_total"] == 3
    assert elapsed >= 2.0  # two waits of Retry-After: 1 s
    assert after["kubeinfer_activator_pending_requests"] - before["kubeinfer_activator_pending_requests"] == 1
    # a different request counts as another pending one
    with pytest.raises(openai.InternalServerError):
        openai.OpenAI(base_url=f"{activator}/v1", api_key="k", max_retries=0).completions.create(
            model="m", prompt="another prompt", max_tokens=3)
    assert _metrics(activator)["kubeinfer_activator_pending_requests"] == after[
        "kubeinfer_activator_pending_requests"] + 1


def test_pending_requests_expire_after_the_window():
    now = [100.0]
    pending = PendingRequests(window=10, clock=lambda: now[0])
    a, b = request_key("10.0.0.1", "POST", "/v1/x", b"1"), request_key("10.0.0.2", "POST", "/v1/x", b"1")
    pending.record(a)
    pending.record(a)
    pending.record(b)
    assert pending.count() == 2
    now[0] += 8
    pending.record(a)  # a retry keeps it pending
    now[0] += 5
    assert pending.count() == 1
    now[0] += 6
    assert pending.count() == 0
    with pytest.raises(ValueError):
        PendingRequests(window=0)
