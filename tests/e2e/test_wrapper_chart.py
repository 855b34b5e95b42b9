"""The chart as a subchart on the real node, as a platform team ships it.

A platform chart depending on deploy/helm/kubeinfer (``file://``, tests/chart/wrapper.py) with
``global.imagePullSecrets`` and the subchart's own ``imagePullSecrets`` (docker-registry Secrets in
both namespaces) is installed with ``helm install --wait``:

1. the operator pod is Ready (its readiness endpoint on the ``metrics`` port) and pulls with both
   secrets; its ``/metrics`` has the series the chart's operator alerts use;
2. an InferenceService (example 01) becomes Ready, and its serving and router pods carry the same
   pull secrets (the operator's ``KUBEINFER_IMAGE_PULL_SECRETS`` from the chart) and answer;
3. the operator's /metrics counted its successful reconciles.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
import yaml
from openai import OpenAI

from tests.chart.wrapper import PULL_SECRETS, write_parent_chart
from tests.cluster_fixture import REPO
from tests.e2e.conftest import OPERATOR_IMAGE, SERVING_IMAGE, E2ECluster, wait_until

pytestmark = pytest.mark.timeout(900)

RELEASE = "platform"
RELEASE_NS = "platform-system"
NS = "wrapped"
ISVC = "tiny-chat"
OPERATOR_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/name=kubeinfer-operator"
EXAMPLE = REPO / "deploy" / "examples" / "01-tiny-chat.yaml"
#: The operator series the alerts of files/kubeinfer-alerts.yaml (group kubeinfer-operator) query.
ALERT_SERIES = "kubeinfer_operator_reconciles_total"


@pytest.fixture(scope="module")
def platform(e2e_cluster: E2ECluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ECluster]:
    """The platform chart installed (operator Ready, watching ``NS``) with its pull secrets in place."""
    e2e = e2e_cluster
    for namespace in (RELEASE_NS, NS):
        e2e.kubectl("create", "namespace", namespace, check=False)
        for secret in PULL_SECRETS:
            e2e.kubectl("-n", namespace, "create", "secret", "docker-registry", secret,
                        "--docker-server=registry.example.com", "--docker-username=ml",
                        f"--docker-password=not-used-{secret}")
    repository, tag = OPERATOR_IMAGE.rsplit(":", 1)
    parent = write_parent_chart(tmp_path_factory.mktemp("wrapper"), {
        "image": {"repository": repository, "tag": tag}, "servingImage": SERVING_IMAGE, "watchNamespaces": [NS]})
    e2e.helm("dependency", "update", "--skip-refresh", str(parent))
    try:
        e2e.helm("install", RELEASE, str(parent), "--namespace", RELEASE_NS, "--wait", "--timeout", "300s",
                 timeout=400)
        yield e2e
    finally:
        e2e.kubectl("-n", NS, "delete", "isvc", "--all", "--wait=true", timeout=300, check=False)
        e2e.helm("uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", timeout=300, check=False)
        for namespace in (NS, RELEASE_NS):
            e2e.kubectl("delete", "namespace", namespace, "--wait=false", timeout=60, check=False)


def pull_secret_names(pod: dict) -> list[str]:
    return [s["name"] for s in pod["spec"].get("imagePullSecrets", [])]


def operator_metrics(e2e: E2ECluster) -> str:
    """The operator pod's /metrics, from its pod IP and ``metrics`` container port."""
    (pod,) = e2e.get("pods", "-n", RELEASE_NS, "-l", OPERATOR_SELECTOR)["items"]
    port = next(p["containerPort"] for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "metrics")
    return httpx.get(f"http://{pod['status']['podIP']}:{port}/metrics", timeout=10).text


def test_operator_is_ready_pulls_with_both_secrets_and_serves_metrics(platform: E2ECluster):
    e2e = platform
    (pod,) = e2e.get("pods", "-n", RELEASE_NS, "-l", OPERATOR_SELECTOR)["items"]
    conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert conditions["Ready"] == "True", pod["status"]
    assert pod["spec"]["nodeName"] == e2e.node
    assert pull_secret_names(pod) == PULL_SECRETS
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    text = operator_metrics(e2e)
    # the series KubeinferOperatorReconcilesFailing selects
    assert re.search(rf'^{ALERT_SERIES}\{{result="error"\}} ', text, flags=re.M), text
    ready = httpx.get(f"http://{pod['status']['podIP']}:{port}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text


def test_serving_and_router_pods_carry_the_pull_secrets(platform: E2ECluster):
    e2e = platform
    isvc = yaml.safe_load(EXAMPLE.read_text())
    assert isvc["metadata"]["name"] == ISVC
    isvc["metadata"]["namespace"] = NS
    e2e.kubectl("apply", "-f", "-", input=yaml.safe_dump(isvc))
    e2e.kubectl("wait", "--for=condition=Ready", f"inferenceservices.serving.kubeinfer.io/{ISVC}", "-n", NS,
                "--timeout=600s", timeout=620)
    pods = wait_until("serving and router pods", lambda: (p := e2e.get(
        "pods", "-n", NS, "-l", f"serving.kubeinfer.io/inferenceservice={ISVC}")["items"]) and p, timeout=60)
    components = {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods}
    assert {"serving", "router"} <= components, components
    for pod in pods:
        assert pull_secret_names(pod) == PULL_SECRETS, (pod["metadata"]["name"], pull_secret_names(pod))
    ip = e2e.get("service", ISVC, "-n", NS)["spec"]["clusterIP"]
    client = OpenAI(base_url=f"http://{ip}/v1", api_key="unused", timeout=120, max_retries=0)
    done = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=4, temperature=0)
    assert done.usage.completion_tokens == 4


def test_the_operator_counts_the_reconciles_of_the_isvc(platform: E2ECluster):
    match = re.search(rf'^{ALERT_SERIES}\{{result="ok"\}} (\S+)$', operator_metrics(platform), flags=re.M)
    assert match and float(match.group(1)) >= 1, match
