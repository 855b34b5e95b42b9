"""The router in front of real ``kubeinfer-serve`` processes on loopback, driven by the official ``openai`` client.

One fleet for the module (:mod:`bench.fleet`), started in parallel: four pods with the same catalogue
of three copies of the tiny model and ``maxLoadedModels: 1``, and ``kubeinfer-router --endpoints``
over the first three. The killed-endpoint test kills the fourth behind a router of its own, so
the shared fleet stays whole.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from websockets.sync.client import connect

from bench.fleet import Fleet, model_names

MODELS = model_names(3)
#: Seconds the router gets to see a change made behind its back (its poll interval is 1 s).
SETTLE = 2.5
#: Every client call here ends within this many seconds or the test fails (nothing may hang).
CLIENT_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with Fleet(pods=4, models=3) as f:
        yield f


@pytest.fixture(scope="module")
def router(fleet: Fleet) -> str:
    return fleet.router(fleet.urls[:3])


def client(base_url: str) -> openai.OpenAI:
    """The official client, no retries (a router retry must not hide behind a client one)."""
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT)


def test_three_model_fleet_loads_about_once_per_model(fleet: Fleet, router: str) -> None:
    fleet.unload_all()
    time.sleep(SETTLE)
    loads0 = fleet.total("kubeinfer_model_loads_total")
    rng = random.Random(0)
    picks = [rng.choice(MODELS) for _ in range(30)]
    c = client(router)

    def one(model: str) -> str:
        return c.completions.create(model=model, prompt="hello fleet", max_tokens=4, temperature=0).model

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(one, picks)) == picks
    loads = fleet.total("kubeinfer_model_loads_total") - loads0
    assert len(MODELS) <= loads <= 1.2 * len(MODELS), f"{loads:g} model loads for {len(MODELS)} models"


def _sse_text(c: openai.OpenAI, **kwargs) -> str:
    stream = c.completions.create(stream=True, temperature=0, **kwargs)
    return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


def _ws_frames(base_url: str, path: str, body: dict) -> list[dict]:
    with connect(base_url.replace("http://", "ws://") + path, open_timeout=CLIENT_TIMEOUT) as ws:
        ws.send(json.dumps(body))
        frames = []
        while (frame := ws.recv(timeout=CLIENT_TIMEOUT)) != "[DONE]":
            frames.append(json.loads(frame))
    return [{k: v for k, v in f.items() if k not in ("id", "created")} for f in frames]


def test_streams_and_websockets_through_the_router_are_token_identical_to_direct(fleet: Fleet, router: str) -> None:
    model = MODELS[0]
    direct, routed = client(fleet.urls[0]), client(router)
    for prompt in ("Once upon a time", "The river and the stone"):
        want = _sse_text(direct, model=model, prompt=prompt, max_tokens=24, extra_body={"ignore_eos": True})
        assert want and _sse_text(routed, model=model, prompt=prompt, max_tokens=24,
                                  extra_body={"ignore_eos": True}) == want
    chat = {"model": model, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 16,
            "temperature": 0, "ignore_eos": True}
    want_chat = _ws_frames(fleet.urls[0], "/v1/ws/chat/completions", chat)
    assert len(want_chat) > 2 and _ws_frames(router, "/v1/ws/chat/completions", chat) == want_chat
    body = {"model": model, "prompt": "Once", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    assert _ws_frames(router, "/v1/ws/completions", body) == _ws_frames(fleet.urls[0], "/v1/ws/completions", body)


def test_shared_prefix_groups_stay_on_one_endpoint_and_hit_its_prefix_cache(fleet: Fleet, router: str) -> None:
    for url in fleet.urls[:3]:  # the model on every pod of the router: any of them may serve a group
        httpx.post(f"{url}/admin/models/{MODELS[0]}/load", timeout=120).raise_for_status()
    time.sleep(SETTLE)
    rng = random.Random(1)
    groups = [f"Group {g} system prompt: " + " ".join(rng.choice(["river", "stone", "light", "paper"])
                                                     for _ in range(200)) for g in range(4)]
    hits0 = fleet.total("kubeinfer_prefix_cache_hits_total")
    c = client(router)
    served: dict[int, set[str]] = {}
    for i in range(12):  # one at a time: no endpoint is ever over the bound, so the ring alone decides
        raw = c.completions.with_raw_response.create(model=MODELS[0], prompt=f"{groups[i % 4]}\nQ{i}?", max_tokens=2)
        served.setdefault(i % 4, set()).add(raw.headers["x-kubeinfer-endpoint"])
    assert all(len(endpoints) == 1 for endpoints in served.values()), served
    assert fleet.total("kubeinfer_prefix_cache_hits_total") - hits0 >= 8 * 200  # 8 repeats reuse ~200+ tokens


def _long_stream(c: openai.OpenAI, prompt: str, started: threading.Event, outcome: dict) -> None:
    """Run one long stream; record its endpoint, whether it finished and the error that cut it."""
    try:
        with c.completions.with_streaming_response.create(
                model=MODELS[0], prompt=prompt, max_tokens=1000, stream=True, temperature=0,
                extra_body={"ignore_eos": True}) as resp:
            outcome["endpoint"] = resp.headers.get("x-kubeinfer-endpoint")
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    started.set()
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        outcome["error"] = chunk["error"]
                    elif chunk["choices"] and chunk["choices"][0].get("finish_reason"):
                        outcome["finished"] = True
    except Exception as exc:  # the client's transport error (a cut chunked body) or openai.APIError
        outcome["error"] = repr(exc)
    finally:
        started.set()


def test_killed_endpoint_retries_waiting_requests_and_reports_cut_streams(fleet: Fleet) -> None:
    victim = fleet.members[3]
    survivor = fleet.urls[0]
    for url in (survivor, victim.url):
        httpx.post(f"{url}/admin/models/{MODELS[0]}/load", timeout=120).raise_for_status()
    routed = fleet.router([survivor, victim.url])
    c = client(routed)

    outcomes: list[dict] = [{} for _ in range(6)]
    events = [threading.Event() for _ in outcomes]
    threads = [threading.Thread(target=_long_stream, args=(c, f"{i} long story about rivers", ev, out), daemon=True)
               for i, (ev, out) in enumerate(zip(events, outcomes, strict=True))]
    for t in threads:
        t.start()
    for ev in events:
        assert ev.wait(CLIENT_TIMEOUT), "a stream did not start"
    # The bound (ceil(6 / 2 * 1.25) = 4 in flight) puts streams on both endpoints.
    assert {o.get("endpoint") for o in outcomes} == {survivor, victim.url}, outcomes

    victim.kill()
    # Requests sent after the kill, before the router polled or ejected: each is retried on the
    # survivor (a connection error before any byte reached the client), so all succeed.
    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda i: c.completions.create(model=MODELS[0], prompt=f"after {i}", max_tokens=4,
                                                             temperature=0).choices[0].text, range(12)))
    assert all(texts)

    deadline = time.monotonic() + CLIENT_TIMEOUT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a stream hangs after its endpoint died"
    on_victim = [o for o in outcomes if o.get("endpoint") == victim.url]
    on_survivor = [o for o in outcomes if o.get("endpoint") != victim.url]
    assert on_victim and on_survivor, outcomes
    assert all("error" in o and not o.get("finished") for o in on_victim), on_victim
    assert all(o.get("finished") and "error" not in o for o in on_survivor), on_survivor
