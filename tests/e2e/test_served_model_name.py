"""Issue 22 on the real node: a model served under the id clients use, `kubectl scale`, and the
operator's own metrics in Prometheus.

The operator runs as a pod from the chart (image from ``make images``); Prometheus runs on this
machine (tests/metrics_stack_fixture.py) and discovers pods through the API by their
``prometheus.io/*`` annotations, as deploy/prometheus/kubeinfer-scrape-config.yaml does.

1. An isvc whose model ``llama-1b`` (the Kubernetes key) has ``servedModelName:
   meta-llama/Llama-3.2-1B-Instruct`` (served by the built-in tiny-llama weights) answers that id
   through the official ``openai`` client via its Service and the router; ``/v1/models`` lists it,
   and ``llama-1b`` is not an id.
2. ``scaling.autoscaler: none``: ``kubectl scale inferenceservices.serving.kubeinfer.io/NAME
   --replicas 2`` gives two Ready serving pods (the Deployment follows spec.replicas).
3. Prometheus scrapes the operator pod: ``kubeinfer_operator_reconciles_total{result="ok"}`` > 0
   and the operator's target is up.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.cluster_fixture import REPO
from tests.e2e.conftest import OPERATOR_IMAGE, SERVING_IMAGE, E2ECluster, wait_until
from tests.metrics_stack_fixture import MetricsStack, save_logs, start_metrics_stack

pytestmark = [pytest.mark.metrics, pytest.mark.timeout(900)]

NS = "served-id-e2e"
RELEASE = "kubeinfer-ids"
RELEASE_NS = "kubeinfer-ids-system"
NAME = "llama-ids"
SERVED = "meta-llama/Llama-3.2-1B-Instruct"
ARTIFACTS = REPO / "tests" / ".artifacts"


@pytest.fixture(scope="module")
def stack(e2e_cluster: E2ECluster) -> Iterator[MetricsStack]:
    state_dir = Path(tempfile.mkdtemp(prefix="kubeinfer-e2e-ids-"))
    running = start_metrics_stack(e2e_cluster.cluster, state_dir, with_keda=False)
    try:
        yield running
    finally:
        save_logs(running, ARTIFACTS / "served-id-e2e-metrics-logs")
        running.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def operator(e2e_cluster: E2ECluster, stack: MetricsStack) -> Iterator[None]:
    e2e = e2e_cluster
    e2e.kubectl("create", "namespace", NS, check=False)
    repo, tag = OPERATOR_IMAGE.rsplit(":", 1)
    e2e.helm("install", RELEASE, str(REPO / "deploy" / "helm" / "kubeinfer"), "--namespace", RELEASE_NS,
             "--create-namespace", "--wait", "--timeout", "300s",
             "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
             "--set", f"servingImage={SERVING_IMAGE}", "--set", f"watchNamespaces={{{NS}}}", timeout=400)
    try:
        yield
    finally:
        e2e.kubectl("-n", NS, "delete", "inferenceservices.serving.kubeinfer.io", "--all", "--wait=true",
                    timeout=300, check=False)
        e2e.helm("uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", timeout=300, check=False)
        e2e.kubectl("delete", "namespace", NS, "--wait=true", timeout=300, check=False)


ISVC = {
    "apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService",
    "metadata": {"name": NAME, "namespace": NS},
    "spec": {
        "models": [{"name": "llama-1b", "servedModelName": SERVED, "source": "file:///opt/kubeinfer/models/tiny-llama",
                    "preload": True, "maxModelLen": 1024}],
        "runtime": {"maxNumSeqs": 4},
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}},
        "scaling": {"autoscaler": "none"},
    },
}


def _ready(e2e: E2ECluster) -> dict | bool:
    obj = e2e.get("inferenceservices.serving.kubeinfer.io", NAME, "-n", NS)
    conds = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
    return conds.get("Ready", {}).get("status") == "True" and obj


def test_the_served_id_answers_through_the_openai_client(e2e_cluster: E2ECluster, operator):
    import yaml

    e2e = e2e_cluster
    e2e.kubectl("apply", "-f", "-", input=yaml.safe_dump(ISVC))
    obj = wait_until("the isvc Ready", lambda: _ready(e2e), timeout=400, interval=2)
    (model,) = obj["status"]["models"]
    assert (model["name"], model["servedModelName"]) == ("llama-1b", SERVED)
    ip = e2e.get("service", NAME, "-n", NS)["spec"]["clusterIP"]
    client = OpenAI(base_url=f"http://{ip}/v1", api_key="unused", timeout=120, max_retries=3)
    assert SERVED in [m.id for m in client.models.list().data]

    reply = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=8, temperature=0)
    assert reply.model == SERVED and reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.NotFoundError):  # the Kubernetes key is not an id clients can use
        client.completions.create(model="llama-1b", prompt="x", max_tokens=2)


def test_kubectl_scale_sets_the_serving_pods(e2e_cluster: E2ECluster, operator):
    e2e = e2e_cluster
    e2e.kubectl("-n", NS, "scale", f"inferenceservices.serving.kubeinfer.io/{NAME}", "--replicas", "2")

    def two_ready():
        obj = e2e.get("inferenceservices.serving.kubeinfer.io", NAME, "-n", NS)
        return obj["status"].get("readyReplicas") == 2 and obj
    obj = wait_until("two ready serving pods", two_ready, timeout=400, interval=2)
    assert obj["status"]["replicaSummary"] == "2/2"
    pods = e2e.get("pods", "-n", NS, "-l", obj["status"]["selector"])["items"]
    assert len([p for p in pods if p["status"].get("phase") == "Running"]) == 2


def test_prometheus_scrapes_the_operator(e2e_cluster: E2ECluster, stack: MetricsStack, operator):
    def scraped():
        result = stack.query(f'kubeinfer_operator_reconciles_total{{result="ok",namespace="{RELEASE_NS}"}}')
        return result and float(result[0]["value"][1]) > 0 and result
    (sample, *_) = wait_until("the operator's reconciles in Prometheus", scraped, timeout=180, interval=2)
    assert sample["metric"]["pod"].startswith(f"{RELEASE}-kubeinfer-operator")
    up = stack.query(f'up{{namespace="{RELEASE_NS}",pod="{sample["metric"]["pod"]}"}}')
    assert up and up[0]["value"][1] == "1"
    assert stack.query(f'kubeinfer_operator_reconcile_duration_seconds_count{{namespace="{RELEASE_NS}"}}')
