"""WebSocket streaming: the SSE chunks as frames, several requests per connection, disconnect frees KV."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from websockets.sync.client import connect

from tests.api.conftest import MODEL, wait_idle
from tests.api.test_tenants import tenant_server  # noqa: F401 - the fixture

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about rivers"}], "max_tokens": 20,
        "temperature": 0, "ignore_eos": True}


def ws_url(server, path: str) -> str:
    return server.base_url.replace("http://", "ws://") + path


def frames_until_done(ws) -> list[str]:
    out = []
    while True:
        frame = ws.recv(timeout=60)
        out.append(frame)
        if frame == "[DONE]":
            return out


def sse_payloads(server, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{server.base_url}{path}", json={**body, "stream": True}, timeout=60) as r:
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def _content(frames: list[str]) -> str:
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in map(json.loads, frames[:-1])
                   if c["choices"])


def test_chat_over_websocket_gives_the_sse_chunks_and_several_requests_share_a_connection(server) -> None:
    sse = sse_payloads(server, "/v1/chat/completions", CHAT)
    with connect(ws_url(server, "/v1/ws/chat/completions")) as ws:
        ws.send(json.dumps(CHAT))
        first = frames_until_done(ws)
        ws.send(json.dumps({**CHAT, "stream_options": {"include_usage": True}}))
        second = frames_until_done(ws)
        ws.send(json.dumps({"model": MODEL, "messages": []}))
        error = frames_until_done(ws)
    strip = [{k: v for k, v in json.loads(f).items() if k not in ("id", "created")} for f in first[:-1]]
    assert strip == [{k: v for k, v in json.loads(f).items() if k not in ("id", "created")} for f in sse[:-1]]
    assert _content(first) == _content(second) and _content(first)
    assert json.loads(second[-2])["usage"]["completion_tokens"] == 20
    assert json.loads(error[0])["error"]["param"] == "messages" and error[-1] == "[DONE]"


def test_completions_over_websocket(server) -> None:
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with connect(ws_url(server, "/v1/ws/completions")) as ws:
        ws.send(json.dumps(body))
        frames = frames_until_done(ws)
    text = "".join(json.loads(f)["choices"][0]["text"] for f in frames[:-1])
    plain = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert text == plain


def test_closing_the_socket_frees_the_kv_blocks(server) -> None:
    long = {**CHAT, "max_tokens": 900}
    with connect(ws_url(server, "/v1/ws/chat/completions")) as ws:
        ws.send(json.dumps(long))
        for _ in range(3):
            ws.recv(timeout=60)
    t0 = time.monotonic()
    wait_idle(server.base_url, timeout=10)
    assert time.monotonic() - t0 < 10


def test_bad_json_frame_is_an_error_not_a_crash(server) -> None:
    with connect(ws_url(server, "/v1/ws/chat/completions")) as ws:
        ws.send("{not json")
        frames = frames_until_done(ws)
        assert json.loads(frames[0])["error"]["code"] == "invalid_json"
        ws.send(json.dumps(CHAT))
        assert frames_until_done(ws)[-1] == "[DONE]"


@pytest.mark.parametrize("path", ["/v1/ws/chat/completions"])
def test_websocket_needs_a_key_when_keys_are_configured(tenant_server, path: str) -> None:  # noqa: F811
    from websockets.exceptions import InvalidStatus

    from tests.api.test_tenants import KEYS

    with pytest.raises(InvalidStatus):
        with connect(ws_url(tenant_server, path)):
            pass
    with connect(ws_url(tenant_server, path), additional_headers={"Authorization": f"Bearer {KEYS['calm']}"}) as ws:
        ws.send(json.dumps(CHAT))
        assert frames_until_done(ws)[-1] == "[DONE]"
