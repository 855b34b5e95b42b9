"""Adversarial suite: the second probe's defects (issue 24, rows E1-E22) and their classes.

Each test sends what a hostile or careless client sends, against real uvicorn servers, and
checks what a client would see and that the server stays healthy. Beyond the probe's rows it
covers their classes: every free-form (JSON object) field with a lone surrogate, malformed
entries of other list fields, both WebSocket routes, HTTP/1.1 framing cases on raw sockets and
every request-controlled metric label.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.api.tenancy import KeyStore
from kubeinfer_serving.config import ServerSettings, parse_settings
from kubeinfer_serving.registry.catalogue import Catalogue, ModelEntry
from kubeinfer_serving.registry.manager import ModelRegistry
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.api.conftest import MAX_MODEL_LEN, MODEL, ServerThread, _free_port, metric_value, wait_ready
from tests.api.test_errors import assert_openai_error
from tests.api.test_hardening import _probe_health_while, assert_healthy, post

#: Models of the keyed server besides MODEL: a catalogue name with a slash, one with the result cache.
SLASHED = "org/tiny-llama"
CACHED = "tiny-cached"
KEYS = {"a": "sk-tenant-a-000001", "b": "sk-tenant-b-000001", "admin": "sk-admin-0000001"}
KEYS_FILE = f"""
tenants:
  - name: a
  - name: b
    priority: 2
    minPriority: -5
keys:
  - key: {KEYS["a"]}
    tenant: a
  - key: {KEYS["b"]}
    tenant: b
  - key: {KEYS["admin"]}
    tenant: ops
    admin: true
"""
TRUSTED_ORIGIN = "http://trusted.example"
#: Batch size of the keyed server's engines.
KEYED_SEQS = 4
#: The keyed server's --timeout-stalled-response.
STALL_SECONDS = 3.0


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[ServerThread]:
    """A server with API keys (fair admission on), the priority policy, a trusted web origin, a
    model whose name has a slash and a model with the result cache."""
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(KEYS_FILE)
    catalogue = Catalogue(models=[
        ModelEntry(name=MODEL, source=f"builtin://{MODEL}", preload=True, max_model_len=MAX_MODEL_LEN),
        ModelEntry(name=SLASHED, source=str(model_dir), max_model_len=MAX_MODEL_LEN),
        ModelEntry(name=CACHED, source=str(model_dir), max_model_len=MAX_MODEL_LEN, result_cache=True),
    ], max_num_seqs=KEYED_SEQS, max_num_batched_tokens=512, scheduling_policy="priority",
        memory_budget_bytes=4 * 1024**3)
    settings = ServerSettings(host="127.0.0.1", port=0, api_keys_file=path, allowed_origins=(TRUSTED_ORIGIN,),
                              timeout_stalled_response=STALL_SECONDS)
    srv = ServerThread(create_app(ModelRegistry(catalogue, device="cpu"), settings=settings,
                                  keys=KeyStore.load(path, env={})))
    srv.start()
    yield srv
    srv.stop()


def kpost(server: ServerThread, path: str, body: dict, tenant: str = "a", timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, headers=auth(tenant), timeout=timeout)


def raw_json(body: dict) -> bytes:
    """``body`` as JSON with lone surrogates written as ``\\udXXX`` escapes (valid JSON, not text)."""
    return json.dumps(body).encode()


def sse_payloads(resp: httpx.Response) -> list[str]:
    return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def stream(server: ServerThread, path: str, body: dict, headers: dict | None = None) -> list[str]:
    with httpx.stream("POST", f"{server.base_url}{path}", json={**body, "stream": True}, headers=headers,
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        return sse_payloads(r)


def ws_url(server: ServerThread, path: str) -> str:
    return server.base_url.replace("http://", "ws://") + path


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}


# --------------------------------------------------------------------------- E7 and its class
SURROGATE = "a\ud800b"


@pytest.mark.parametrize(("route", "field", "value"), [
    ("chat/completions", "structured_outputs", {"regex": SURROGATE}),
    ("chat/completions", "guided_json", {"type": "string", "const": SURROGATE}),
    ("chat/completions", "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "enum": [SURROGATE]}}}),
    ("chat/completions", "tools", [{"type": "function", "function": {"name": "f", "description": SURROGATE}}]),
    ("chat/completions", "tool_choice", {"type": "function", "function": {"name": SURROGATE}}),
    ("chat/completions", "chat_template_kwargs", {SURROGATE: 1}),
    ("completions", "structured_outputs", {"grammar": SURROGATE}),
    ("completions", "guided_json", {"properties": {SURROGATE: {"type": "string"}}}),
    ("completions", "logit_bias", {SURROGATE: 1}),
])
def test_e7_a_lone_surrogate_in_any_json_field_is_400_naming_it(server, route: str, field: str, value) -> None:
    base = CHAT if route == "chat/completions" else COMPLETION
    r = post(server, f"/v1/{route}", content=raw_json({**base, field: value}))
    err = assert_openai_error(r, 400)
    assert err["param"] == field, err


# --------------------------------------------------------------------------- E9 and its class
@pytest.mark.parametrize("calls", [[5], [{"function": "x"}], [{"function": {"arguments": 5}}],
                                   [{"function": {"name": "f", "arguments": 5}}],
                                   [{"type": "retrieval", "function": {"name": "f", "arguments": "{}"}}],
                                   [{"function": {"name": ["f"], "arguments": "{}"}}], {"function": {}}])
def test_e9_malformed_assistant_tool_calls_are_400(server, calls) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "user", "content": "and?"}]
    err = assert_openai_error(post(server, "/v1/chat/completions", {**CHAT, "messages": messages}), 400)
    assert err["param"] == "messages", err
    assert_healthy(server)


@pytest.mark.parametrize(("field", "value"), [
    ("messages", [5]), ("messages", [{"role": "user", "content": [5]}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
    ("tools", [5]), ("tools", [{"type": "function", "function": "f"}]), ("stop", [5]), ("bad_words", [None]),
    ("stop_token_ids", ["1"]), ("allowed_token_ids", [-1]), ("guided_choice", [1]),
])
def test_malformed_list_entries_are_400_naming_the_field(server, field: str, value) -> None:
    body = {**CHAT, field: value} if field != "messages" else {**CHAT, "messages": value}
    err = assert_openai_error(post(server, "/v1/chat/completions", body), 400)
    assert re.split(r"[.\[]", err["param"])[0] == field, err


# --------------------------------------------------------------------------- E15
def test_e15_gbnf_grammars_work(server) -> None:
    r = post(server, "/v1/completions", {**COMPLETION, "max_tokens": 8, "guided_grammar": 'root ::= "yes" | "no"'})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("yes", "no")


# --------------------------------------------------------------------------- E18
def test_e18_admin_routes_address_names_with_a_slash(keyed) -> None:
    quoted = SLASHED.replace("/", "%2F")
    for name in (SLASHED, quoted):
        r = httpx.post(f"{keyed.base_url}/admin/models/{name}/load", headers=auth("admin"), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["name"] == SLASHED and r.json()["state"] == "loaded"
        r = httpx.post(f"{keyed.base_url}/admin/models/{name}/unload", headers=auth("admin"), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "unloaded"
    r = httpx.post(f"{keyed.base_url}/admin/models/org/no-such/load", headers=auth("admin"), timeout=30)
    assert assert_openai_error(r, 404)["code"] == "model_not_found"


# --------------------------------------------------------------------------- E3 and the other label sources
def _label_values(text: str, label: str) -> set[str]:
    return {m for line in text.splitlines() if not line.startswith("#")
            for m in re.findall(rf'\b{label}="([^"]*)"', line)}


def test_e3_metric_labels_stay_bounded_whatever_the_client_sends(server) -> None:
    before = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        for i in range(40):
            r = c.request(f"M{i:04d}", "/v1/models")
            assert r.status_code == 405
        for i in range(20):  # unmatched paths, unknown models, made-up tenants and cache salts
            c.get(f"/no/such/path/{i}")
            c.post("/v1/completions", json={"model": f"no-such-model-{i}", "prompt": "x"})
            c.post(f"/admin/models/made-up-{i}/load")
            c.post("/v1/completions", json={**COMPLETION, "max_tokens": 1, "user": f"user-{i}",
                                            "cache_salt": f"salt-{i}"}, headers={"x-request-id": f"rid-{i}"})
    after = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    assert _label_values(after, "method") <= {"GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}
    assert metric_value(server.base_url, "kubeinfer_http_requests_total", route="/v1/models", method="other",
                        status="405") >= 40
    assert not any(re.search(r"M00\d\d|no-such|made-up|user-\d|salt-\d|rid-\d", line) for line in after.splitlines())
    grown = len(after.encode()) - len(before.encode())
    assert grown < 20_000, f"/metrics grew by {grown} bytes"


# --------------------------------------------------------------------------- E20
@pytest.mark.parametrize(("field", "grammar"), [
    ("guided_regex", "a{1000000}"),
    ("guided_grammar", "start: start"),
    ("guided_grammar", 'start: "a" start'),
    ("guided_grammar", "start: r0\n" + "".join(f"r{i}: r{i + 1} r{i + 1}\n" for i in range(16)) + 'r16: "a"\n'),
])
def test_e20_a_grammar_that_cannot_complete_is_a_400_not_a_stop(server, field: str, grammar: str) -> None:
    """Empty languages and grammars over llguidance's limits fail at compile time (a failure mid-generation
    is tests/engine/test_isolation.py's)."""
    r = post(server, "/v1/completions", {**COMPLETION, "max_tokens": 16, field: grammar})
    err = assert_openai_error(r, 400)
    assert err["param"] == field, err
    assert_healthy(server)


# --------------------------------------------------------------------------- E8
def test_e8_an_auto_tool_reply_shaped_like_a_bad_call_is_never_500(server) -> None:
    tool = {"type": "function", "function": {"name": "fn_0", "parameters": {"type": "object", "properties": {}}}}
    body = {**CHAT, "max_tokens": 32, "tools": [tool], "tool_choice": "auto", "guided_choice": ['{"name": ["fn_0"]}']}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == '{"name": ["fn_0"]}'
    payloads = stream(server, "/v1/chat/completions", body)
    assert payloads[-1] == "[DONE]"
    assert not any("error" in json.loads(p) for p in payloads[:-1]), payloads


# --------------------------------------------------------------------------- E11, E12: both WebSocket routes
WS_ROUTES = [("/v1/ws/completions", COMPLETION), ("/v1/ws/chat/completions", CHAT)]


@pytest.mark.parametrize(("route", "body"), WS_ROUTES)
def test_e11_a_binary_frame_closes_the_socket_with_1003(server, route: str, body: dict) -> None:
    t0 = time.monotonic()
    with connect(ws_url(server, route)) as ws:
        ws.send(json.dumps(body).encode())
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
    assert time.monotonic() - t0 < 2


def test_e11_binary_frames_leave_no_task_behind(server) -> None:
    def ws_tasks() -> int:  # uvicorn's tasks running the app, one per connection's request or socket
        return len(server.server.server_state.tasks)

    before = ws_tasks()
    for _ in range(20):
        with connect(ws_url(server, "/v1/ws/completions")) as ws:
            ws.send(b'{"model": "tiny-llama"}')
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
    deadline = time.monotonic() + 5
    while ws_tasks() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ws_tasks() <= before
    assert_healthy(server)


@pytest.mark.parametrize(("route", "body"), WS_ROUTES)
def test_e12_a_socket_cannot_queue_unbounded_requests(server, route: str, body: dict) -> None:
    long = {**body, "max_tokens": 600, "ignore_eos": True}
    filler = json.dumps({**body, "pad": "x" * 1_000_000})
    with connect(ws_url(server, route), max_size=None) as ws:
        ws.send(json.dumps(long))
        ws.recv(timeout=60)  # the long request runs
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(150):
                ws.send(filler)
            while True:
                ws.recv(timeout=60)
    assert closed.value.rcvd is not None and closed.value.rcvd.code in (1008, 1009)
    assert_healthy(server)


# --------------------------------------------------------------------------- E13
@pytest.mark.parametrize("route", [r for r, _ in WS_ROUTES])
def test_e13_a_foreign_origin_cannot_open_a_websocket(server, route: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(server, route), origin="http://evil.example")
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        connect(ws_url(server, route), additional_headers={"Sec-Fetch-Site": "cross-site"})
    same_site = server.base_url
    with connect(ws_url(server, route), origin=same_site) as ws:  # the server's own pages may
        ws.send(json.dumps(dict(WS_ROUTES)[route]))
        assert json.loads(ws.recv(timeout=60))["choices"]


def test_e13_allowed_origins_come_from_the_flag_or_the_environment() -> None:
    flag = parse_settings(["--allowed-origins", "https://a.example, https://b.example/"], env={})
    assert flag.allowed_origins == ("https://a.example", "https://b.example")
    assert parse_settings([], env={"KUBEINFER_ALLOWED_ORIGINS": "https://c.example"}).allowed_origins == (
        "https://c.example",)
    assert parse_settings([], env={}).allowed_origins == ()


def test_e13_allowed_origins_may_open_websockets(keyed) -> None:
    with connect(ws_url(keyed, "/v1/ws/completions"), origin=TRUSTED_ORIGIN, additional_headers=auth("a")) as ws:
        ws.send(json.dumps(COMPLETION))
        assert json.loads(ws.recv(timeout=60))["choices"]
    with pytest.raises(InvalidStatus):
        connect(ws_url(keyed, "/v1/ws/completions"), origin="http://evil.example", additional_headers=auth("a"))


# --------------------------------------------------------------------------- E19
def test_e19_a_tenant_cannot_go_below_its_priority_floor(keyed) -> None:
    low = {**COMPLETION, "max_tokens": 1}
    err = assert_openai_error(kpost(keyed, "/v1/completions", {**low, "priority": -2147483648}, tenant="b"), 400)
    assert err["param"] == "priority"
    assert kpost(keyed, "/v1/completions", {**low, "priority": -5}, tenant="b").status_code == 200
    err = assert_openai_error(kpost(keyed, "/v1/completions", {**low, "priority": -1}, tenant="a"), 400)
    assert err["param"] == "priority"
    assert kpost(keyed, "/v1/completions", {**low, "priority": 3}, tenant="a").status_code == 200


# --------------------------------------------------------------------------- E16, E17
def _replayed(keyed, path: str, body: dict) -> tuple[dict, list[dict]]:
    first = kpost(keyed, path, body)
    assert first.status_code == 200, first.text
    with httpx.stream("POST", f"{keyed.base_url}{path}", json={**body, "stream": True}, headers=auth("a"),
                      timeout=120) as r:
        assert r.headers.get("x-kubeinfer-result-cache") == "hit"
        payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    return first.json(), [json.loads(p) for p in payloads[:-1]]


def test_e16_a_replayed_stream_carries_the_logprobs(keyed) -> None:
    body = {"model": CACHED, "prompt": "Once", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    full, chunks = _replayed(keyed, "/v1/completions", body)
    tokens = [t for c in chunks for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    assert tokens == full["choices"][0]["logprobs"]["tokens"] and len(tokens) == 6
    chat = {"model": CACHED, "messages": [{"role": "user", "content": "Once"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    full, chunks = _replayed(keyed, "/v1/chat/completions", chat)
    entries = [e for c in chunks for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert entries == full["choices"][0]["logprobs"]["content"] and len(entries) == 6


def test_e17_a_replayed_tool_call_streams_the_call_and_done(keyed) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"metric": {"type": "boolean"}}, "required": ["metric"],
        "additionalProperties": False}}}
    body = {"model": CACHED, "messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 40,
            "temperature": 0, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    full, chunks = _replayed(keyed, "/v1/chat/completions", body)
    assert full["choices"][0]["finish_reason"] == "tool_calls", full
    call = full["choices"][0]["message"]["tool_calls"][0]
    deltas = [d for c in chunks for ch in c["choices"] for d in (ch["delta"].get("tool_calls") or [])]
    assert deltas[0]["id"] == call["id"] and deltas[0]["function"]["name"] == "get_weather"
    assert "".join(d["function"].get("arguments") or "" for d in deltas) == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# --------------------------------------------------------------------------- E2 and other HTTP/1.1 framing cases
def _raw(server: ServerThread, data: bytes, wait: float = 3.0) -> bytes:
    """Send ``data`` on one connection; return everything the server sends until it closes (or ``wait`` s)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                return out + b"<closed>"
            out += chunk
        return out


SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("headers", [
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
    b"Content-Length: 4\r\nTransfer-Encoding: gzip, chunked\r\n",
])
def test_e2_content_length_with_transfer_encoding_is_400_and_closes(server, headers: bytes) -> None:
    request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + headers + b"\r\n"
    out = _raw(server, request + b"0\r\n\r\n" + SMUGGLED)
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    assert out.count(b"HTTP/1.1 ") == 1, out  # nothing behind it is answered
    assert out.endswith(b"<closed>")


@pytest.mark.parametrize("head", [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n folded: x\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
])
def test_ambiguous_framing_is_refused_and_nothing_behind_it_is_answered(server, head: bytes) -> None:
    out = _raw(server, head + b"{}\r\n" + SMUGGLED)
    assert re.match(rb"HTTP/1\.1 (400|501)", out), out[:200]
    assert out.count(b"HTTP/1.1 ") == 1, out
    assert_healthy(server)


def test_pipelined_well_formed_requests_are_still_answered(server) -> None:
    out = _raw(server, SMUGGLED + SMUGGLED.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
    assert out.count(b"HTTP/1.1 200") == 2, out[:300]


# --------------------------------------------------------------------------- E4
def test_e4_allowed_token_ids_are_bounded_and_cheap(server) -> None:
    err = assert_openai_error(post(server, "/v1/completions", {**COMPLETION, "allowed_token_ids": [7] * 300_000}),
                              400)
    assert err["param"] == "allowed_token_ids"
    vocab = 512
    big = {**COMPLETION, "n": 8, "max_tokens": 8, "allowed_token_ids": list(range(vocab)) * 500}  # 256k, deduped
    other = {**COMPLETION, "max_tokens": 32, "ignore_eos": True}
    t0 = time.perf_counter()
    assert post(server, "/v1/completions", other).status_code == 200
    alone = time.perf_counter() - t0
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=post(server, "/v1/completions", big)))
    worker.start()
    t0 = time.perf_counter()
    assert post(server, "/v1/completions", other).status_code == 200
    beside = time.perf_counter() - t0
    worker.join(120)
    assert result["r"].status_code == 200, result["r"].text
    assert beside < 10 * alone + 1.0, f"{beside:.2f} s beside the big request vs {alone:.2f} s alone"


# --------------------------------------------------------------------------- E21
def test_e21_websocket_streams_drain_like_sse_streams(model_dir: Path) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "kubeinfer_serving", "--host", "127.0.0.1", "--port", str(port),
           "--model-dir", str(model_dir), "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
           "--device", "cpu", "--log-level", "warning", "--timeout-graceful-shutdown", "30"]
    root = Path(__file__).resolve().parents[2]
    pythonpath = os.pathsep.join(str(root / d) for d in ("serving", "operator", "router"))
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath))
    url = f"http://127.0.0.1:{port}"
    body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    try:
        wait_ready(url, proc=proc)
        with connect(f"ws://127.0.0.1:{port}/v1/ws/completions") as ws:
            ws.send(json.dumps(body))
            frames = [ws.recv(timeout=60)]
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(ws.recv(timeout=60))
        took = time.monotonic() - t0
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert frames[-1] == "[DONE]", frames[-3:]
    chunks = [json.loads(f) for f in frames[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["text"]) > 0 for c in chunks) > 300, "the stream was cut"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012  # then the socket closes
    assert took > 0.5 and rc == 0


# --------------------------------------------------------------------------- E22
def test_e22_each_choice_streams_as_soon_as_it_has_tokens(server) -> None:
    """n above the batch size (8): the first choices stream while the others wait for batch slots."""
    body = {**COMPLETION, "n": 16, "max_tokens": 120, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    first = None
    seen: set[int] = set()
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                first = first if first is not None else time.perf_counter() - t0
                seen |= {c["index"] for c in json.loads(line[6:])["choices"]}
    total = time.perf_counter() - t0
    assert seen == set(range(16))
    assert first < 0.25 * total, f"first byte after {first:.2f} s of {total:.2f} s"


# --------------------------------------------------------------------------- E1
def _median_latency(server: ServerThread, tenant: str, n: int = 7) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = kpost(server, "/v1/completions", {**COMPLETION, "max_tokens": 4, "temperature": 0}, tenant=tenant,
                  timeout=15)
        assert r.status_code == 200, r.text
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


def test_e1_an_unread_stream_holds_no_capacity_once_generated(keyed, capsys) -> None:
    alone = _median_latency(keyed, "b")
    # ~7 MB of events (the prompt's top-20 logprobs echoed per choice): more than the kernel buffers
    # (4 MB send buffer at most, tcp_wmem) and asyncio's can absorb, so the server's send blocks.
    body = json.dumps({**COMPLETION, "prompt": "the river runs to the sea " * 140, "n": 3 * KEYED_SEQS,
                       "max_tokens": 2, "echo": True, "logprobs": 20, "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['a']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    tasks_before = len(keyed.server.server_state.tasks)
    reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that never reads
    reader.connect(("127.0.0.1", keyed.port))
    try:
        reader.sendall(head + body)
        deadline = time.monotonic() + 60
        while metric_value(keyed.base_url, "kubeinfer_num_requests_running", model_name=MODEL) == 0:
            assert time.monotonic() < deadline, "tenant a's stream never started"
            time.sleep(0.05)
        while metric_value(keyed.base_url, "kubeinfer_num_requests_running", model_name=MODEL) > 0:
            assert time.monotonic() < deadline, "the engine never finished tenant a's tokens"
            time.sleep(0.05)
        beside = _median_latency(keyed, "b")
        deadline = time.monotonic() + STALL_SECONDS + 30
        while len(keyed.server.server_state.tasks) > tasks_before:  # the stalled stream is closed
            assert time.monotonic() < deadline, "a stream nobody reads stayed open"
            time.sleep(0.1)
    finally:
        reader.close()
    with capsys.disabled():
        print(f"\n[E1] tenant b median latency alone {alone * 1000:.1f} ms, beside tenant a's unread stream "
              f"{beside * 1000:.1f} ms ({beside / alone:.2f}x)")
    # Issue 24 asks for 2x; the margin absorbs this shared test machine's noise (on main b timed out).
    assert beside <= 2 * alone + 0.5, f"{beside:.3f} s beside an unread stream vs {alone:.3f} s alone"


# --------------------------------------------------------------------------- E10
def test_e10_user_text_that_repeats_the_template_never_moves_its_boundary(server, model_dir: Path) -> None:
    from kubeinfer_serving.models import loader

    tok = loader.load_tokenizer(model_dir)
    rendered = tok.apply_chat_template([{"role": "system", "content": "SYS"}, {"role": "user", "content": "USR"}],
                                       tokenize=False, add_generation_prompt=True)
    between = rendered[rendered.index("SYS") + 3:rendered.index("USR")]  # the template's text between turns
    assert "<|eot_id|>" in between
    user = between + between
    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": user}]
    r = post(server, "/tokenize", {"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    head, tail = rendered[:rendered.index("USR")], rendered[rendered.index("USR") + 3:]
    expected = (tok(head, add_special_tokens=False)["input_ids"]
                + tok(user.strip(), add_special_tokens=False, split_special_tokens=True)["input_ids"]  # | trim
                + tok(tail, add_special_tokens=False)["input_ids"])
    assert r.json()["tokens"] == expected
    # The same holds for the generation route: the prompt has the template's control tokens only.
    r = post(server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 1, "messages": messages})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(expected)


# --------------------------------------------------------------------------- E14
def test_e14_huge_grammars_are_refused_and_never_delay_a_small_one(server) -> None:
    def huge(i: int) -> None:
        body = {**COMPLETION, "guided_choice": [f"c{i}-{k}" for k in range(100_000)]}
        try:
            r = post(server, "/v1/completions", body, timeout=3)
            err = assert_openai_error(r, 400)
            assert err["param"] == "guided_choice"
        except httpx.TimeoutException:  # the client gives up (main compiled on regardless)
            pass

    clients = [threading.Thread(target=huge, args=(i,)) for i in range(8)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(10)
    t0 = time.perf_counter()
    r = post(server, "/v1/completions", {**COMPLETION, "guided_choice": ["yes", "no"], "seed": 14})
    took = time.perf_counter() - t0
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("yes", "no"), r.text
    assert took < 2.0, f"a two-choice request waited {took:.1f} s behind abandoned compilations"
    big = {**COMPLETION, "structured_outputs": {"regex": "a" * 100_001}}
    assert assert_openai_error(post(server, "/v1/completions", big), 400)["param"] == "structured_outputs.regex"


# --------------------------------------------------------------------------- E5, E6
@pytest.mark.parametrize(("path", "body"), [
    ("/tokenize", {"model": MODEL, "prompt": "the quick brown fox jumps " * 480_000}),  # 12 MB
    ("/tokenize", {"model": MODEL, "prompt": "the quick brown fox jumps " * 120_000, "return_token_strs": True}),
    ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "the quick brown fox " * 150_000}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": ""}] * 300_000}),  # 9 MB
    ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": ""}] * 300_000}),
])
def test_e5_e6_oversized_inputs_are_refused_quickly_and_health_stays_fast(server, path: str, body: dict) -> None:
    result: dict = {}
    content = json.dumps(body).encode()  # serialized first: the server shares this process's GIL

    def work() -> None:
        result["r"] = post(server, path, content=content)

    took, health = _probe_health_while(server, work)
    err = assert_openai_error(result["r"], 400)
    assert err["param"] in ("prompt", "messages"), err
    assert took < 3.0, f"refusing took {took:.1f} s"
    # Parsing a 9 MB body of small objects holds the GIL ~0.3 s (json is C code; the server shares this
    # process), which this shared 2-core machine can stretch past 1 s; main stalled /health 3.8 s and more.
    assert max(health) < 1.5, f"/health stalled {max(health):.2f} s"
    assert_healthy(server)


def test_e6_tools_and_messages_are_capped(server) -> None:
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    assert assert_openai_error(post(server, "/v1/chat/completions", {**CHAT, "tools": tools}), 400)["param"] == "tools"
    many = [{"role": "user", "content": "hi"}] * 2049
    assert assert_openai_error(post(server, "/tokenize", {"model": MODEL, "messages": many}), 400)["param"] == "messages"
