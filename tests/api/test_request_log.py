"""The request log: one line per request at info level (4xx included), as JSON with --log-format json."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.conftest import _free_port, stop_process, wait_ready
from tests.api.test_settings_table import _env

KEY = "sk-request-log-key"


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``python -m kubeinfer_serving --log-format json`` with one API key; yields (base URL, stderr file)."""
    log_path = tmp_path_factory.mktemp("log") / "stderr.log"
    port = _free_port()
    cmd = [sys.executable, "-m", "kubeinfer_serving", "--host", "127.0.0.1", "--port", str(port),
           "--model", "builtin://tiny-llama", "--max-model-len", "256", "--device", "cpu",
           "--api-key", f"{KEY}=team-a", "--log-format", "json", "--log-level", "info"]
    with log_path.open("w") as err:
        proc = subprocess.Popen(cmd, env=_env(), stderr=err)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc=proc)
            yield base, log_path
        finally:
            stop_process(proc)


def _request_lines(log_path: Path) -> list[dict]:
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return [x for x in lines if x["logger"] == "kubeinfer_serving.requests"]


def test_every_line_is_json_and_each_request_gets_one_info_line(json_server: tuple[str, Path]) -> None:
    base, log_path = json_server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
    reply = client.chat.completions.with_raw_response.create(
        model="tiny-llama", max_tokens=3, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Request-Id": "req-ok-1"})
    usage = reply.parse().usage
    stream = client.completions.create(model="tiny-llama", prompt="one two", max_tokens=2, stream=True,
                                       extra_headers={"X-Request-Id": "req-stream-1"})
    assert len(list(stream)) >= 1
    assert httpx.post(f"{base}/v1/completions", json={"model": "tiny-llama", "prompt": "x"},
                      headers={"X-Request-Id": "req-401"}, timeout=10).status_code == 401
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1,
                                  extra_headers={"X-Request-Id": "req-404"})
    httpx.get(f"{base}/health", headers={"X-Request-Id": "req-probe"}, timeout=10)

    by_id = {x["request_id"]: x for x in _request_lines(log_path)}  # every stderr line parsed as JSON
    ok = by_id["req-ok-1"]
    assert ok["level"] == "info" and ok["status"] == 200 and ok["tenant"] == "team-a"
    assert (ok["model"], ok["method"], ok["route"]) == ("tiny-llama", "POST", "/v1/chat/completions")
    assert (ok["prompt_tokens"], ok["output_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert 0 < ok["ttft_s"] <= ok["total_s"]
    streamed = by_id["req-stream-1"]
    assert streamed["status"] == 200 and streamed["output_tokens"] == 2 and streamed["ttft_s"] > 0
    assert by_id["req-401"]["status"] == 401 and by_id["req-401"]["route"] == "/v1/completions"
    missing = by_id["req-404"]
    assert (missing["status"], missing["model"], missing["level"]) == (404, "no-such-model", "info")
    assert "req-probe" not in by_id  # probes are debug-level
