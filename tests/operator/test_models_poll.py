"""models_poll.py against a real serving process: per-pod /v1/models -> status.models.

The "pods" are pod objects as the API server returns them, pointing at a real uvicorn server on
loopback (the pod IP and the container port named http), so the poll, its timeouts and the
summary run against the real serving API.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from kubeinfer_operator.models_poll import ModelPoller, model_summary, summarise
from kubeinfer_operator.spec import parse_spec
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.registry.catalogue import Catalogue, ModelEntry
from kubeinfer_serving.registry.manager import ModelRegistry

from tests.api.conftest import MODEL, ServerThread, metric_value

SPEC = parse_spec({"models": [{"name": MODEL, "source": "file:///opt/models/tiny", "preload": True},
                              {"name": "broken", "source": "file:///does/not/exist"},
                              {"name": "lazy", "source": "file:///opt/models/lazy"}]}, "chat")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """A serving process whose catalogue has the built-in model (preloaded), a model whose path
    does not exist (its load is attempted once, and fails) and an on-demand model never loaded."""
    catalogue = Catalogue(models=[
        ModelEntry(name=MODEL, source=f"builtin://{MODEL}", preload=True, max_model_len=256),
        ModelEntry(name="broken", source="/does/not/exist"),
        ModelEntry(name="lazy", source="/does/not/exist/either"),
    ], max_num_seqs=2, max_num_batched_tokens=256, memory_budget_bytes=2 * 1024**3)
    srv = ServerThread(create_app(ModelRegistry(catalogue, device="cpu"), settings=ServerSettings()))
    srv.start()
    assert httpx.post(f"{srv.base_url}/admin/models/broken/load", timeout=60).status_code >= 400
    yield srv
    srv.stop()


def pod(name: str, port: int, ready: bool = True, ip: str = "127.0.0.1", rv: str = "1") -> dict:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": rv},
            "spec": {"containers": [{"name": "serving", "ports": [{"name": "http", "containerPort": port}]}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def models_requests(base_url: str) -> float:
    return metric_value(base_url, "kubeinfer_http_requests_total", route="/v1/models", method="GET", status="200")


def test_per_model_state_over_pods_with_the_failure_reason(server: ServerThread) -> None:
    answers = ModelPoller(timeout=5).poll([pod("chat-a-1", server.port), pod("chat-a-2", server.port),
                                           pod("chat-a-3", server.port, ready=False)])
    models = {m["name"]: m for m in summarise(SPEC, answers)}
    assert (models[MODEL]["state"], models[MODEL]["loadedPods"], models[MODEL]["readyPods"]) == ("Loaded", 2, 2)
    broken = models["broken"]
    assert (broken["state"], broken["failedPods"], broken["loadedPods"]) == ("Failed", 3, 0)
    # The pod's own reason (without the absolute path: the serving pod keeps paths out of messages).
    assert "chat-a-1: " in broken["message"] and "ModelLoadError" in broken["message"] and "does not exist" in broken["message"]
    assert (models["lazy"]["state"], models["lazy"]["loadedPods"]) == ("Pending", 0)
    assert model_summary(summarise(SPEC, answers)) == f"{MODEL} 2/2, broken 0/2, lazy 0/2"


def test_unchanged_pods_are_not_asked_again_changed_ones_are(server: ServerThread) -> None:
    poller = ModelPoller(timeout=5, max_age=60)
    before = models_requests(server.base_url)
    poller.poll([pod("p-1", server.port), pod("p-2", server.port)])
    poller.poll([pod("p-1", server.port), pod("p-2", server.port)])
    assert models_requests(server.base_url) == before + 2
    poller.poll([pod("p-1", server.port, rv="2"), pod("p-2", server.port)])  # p-1 changed
    assert models_requests(server.base_url) == before + 3


def test_a_hanging_pod_costs_one_timeout_and_pods_are_polled_concurrently(server: ServerThread) -> None:
    hanging = []
    for _ in range(4):  # accept connections (kernel backlog) but never answer
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        hanging.append(s)
    try:
        pods = [pod(f"hang-{i}", s.getsockname()[1]) for i, s in enumerate(hanging)] + [pod("ok", server.port)]
        start = time.monotonic()
        answers = ModelPoller(timeout=1.0, concurrency=8).poll(pods)
        elapsed = time.monotonic() - start
    finally:
        for s in hanging:
            s.close()
    assert elapsed < 2.5, elapsed  # four 1 s timeouts in parallel, not 4 s in a row
    assert sorted(a.pod for a in answers if a.error) == ["hang-0", "hang-1", "hang-2", "hang-3"]
    models = {m["name"]: m for m in summarise(SPEC, answers)}
    assert (models[MODEL]["loadedPods"], models[MODEL]["readyPods"]) == (1, 1)


def test_pods_outside_the_allowed_networks_and_not_running_are_skipped(server: ServerThread) -> None:
    pending = pod("pending", server.port)
    pending["status"]["phase"] = "Pending"
    answers = ModelPoller(timeout=1, allowed_networks=["127.0.0.0/8"]).poll(
        [pod("elsewhere", 80, ip="10.0.2.7"), pending, pod("here", server.port)])
    assert [a.pod for a in answers] == ["here"]
