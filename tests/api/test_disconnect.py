"""A client that goes away aborts its sequence and its KV blocks are freed (streaming or not)."""

from __future__ import annotations

import time

import httpx

from tests.api.conftest import MODEL, metric_value, wait_idle

LONG = {"model": MODEL, "prompt": "The mill wheel turned", "max_tokens": 900, "temperature": 0, "ignore_eos": True}


def aborted(base_url: str) -> float:
    return metric_value(base_url, "kubeinfer_request_success_total", model_name=MODEL, finish_reason="abort")


def test_closing_a_stream_aborts_the_request_and_frees_its_blocks(server) -> None:
    wait_idle(server.base_url)
    before = aborted(server.base_url)
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json={**LONG, "stream": True}, timeout=120) as r:
        lines = r.iter_lines()  # kept referenced: a dropped line iterator closes the response
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text"' in first
        time.sleep(0.3)  # several engine steps: the request keeps running while the client holds on
        assert metric_value(server.base_url, "kubeinfer_num_requests_running", model_name=MODEL) == 1
        assert metric_value(server.base_url, "kubeinfer_kv_cache_usage_ratio", model_name=MODEL) > 0
    # The connection is closed here, ~900 tokens early.
    wait_idle(server.base_url)
    assert aborted(server.base_url) == before + 1


def test_a_non_streaming_client_that_times_out_aborts_its_request(server) -> None:
    wait_idle(server.base_url)
    before = aborted(server.base_url)
    try:
        httpx.post(f"{server.base_url}/v1/completions", json=LONG, timeout=httpx.Timeout(120, read=0.5))
    except httpx.ReadTimeout:
        pass
    else:
        raise AssertionError("the long request finished before the client timed out")
    wait_idle(server.base_url)
    assert aborted(server.base_url) == before + 1
