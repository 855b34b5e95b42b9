"""A full waiting queue answers 429 with Retry-After (``kubeinfer-serve`` subprocess, one slot, queue of one)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.api.conftest import MAX_MODEL_LEN, MODEL, metric_value

LONG = {"model": MODEL, "prompt": "The mill wheel turned", "max_tokens": MAX_MODEL_LEN - 16, "temperature": 0,
        "ignore_eos": True, "stream": True}


def _stream_first_chunk(base_url: str, got_first: threading.Event, release: threading.Event) -> None:
    """Open a long stream, signal its first chunk, hold it open until ``release``, then hang up."""
    with httpx.stream("POST", f"{base_url}/v1/completions", json=LONG, timeout=120) as r:
        lines = r.iter_lines()  # kept referenced: a dropped line iterator closes the response
        if any(line.startswith("data: ") for line in lines):
            got_first.set()
        release.wait(60)


def test_queue_full_is_429_with_retry_after(cli_server: str) -> None:
    running_first, waiting_first, release = threading.Event(), threading.Event(), threading.Event()
    running = threading.Thread(target=_stream_first_chunk, args=(cli_server, running_first, release))
    waiting = threading.Thread(target=_stream_first_chunk, args=(cli_server, waiting_first, release))
    running.start()
    try:
        assert running_first.wait(60), "the first stream never started"
        waiting.start()
        deadline = time.monotonic() + 30
        while metric_value(cli_server, "kubeinfer_queue_length", model_name=MODEL) < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.02)
        client = openai.OpenAI(base_url=f"{cli_server}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model=MODEL, prompt="one more", max_tokens=4)
        assert err.value.status_code == 429
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.body["type"] == "rate_limit_error"
        assert not waiting_first.is_set(), "the queued request ran while the batch slot was taken"
    finally:
        release.set()
        running.join(60)
        if waiting.is_alive() or waiting.ident is not None:
            waiting.join(60)
    # Once the slot frees up the server serves again.
    client = openai.OpenAI(base_url=f"{cli_server}/v1", api_key="unused", max_retries=0, timeout=60)
    assert client.completions.create(model=MODEL, prompt="again", max_tokens=2).usage.completion_tokens >= 1
