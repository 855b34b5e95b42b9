"""The fleet router on the real node: an isvc with 3 replicas and 3 models (copies of the built-in
tiny model, one resident per pod) called through its Service, i.e. through the router pods.

What a user notices: each model settles on one pod, so the fleet loads each model about once
(counted from the serving pods' own ``kubeinfer_model_loads_total``), where a plain Service's
random spreading loads and evicts models on every replica (issue 18: 35 loads for 60 requests
over 3 models). The router names the pod and its decision in response headers, and its
``/v1/models`` says where each model is resident.

The operator runs as a pod from the chart (image from ``make images``, which carries
``kubeinfer-router``); the router pods watch the EndpointSlices of ``fleet-pods`` through the API
with their own least-privilege ServiceAccount.
"""

from __future__ import annotations

import collections
import random
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from openai import OpenAI

from tests.cluster_fixture import REPO
from tests.e2e.conftest import OPERATOR_IMAGE, SERVING_IMAGE, E2ECluster, wait_until

pytestmark = pytest.mark.timeout(1200)

NS = "router-e2e"
RELEASE = "kubeinfer-router"
RELEASE_NS = "kubeinfer-router-system"
NAME = "fleet"
MODELS = ["tiny-a", "tiny-b", "tiny-c"]
REQUESTS = 30
CONCURRENCY = 3
ARTIFACTS = REPO / "tests" / ".artifacts"
#: The README's 3-replica, 3-model example, applied as a user would (in namespace ``NS``).
EXAMPLE = REPO / "deploy" / "examples" / "04-fleet-three-models.yaml"
SERVING_SELECTOR = f"serving.kubeinfer.io/inferenceservice={NAME},app.kubernetes.io/component=serving"


@pytest.fixture(scope="module")
def fleet(e2e_cluster: E2ECluster) -> Iterator[E2ECluster]:
    """The chart installed for namespace ``router-e2e`` and the 3-replica, 3-model isvc Ready."""
    e2e = e2e_cluster
    e2e.kubectl("create", "namespace", NS, check=False)
    repo, tag = OPERATOR_IMAGE.rsplit(":", 1)
    e2e.helm("install", RELEASE, str(REPO / "deploy" / "helm" / "kubeinfer"), "--namespace", RELEASE_NS,
             "--create-namespace", "--wait", "--timeout", "300s", "--set", f"image.repository={repo}",
             "--set", f"image.tag={tag}", "--set", f"servingImage={SERVING_IMAGE}",
             "--set", f"watchNamespaces={{{NS}}}", timeout=400)
    isvc = yaml.safe_load(EXAMPLE.read_text())
    isvc["metadata"]["namespace"] = NS
    assert isvc["metadata"]["name"] == NAME and [m["name"] for m in isvc["spec"]["models"]] == MODELS
    try:
        e2e.kubectl("apply", "-f", "-", input=yaml.safe_dump(isvc))
        e2e.kubectl("wait", "--for=condition=Ready", f"isvc/{NAME}", "-n", NS, "--timeout=600s", timeout=620)
        yield e2e
    finally:
        e2e.kubectl("-n", NS, "delete", "isvc", "--all", "--wait=true", timeout=300, check=False)
        e2e.helm("uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", timeout=300, check=False)
        # Not waited for: the namespace's last objects go in the background (the cluster is the session's).
        e2e.kubectl("delete", "namespace", NS, "--wait=false", timeout=60, check=False)


def serving_pods(e2e: E2ECluster) -> list[dict]:
    return [p for p in e2e.get("pods", "-n", NS, "-l", SERVING_SELECTOR)["items"]
            if not p["metadata"].get("deletionTimestamp")]


def model_loads(e2e: E2ECluster) -> dict[str, dict[str, float]]:
    """pod name -> model -> ``kubeinfer_model_loads_total``, read from each serving pod's /metrics."""
    out: dict[str, dict[str, float]] = {}
    for pod in serving_pods(e2e):
        text = httpx.get(f"http://{pod['status']['podIP']}:8000/metrics", timeout=10).text
        out[pod["metadata"]["name"]] = {
            m: float(v) for m, v in re.findall(r'^kubeinfer_model_loads_total\{model_name="([^"]+)"\} (\S+)$', text,
                                               flags=re.M)}
    return out


def test_three_models_on_three_replicas_load_about_once_each(fleet: E2ECluster):
    e2e = fleet
    pods = serving_pods(e2e)
    assert len(pods) == 3
    status = e2e.get("isvc", NAME, "-n", NS)["status"]
    assert status["routerSummary"] == "2/2"
    assert sum(sum(per.values()) for per in model_loads(e2e).values()) == 0  # nothing preloaded
    ip = e2e.get("service", NAME, "-n", NS)["spec"]["clusterIP"]
    client = OpenAI(base_url=f"http://{ip}/v1", api_key="unused", timeout=300, max_retries=0)
    rng = random.Random(18)
    plan = [(rng.choice(MODELS), f"request {i}: tell me about rivers") for i in range(REQUESTS)]

    def call(item: tuple[str, str]) -> tuple[str, str, str]:
        model, prompt = item
        raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        assert raw.parse().usage.completion_tokens == 8
        return model, raw.headers["x-kubeinfer-endpoint"], raw.headers["x-kubeinfer-route"]

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(call, plan))
    loads = model_loads(e2e)
    total = sum(sum(per.values()) for per in loads.values())
    endpoints = collections.defaultdict(collections.Counter)
    for model, endpoint, _ in answers:
        endpoints[model][endpoint] += 1
    routes = collections.Counter(route for _, _, route in answers)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "router-e2e.txt").write_text(
        f"{REQUESTS} completions over {len(MODELS)} models, {CONCURRENCY} at a time, 3 replicas, maxLoadedModels 1\n"
        f"model loads (pods' kubeinfer_model_loads_total): {total:.0f} {loads}\n"
        f"endpoints per model: { {m: dict(c) for m, c in endpoints.items()} }\nroute reasons: {dict(routes)}\n")
    assert {p["metadata"]["name"] for p in pods} >= {e for c in endpoints.values() for e in c}
    assert total <= 1.2 * len(MODELS), (total, loads, dict(endpoints), dict(routes))

    # The router's own /v1/models: the union of the pods' catalogues, each with where it is resident.
    def resident_once():
        cards = {c["id"]: c for c in httpx.get(f"http://{ip}/v1/models", timeout=10).json()["data"]}
        where = {m: [e["name"] for e in cards[m]["endpoints"] if e["tier"] == "device"] for m in MODELS}
        return all(len(v) == 1 for v in where.values()) and where

    where = wait_until("each model resident on exactly one pod in the router's /v1/models", resident_once,
                       timeout=30)
    assert len(set(sum(where.values(), []))) == 3  # one model per pod (maxLoadedModels 1)
