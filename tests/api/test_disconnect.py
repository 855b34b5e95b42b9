"""A client that goes away aborts its sequence and its KV blocks are freed (streaming or not)."""

from __future__ import annotations

import time

import httpx

from tests.api.conftest import MODEL, metric_value

LONG = {"model": MODEL, "prompt": "The mill wheel turned", "max_tokens": 900, "temperature": 0, "ignore_eos": True}


def wait_idle(engine, timeout: float = 30.0) -> None:
    """Poll until no request runs or waits and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle after {timeout} s: {engine.stats()}")


def aborted(base_url: str) -> float:
    return metric_value(base_url, "kubeinfer_request_success_total", model=MODEL, finish_reason="abort")


def test_closing_a_stream_aborts_the_request_and_frees_its_blocks(server, engine) -> None:
    wait_idle(engine)
    before = aborted(server.base_url)
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json={**LONG, "stream": True}, timeout=120) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert '"text"' in first
        stats = engine.stats()
        assert stats.num_running == 1 and stats.num_free_blocks < stats.num_total_blocks
    # The connection is closed here, ~900 tokens early.
    wait_idle(engine)
    assert aborted(server.base_url) == before + 1


def test_a_non_streaming_client_that_times_out_aborts_its_request(server, engine) -> None:
    wait_idle(engine)
    before = aborted(server.base_url)
    try:
        httpx.post(f"{server.base_url}/v1/completions", json=LONG, timeout=httpx.Timeout(120, read=0.5))
    except httpx.ReadTimeout:
        pass
    else:
        raise AssertionError("the long request finished before the client timed out")
    wait_idle(engine)
    assert aborted(server.base_url) == before + 1
    after = engine.stats()
    assert after.kv_cache_usage == 0.0
