"""The router's proxy over real HTTP on loopback: the router's aiohttp app on a real port in front of
small aiohttp servers that answer like serving pods (``/kubeinfer/load``, OpenAI routes, SSE, the
WebSocket routes), driven by aiohttp clients and the official ``openai`` client.

A pod here is a real server on a real socket; what it does is scripted per test (answer 500, answer
a draining 503, cut a stream, hold a chunk until the test says so), which a real serving pod cannot
be made to do on cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import quote

import aiohttp
import httpx
import openai
import pytest
from aiohttp import web
from kubeinfer_router.config import RouterSettings
from kubeinfer_router.discovery import EndpointMap, StaticDiscovery
from kubeinfer_router.picker import REASONS
from kubeinfer_router.proxy import ROUTER, create_app
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import stop_process
from tests.metrics_stack_fixture import free_port

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]

CHUNKS = ["Once", " upon", " a", " time"]


class FakePod:
    """A server on loopback that answers like a serving pod, scripted by its attributes.

    Attributes:
        models: model id -> tier it reports on ``/kubeinfer/load`` (device ids also go in
            ``x-kubeinfer-resident``).
        mode: "ok", "500" (every API request 500), "draining" (503 ``server_shutting_down``),
            "cut" (a stream stops after two chunks with the connection aborted).
        gate: when set, a stream waits for it after its first chunk.
        head_gate: when set, a stream waits for it after its headers, before its first chunk.
        seen: (method, path, headers, body) of each API request.
    """

    def __init__(self) -> None:
        self.models: dict[str, str] = {}
        self.mode = "ok"
        self.gate: asyncio.Event | None = None
        self.head_gate: asyncio.Event | None = None
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.require_key: str | None = None
        self.cancelled = 0  # requests whose client left (handler cancelled)
        self.peers: set = set()  # (host, port) of the connections API requests came on
        self.url = ""
        self._runner: web.AppRunner | None = None

    def _resident(self) -> str:
        return ", ".join(quote(m, safe="") for m, t in self.models.items() if t == "device")

    async def start(self, port: int | None = None) -> FakePod:
        app = web.Application()
        app.router.add_get("/kubeinfer/load", self._load)
        app.router.add_get("/v1/models", self._list)
        app.router.add_get("/v1/models/{id}", self._card)
        app.router.add_get("/v1/ws/completions", self._ws)
        app.router.add_route("*", "/{tail:.*}", self._api)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        port = port or free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _load(self, _: web.Request) -> web.Response:
        return web.json_response({
            "queue_length": 0, "running": 0, "kv_cache_usage": 0.0, "draining": False, "warm_tier": True,
            "memory": {"budget_bytes": 1000, "used_bytes": 100, "evictable_bytes": 0},
            "models": [{"id": m, "kind": "generate", "state": "loaded" if t == "device" else "unloaded",
                        "tier": t, "parent": None, "queue_length": 0, "running": 0} for m, t in self.models.items()],
        })

    def _denied(self, request: web.Request) -> web.Response | None:
        if self.require_key and request.headers.get("Authorization") != f"Bearer {self.require_key}":
            return web.json_response({"error": {"message": "bad key", "type": "invalid_request_error",
                                                "param": None, "code": "invalid_api_key"}}, status=401)
        return None

    async def _list(self, request: web.Request) -> web.Response:
        return self._denied(request) or web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model", "created": 7, "owned_by": "pod"}
                                        for m in self.models]},
            headers={"x-kubeinfer-resident": self._resident()})

    async def _card(self, request: web.Request) -> web.Response:
        return self._denied(request) or web.json_response(
            {"id": request.match_info["id"], "object": "model", "created": 7, "owned_by": "pod"})

    async def _api(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._answer(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.method, request.path_qs, dict(request.headers), body))
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        if self.mode == "500":
            return web.json_response({"error": {"message": "boom", "type": "server_error", "param": None,
                                                "code": None}}, status=500)
        if self.mode == "draining":
            return web.json_response({"error": {"message": "shutting down", "type": "service_unavailable",
                                                "param": None, "code": "server_shutting_down"}},
                                     status=503, headers={"Retry-After": "1"})
        payload = json.loads(body) if body else {}
        headers = {"x-pod-header": "from-pod", "x-kubeinfer-resident": self._resident(),
                   "x-echo-headers": json.dumps({k.lower(): v for k, v in request.headers.items()})}
        if not payload.get("stream"):
            return web.json_response({
                "id": "cmpl-1", "object": "text_completion", "created": 1, "model": payload.get("model", ""),
                "choices": [{"index": 0, "text": "".join(CHUNKS), "finish_reason": "length", "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": len(CHUNKS), "total_tokens": 1 + len(CHUNKS)},
            }, headers=headers)
        out = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                          "Cache-Control": "no-cache"})
        await out.prepare(request)
        if self.head_gate is not None:
            await self.head_gate.wait()
        for i, text in enumerate(CHUNKS):
            chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": payload.get("model", ""),
                     "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}]}
            await out.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if i == 0 and self.gate is not None:
                await self.gate.wait()
            if i == 1 and self.mode == "cut":
                assert request.transport is not None
                request.transport.abort()
                return out
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            self.seen.append(("WS", request.path, dict(request.headers), msg.data.encode()))
            payload = json.loads(msg.data)
            for i, text in enumerate(CHUNKS):
                await ws.send_str(json.dumps({"model": payload["model"], "choices": [{"index": 0, "text": text}]}))
                if i == 1 and self.mode == "cut":
                    assert request.transport is not None
                    request.transport.abort()
                    return ws
            await ws.send_str("[DONE]")
        return ws


class ManualDiscovery:
    """An endpoint source the test drives (what the Kubernetes watch does in a cluster)."""

    def __init__(self, initial: list[str] | None) -> None:
        self.initial = initial
        self.on_change: Callable[[EndpointMap], None] | None = None

    async def start(self, on_change: Callable[[EndpointMap], None]) -> None:
        self.on_change = on_change
        if self.initial is not None:
            self.set(self.initial)

    def set(self, urls: list[str]) -> None:
        assert self.on_change is not None
        self.on_change({u: (u, True) for u in urls})

    async def stop(self) -> None:
        pass


@contextlib.asynccontextmanager
async def pods(n: int) -> AsyncIterator[list[FakePod]]:
    started = [await FakePod().start() for _ in range(n)]
    try:
        yield started
    finally:
        for pod in started:
            await pod.stop()


@contextlib.asynccontextmanager
async def router(discovery, **settings) -> AsyncIterator[tuple[str, web.Application]]:
    """The router's app on a real loopback port, as ``__main__`` runs it (handler cancellation on)."""
    values = {"kube_service": "pods", "isvc": "chat", "poll_interval_seconds": 0.05, **settings}
    app = create_app(RouterSettings(**values), discovery=discovery)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


async def metrics(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple], float]:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def metric(values: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all((k, lv) in ls for k, lv in labels.items()))


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def reported(app: web.Application, pod: FakePod, model: str) -> Callable[[], bool]:
    """True once the router took in ``pod``'s load report listing ``model``."""
    def check() -> bool:
        ep = app[ROUTER].table.get(pod.url)
        return ep is not None and model in ep.models
    return check


def completion(model: str = "m", stream: bool = False, prompt: str = "hello") -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 4, "stream": stream}


async def test_a_streams_headers_reach_the_client_before_its_body_begins():
    # the router sends an answer's headers with the body bytes that came with them (one write); when
    # none came, the headers still go at once, not when the first token does
    async with pods(1) as (pod,), router(StaticDiscovery([pod.url])) as (url, _), aiohttp.ClientSession() as http:
        pod.head_gate = asyncio.Event()
        request = http.post(f"{url}/v1/completions", json=completion(stream=True))
        r = await asyncio.wait_for(request, 5)  # the pod holds its first chunk until the gate opens
        async with r:
            assert r.status == 200 and r.headers["x-pod-header"] == "from-pod"
            assert r.headers["x-kubeinfer-endpoint"] == pod.url
            pod.head_gate.set()
            events = [e[len("data: "):] for e in (await r.content.read()).decode().split("\n\n") if e]
        assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == CHUNKS
        assert events[-1] == "[DONE]"


async def test_sse_chunks_reach_the_client_as_the_pod_sends_them():
    async with pods(1) as (pod,), router(StaticDiscovery([pod.url])) as (url, _), aiohttp.ClientSession() as http:
        pod.gate = asyncio.Event()
        async with http.post(f"{url}/v1/completions", json=completion(stream=True)) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)  # the pod holds chunk 2 until then
            assert json.loads(first[len(b"data: "):])["choices"][0]["text"] == CHUNKS[0]
            pod.gate.set()
            rest = (await r.content.read()).decode()
        events = [e[len("data: "):] for e in rest.split("\n\n") if e]
        assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == CHUNKS[1:]
        assert events[-1] == "[DONE]"


async def test_a_client_that_leaves_mid_stream_ends_the_upstream_request():
    async with pods(1) as (pod,), router(StaticDiscovery([pod.url])) as (url, app):
        pod.gate = asyncio.Event()  # never set: the pod holds the stream open after its first chunk
        async with aiohttp.ClientSession() as http:
            r = await http.post(f"{url}/v1/completions", json=completion(stream=True))
            await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert app[ROUTER].table.get(pod.url).inflight == 1
            r.close()  # the client goes away
        await wait_for(lambda: pod.cancelled == 1)
        await wait_for(lambda: app[ROUTER].table.get(pod.url).inflight == 0)


async def test_upstream_connections_are_kept_alive_and_reused():
    async with pods(1) as (pod,), router(StaticDiscovery([pod.url]), poll_interval_seconds=30) as (url, _), \
            aiohttp.ClientSession() as http:
        for i in range(10):
            async with http.post(f"{url}/v1/completions", json=completion(stream=i % 2 == 0)) as r:
                assert r.status == 200
                await r.read()
        assert len(pod.seen) == 10
        assert len(pod.peers) <= 2  # one connection (two if a load poll held the first one at that moment)


async def test_openai_client_stream_through_the_router_equals_direct():
    async with pods(1) as (pod,), router(StaticDiscovery([pod.url])) as (url, _):
        texts = []
        for base in (pod.url, url):
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
            stream = await client.completions.create(model="m", prompt="hi", max_tokens=4, stream=True)
            texts.append([c.choices[0].text async for c in stream])
            await client.close()
        assert texts[0] == texts[1] == CHUNKS


async def test_headers_pass_both_ways_minus_hop_by_hop_plus_the_route_headers():
    async with pods(1) as (pod,), router(StaticDiscovery([pod.url])) as (url, _), aiohttp.ClientSession() as http:
        sent = {"Authorization": "Bearer secret", "X-Request-Id": "req-42",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "Connection": "keep-alive, X-Private", "X-Private": "hop", "Proxy-Authorization": "Basic x",
                "TE": "trailers", "x-session-id": "s1", "Expect": "100-continue"}
        async with http.post(f"{url}/v1/completions?x=1%202", json=completion(), headers=sent) as r:
            assert r.status == 200
            echoed = json.loads(r.headers["x-echo-headers"])
            assert r.headers["x-pod-header"] == "from-pod"
            assert r.headers["x-kubeinfer-endpoint"] == pod.url
            assert r.headers["x-kubeinfer-route"] in REASONS
            assert (await r.json())["choices"][0]["text"] == "".join(CHUNKS)
        for name in ("authorization", "x-request-id", "traceparent", "x-session-id"):
            assert echoed[name] == sent[{k.lower(): k for k in sent}[name]]
        for name in ("x-private", "proxy-authorization", "te", "expect"):
            assert name not in echoed
        assert echoed["x-forwarded-for"] == "127.0.0.1"
        assert pod.seen[-1][1] == "/v1/completions?x=1%202"
        assert json.loads(pod.seen[-1][3]) == completion()


async def test_body_over_the_limit_is_413_with_openais_body_and_never_reaches_a_pod():
    async with pods(1) as (pod,), router(StaticDiscovery([pod.url]), max_body_bytes=4096) as (url, _), \
            aiohttp.ClientSession() as http:
        big = completion(prompt="x" * 5000)
        async with http.post(f"{url}/v1/completions", json=big) as r:
            assert r.status == 413
            err = (await r.json())["error"]
        assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
        # the same body sent chunked (no Content-Length) is cut off while read
        async def gen():
            yield json.dumps(big).encode()
        async with http.post(f"{url}/v1/completions", data=gen()) as r:
            assert r.status == 413
        assert pod.seen == []


async def test_a_request_at_zero_is_held_until_an_endpoint_appears_and_served_with_no_client_retry():
    discovery = ManualDiscovery([])
    async with pods(1) as (pod,), router(discovery) as (url, app), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/ready") as r:
            assert r.status == 200  # synced, with no endpoint: holding at zero
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=30)
        call = asyncio.ensure_future(client.completions.create(model="m", prompt="wake up", max_tokens=4))
        await wait_for(lambda: app[ROUTER]._held == 1)
        assert metric(await metrics(http, url), "kubeinfer_router_held_requests") == 1
        assert not call.done()
        discovery.set([pod.url])
        answer = await asyncio.wait_for(call, 10)
        assert answer.choices[0].text == "".join(CHUNKS)
        assert metric(await metrics(http, url), "kubeinfer_router_held_requests") == 0
        await client.close()


async def test_hold_timeout_and_a_full_hold_answer_503_with_retry_after_and_openais_body():
    async with router(ManualDiscovery([]), hold_timeout_seconds=0.3) as (url, _), aiohttp.ClientSession() as http:
        started = asyncio.get_running_loop().time()
        async with http.post(f"{url}/v1/chat/completions",
                             json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 503
            assert int(r.headers["Retry-After"]) >= 1
            err = (await r.json())["error"]
        assert asyncio.get_running_loop().time() - started >= 0.3
        assert (err["code"], err["type"], err["param"]) == ("no_ready_endpoints", "service_unavailable", None)
        assert "chat" in err["message"]
        values = await metrics(http, url)
        assert metric(values, "kubeinfer_router_hold_timeouts_total") == 1
        assert metric(values, "kubeinfer_router_requests_total", code="503", reason="hold_timeout") == 1
    async with router(ManualDiscovery([]), max_held_requests=0) as (url, _), aiohttp.ClientSession() as http:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            await asyncio.wait_for(client.completions.create(model="m", prompt="p", max_tokens=2), 5)
        assert caught.value.status_code == 503 and caught.value.code == "no_ready_endpoints"
        await client.close()


async def test_ready_only_after_discovery_synced_and_health_always():
    discovery = ManualDiscovery(None)
    async with router(discovery) as (url, _), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/ready") as r:
            assert r.status == 503
        async with http.get(f"{url}/health") as r:
            assert r.status == 200
        discovery.set([])
        async with http.get(f"{url}/ready") as r:
            assert r.status == 200


async def test_connection_refused_is_retried_on_another_endpoint():
    async with pods(2) as (gone, live), aiohttp.ClientSession() as http:
        gone.models = {"m": "device"}  # the router believes the model is on `gone` ...
        async with router(StaticDiscovery([gone.url, live.url])) as (url, app):
            await wait_for(reported(app, gone, "m"))
            await gone.stop()  # ... which is killed before the request
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
            raw = await client.completions.with_raw_response.create(model="m", prompt="p", max_tokens=2)
            assert raw.headers["x-kubeinfer-endpoint"] == live.url
            assert raw.parse().choices[0].text == "".join(CHUNKS)
            values = await metrics(http, url)
            assert metric(values, "kubeinfer_router_retries_total", reason="connection_error") == 1
            await client.close()


async def test_a_draining_pods_503_is_retried_elsewhere_and_the_pod_is_no_longer_picked():
    async with pods(2) as (draining, live), aiohttp.ClientSession() as http:
        draining.models = {"m": "device"}
        draining.mode = "draining"
        async with router(StaticDiscovery([draining.url, live.url]), poll_interval_seconds=30) as (url, app):
            await wait_for(reported(app, draining, "m"))
            for _ in range(3):
                async with http.post(f"{url}/v1/completions", json=completion()) as r:
                    assert r.status == 200 and r.headers["x-kubeinfer-endpoint"] == live.url
            assert len(draining.seen) == 1  # marked draining after its first 503
            assert metric(await metrics(http, url), "kubeinfer_router_retries_total", reason="draining") == 1


async def test_no_retry_after_a_stream_began_the_client_sees_an_error_and_nothing_hangs():
    async with pods(2) as (cutter, other), aiohttp.ClientSession() as http:
        cutter.models = {"m": "device"}
        cutter.mode = "cut"
        async with router(StaticDiscovery([cutter.url, other.url])) as (url, app):
            await wait_for(reported(app, cutter, "m"))
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=10)
            got = []
            with pytest.raises(openai.APIConnectionError):  # the incomplete chunked body, as the client reports it
                stream = await client.completions.create(model="m", prompt="p", max_tokens=4, stream=True)
                async for chunk in stream:
                    got.append(chunk.choices[0].text)
            assert got == CHUNKS[:2]
            assert len(cutter.seen) == 1 and other.seen == []
            async with http.post(f"{url}/v1/completions", json=completion(stream=True)) as r:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(r.read(), 10)
            assert metric(await metrics(http, url), "kubeinfer_router_retries_total") == 0
            assert app[ROUTER].table.get(cutter.url).inflight == 0
            await client.close()


async def test_consecutive_5xx_eject_an_endpoint_which_is_readmitted_after_its_cool_down():
    async with pods(1) as (sick,), aiohttp.ClientSession() as http:
        sick.models = {"m": "device"}
        sick.mode = "500"
        async with router(StaticDiscovery([sick.url]), eject_after_failures=3, eject_base_seconds=0.5,
                          hold_timeout_seconds=0.1) as (url, app):
            for _ in range(3):
                async with http.post(f"{url}/v1/completions", json=completion()) as r:
                    assert r.status == 500  # passed through, not retried
            async with http.post(f"{url}/v1/completions", json=completion()) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "no_ready_endpoints"
            assert len(sick.seen) == 3
            values = await metrics(http, url)
            assert metric(values, "kubeinfer_router_ejections_total", endpoint=sick.url) == 1
            assert metric(values, "kubeinfer_router_endpoints", state="ejected") == 1
            async with http.get(f"{url}/ready") as r:
                assert (await r.json())["endpoints"] == {"ejected": 1}
        sick.mode = "ok"
        async with router(StaticDiscovery([sick.url]), eject_after_failures=1, eject_base_seconds=0.5,
                          hold_timeout_seconds=5) as (url, app):
            sick.mode = "500"
            async with http.post(f"{url}/v1/completions", json=completion()) as r:
                assert r.status == 500
            sick.mode = "ok"
            started = asyncio.get_running_loop().time()
            async with http.post(f"{url}/v1/completions", json=completion()) as r:  # held, then re-admitted
                assert r.status == 200
            assert asyncio.get_running_loop().time() - started >= 0.3  # 0.5 s +- 20% jitter


async def test_websocket_routes_pass_through_frame_by_frame():
    async with pods(2) as (holder, other), aiohttp.ClientSession() as http:
        holder.models = {"m": "device"}
        async with router(StaticDiscovery([holder.url, other.url])) as (url, app):
            await wait_for(reported(app, holder, "m"))
            direct, routed = [], []
            for base, frames in ((holder.url, direct), (url, routed)):
                async with http.ws_connect(f"{base}/v1/ws/completions",
                                           headers={"Authorization": "Bearer k"}) as ws:
                    for _ in range(2):  # two requests on one connection
                        await ws.send_str(json.dumps(completion()))
                        while (msg := await asyncio.wait_for(ws.receive(), 5)).data != "[DONE]":
                            frames.append(json.loads(msg.data)["choices"][0]["text"])
                        frames.append("[DONE]")
            assert routed == direct == (CHUNKS + ["[DONE]"]) * 2
            assert len(holder.seen) == 4 and other.seen == []  # routed by the first frame's model
            assert holder.seen[-1][2]["Authorization"] == "Bearer k"
            await wait_for(lambda: app[ROUTER].table.get(holder.url).inflight == 0)


async def test_a_websocket_stream_cut_by_its_pod_ends_with_an_error_frame_not_a_hang():
    async with pods(1) as (pod,), router(StaticDiscovery([pod.url])) as (url, app), aiohttp.ClientSession() as http:
        pod.mode = "cut"
        async with http.ws_connect(f"{url}/v1/ws/completions") as ws:
            await ws.send_str(json.dumps(completion()))
            frames = []
            while (msg := await asyncio.wait_for(ws.receive(), 5)).type == aiohttp.WSMsgType.TEXT:
                frames.append(msg.data)
        assert [json.loads(f)["choices"][0]["text"] for f in frames[:2]] == CHUNKS[:2]
        assert json.loads(frames[2])["error"]["code"] == "endpoint_disconnected" and frames[3:] == ["[DONE]"]
        await wait_for(lambda: app[ROUTER].table.get(pod.url).inflight == 0)


async def test_a_websocket_at_zero_is_held_then_told_no_endpoint_in_a_frame_and_closed_try_again_later():
    async with router(ManualDiscovery([]), hold_timeout_seconds=0.2) as (url, _), aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/v1/ws/completions") as ws:
            await ws.send_str(json.dumps(completion()))
            error = json.loads((await asyncio.wait_for(ws.receive(), 5)).data)["error"]
            assert error["code"] == "no_ready_endpoints"
            assert (await ws.receive()).data == "[DONE]"
            assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == aiohttp.WSCloseCode.TRY_AGAIN_LATER


async def test_models_is_the_union_of_the_endpoints_with_where_each_model_is_and_the_pods_key_check():
    async with pods(2) as (a, b), aiohttp.ClientSession() as http:
        a.models = {"llama": "device", "qwen": "disk"}
        b.models = {"llama": "host", "mistral": "device"}
        a.require_key = b.require_key = "good"
        async with router(StaticDiscovery([a.url, b.url])) as (url, app):
            await wait_for(lambda: reported(app, a, "qwen")() and reported(app, b, "mistral")())
            async with http.get(f"{url}/v1/models") as r:
                assert r.status == 401  # the pod's API-key check applies
            auth = {"Authorization": "Bearer good"}
            async with http.get(f"{url}/v1/models", headers=auth) as r:
                assert r.status == 200 and r.headers["x-kubeinfer-endpoint"] in (a.url, b.url)
                listing = await r.json()
            cards = {c["id"]: c for c in listing["data"]}
            assert set(cards) == {"llama", "qwen", "mistral"}
            assert {(e["url"], e["tier"]) for e in cards["llama"]["endpoints"]} == {(a.url, "device"), (b.url, "host")}
            assert cards["llama"]["endpoints"][0]["tier"] == "device"  # best tier first
            assert [(e["name"], e["tier"]) for e in cards["mistral"]["endpoints"]] == [(b.url, "device")]
            async with http.get(f"{url}/v1/models/qwen", headers=auth) as r:
                card = await r.json()
            assert card["id"] == "qwen" and card["endpoints"] == [{"name": a.url, "url": a.url, "tier": "disk"}]


async def test_metrics_name_model_endpoint_reason_and_code_and_fold_unknown_models():
    async with pods(1) as (pod,), aiohttp.ClientSession() as http:
        pod.models = {"m": "device"}
        async with router(StaticDiscovery([pod.url])) as (url, app):
            await wait_for(reported(app, pod, "m"))
            for model in ("m", "not-a-model"):
                async with http.post(f"{url}/v1/completions", json=completion(model=model)) as r:
                    assert r.status == 200
            async with http.post(f"{url}/v1/completions", data=b"not json") as r:
                assert r.headers["x-kubeinfer-route"] == "only"
            values = await metrics(http, url)
        assert metric(values, "kubeinfer_router_requests_total", model="m", endpoint=pod.url, reason="only",
                      code="200") == 1
        assert metric(values, "kubeinfer_router_requests_total", model="other") == 1
        assert metric(values, "kubeinfer_router_requests_total", model="none") == 1
        assert metric(values, "kubeinfer_router_proxy_overhead_seconds_count") == 3
        assert metric(values, "kubeinfer_router_time_to_first_byte_seconds_count", endpoint=pod.url) == 3
        assert metric(values, "kubeinfer_router_endpoints", state="ready") == 1
        for name in ("kubeinfer_router_held_requests", "kubeinfer_router_hold_timeouts_total"):
            assert (name, ()) in values


def _start(cmd: list[str], base_url: str, what: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("serving", "operator", "router"))}
    log = tempfile.TemporaryFile()  # not a pipe: a chatty process never blocks on a full one
    proc = subprocess.Popen([sys.executable, "-m", *cmd], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            log.seek(0)
            raise AssertionError(f"{what} did not start: {log.read().decode()[-3000:]}")
        time.sleep(0.2)


async def test_sigterm_lets_a_stream_in_flight_finish_then_the_router_exits_0():
    async with pods(1) as (pod,), aiohttp.ClientSession() as http:
        port = free_port()
        via = f"http://127.0.0.1:{port}"
        proc = await asyncio.to_thread(_start, ["kubeinfer_router", "--host", "127.0.0.1", "--port", str(port),
                                                "--endpoints", pod.url], via, "kubeinfer-router")
        try:
            pod.gate = asyncio.Event()
            async with http.post(f"{via}/v1/completions", json=completion(stream=True)) as r:
                await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                with pytest.raises(aiohttp.ClientConnectionError):  # no new connection is accepted
                    async with aiohttp.ClientSession() as fresh, fresh.get(f"{via}/health"):
                        pass
                pod.gate.set()
                rest = (await asyncio.wait_for(r.content.read(), 10)).decode()
            assert rest.endswith("data: [DONE]\n\n") and rest.count("data: ") == len(CHUNKS)
            assert await asyncio.to_thread(proc.wait, 20) == 0
        finally:
            stop_process(proc)


@pytest.mark.timeout(300)
async def test_a_real_serving_pod_streams_token_identical_through_the_router_over_sse_and_websocket():
    from kubeinfer_serving.models.builtin import BUILTIN_MODEL_NAME, ensure_builtin_model

    serve_port, router_port = free_port(), free_port()
    pod, via = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{router_port}"
    serve = _start(["kubeinfer_serving", "--host", "127.0.0.1", "--port", str(serve_port), "--model-dir",
                    str(ensure_builtin_model()), "--served-model-name", BUILTIN_MODEL_NAME, "--device", "cpu",
                    "--max-model-len", "512", "--log-level", "warning"], pod, "kubeinfer-serve")
    try:
        proxy = _start(["kubeinfer_router", "--host", "127.0.0.1", "--port", str(router_port), "--endpoints", pod,
                        "--log-level", "warning"], via, "kubeinfer-router")
        try:
            request = {"model": BUILTIN_MODEL_NAME, "max_tokens": 24, "temperature": 0,
                       "messages": [{"role": "user", "content": "Tell me about the river."}]}
            sse, ws_frames = [], []
            for base in (pod, via):
                client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=60)
                stream = await client.chat.completions.create(**request, stream=True)
                sse.append([c.choices[0].delta.content for c in [c async for c in stream] if c.choices])
                await client.close()
                async with aiohttp.ClientSession() as http, http.ws_connect(f"{base}/v1/ws/chat/completions") as ws:
                    await ws.send_str(json.dumps(request))
                    frames = []
                    while (msg := await asyncio.wait_for(ws.receive(), 60)).data != "[DONE]":
                        frames.append([c["delta"].get("content") for c in json.loads(msg.data)["choices"]])
                    ws_frames.append(frames)
            assert len([t for t in sse[0] if t]) > 1 and sse[0] == sse[1]
            assert ws_frames[0] == ws_frames[1] and len(ws_frames[0]) > 1
            async with aiohttp.ClientSession() as http, http.post(f"{via}/v1/chat/completions", json=request) as r:
                assert r.headers["x-kubeinfer-endpoint"] == pod and r.headers["x-kubeinfer-route"] == "only"
                assert (await r.json())["choices"][0]["message"]["content"] == "".join(t for t in sse[0] if t)
            # the pod's /kubeinfer/load report reaches the router's /v1/models within a poll interval
            deadline = time.monotonic() + 20
            while True:
                cards = {c["id"]: c for c in httpx.get(f"{via}/v1/models", timeout=10).json()["data"]}
                if cards[BUILTIN_MODEL_NAME]["endpoints"] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert cards[BUILTIN_MODEL_NAME]["endpoints"] == [{"name": pod, "url": pod, "tier": "device"}]
        finally:
            stop_process(proxy)
    finally:
        stop_process(serve)
