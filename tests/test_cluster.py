"""The test control plane behaves like a real cluster: scheduling onto fake GPU nodes,
Deployment roll-out, garbage collection, HPA admission and matching client versions."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import yaml

pytestmark = pytest.mark.cluster


def wait_until(predicate: Callable[[], object], timeout: float = 90.0, interval: float = 0.5) -> object:
    """Poll ``predicate`` until it returns a truthy value and return it; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s: {predicate.__doc__ or predicate}")
        time.sleep(interval)


@pytest.fixture
def namespace(cluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def gpu_deployment(name: str, replicas: int, gpus: int) -> str:
    """Manifest of a Deployment whose pods each request and limit ``gpus`` nvidia.com/gpu."""
    return yaml.safe_dump({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [{
                        "name": "server",
                        "image": "registry.invalid/kubeinfer-serving:test",
                        "resources": {
                            "requests": {"nvidia.com/gpu": str(gpus), "cpu": "1"},
                            "limits": {"nvidia.com/gpu": str(gpus)},
                        },
                    }],
                },
            },
        },
    })


def get_json(cluster, *args: str) -> dict:
    """``kubectl get ... -o json`` parsed."""
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_fake_nodes_advertise_gpus(cluster):
    nodes = get_json(cluster, "nodes", "-l", "type=kwok")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == sorted(cluster.gpu_nodes)
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(cluster.gpus_per_node)
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"


def test_gpu_deployment_rolls_out_and_is_garbage_collected(cluster, namespace):
    ns = ("-n", namespace)
    cluster.kubectl("apply", *ns, "-f", "-", input=gpu_deployment("llm", replicas=2, gpus=1))
    cluster.kubectl("rollout", "status", *ns, "deployment/llm", "--timeout=90s")

    pods = get_json(cluster, "pods", *ns, "-l", "app=llm")["items"]
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeName"] in cluster.gpu_nodes
        assert pod["status"]["phase"] == "Running"
        assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "True"
        owner = pod["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "ReplicaSet"
    replicasets = get_json(cluster, "replicasets", *ns, "-l", "app=llm")["items"]
    assert len(replicasets) == 1
    assert replicasets[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    assert get_json(cluster, "deployment", *ns, "llm")["status"]["readyReplicas"] == 2

    cluster.kubectl("delete", *ns, "deployment/llm", "--wait=false")

    def dependents_gone() -> bool:
        """ReplicaSet and Pods of the deleted Deployment are removed by the garbage collector."""
        out = cluster.kubectl("get", *ns, "replicasets,pods", "-l", "app=llm", "-o", "name").stdout
        return out.strip() == ""

    wait_until(dependents_gone)


def test_pod_asking_for_more_gpus_than_a_node_has_stays_pending(cluster, namespace):
    too_many = cluster.gpus_per_node + 1
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=gpu_deployment("big", 1, too_many))

    def unschedulable() -> bool:
        """The scheduler reports the pod Unschedulable for lack of nvidia.com/gpu."""
        pods = get_json(cluster, "pods", "-n", namespace, "-l", "app=big")["items"]
        for pod in pods:
            for cond in pod["status"].get("conditions", []):
                if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    return "nvidia.com/gpu" in cond.get("message", "")
        return False

    wait_until(unschedulable)
    pod = get_json(cluster, "pods", "-n", namespace, "-l", "app=big")["items"][0]
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def test_hpa_with_pods_metric_is_accepted_and_reconciled(cluster, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=gpu_deployment("llm", 1, 1))
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "llm"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"},
            "minReplicas": 1,
            "maxReplicas": 4,
            "metrics": [{
                "type": "Pods",
                "pods": {
                    "metric": {"name": "kubeinfer_queue_length"},
                    "target": {"type": "AverageValue", "averageValue": "5"},
                },
            }],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(hpa))

    table = cluster.kubectl("get", "hpa", "-n", namespace, "llm").stdout.splitlines()
    assert table[0].split()[:6] == ["NAME", "REFERENCE", "TARGETS", "MINPODS", "MAXPODS", "REPLICAS"]
    row = table[1].split()
    assert row[0] == "llm" and row[1] == "Deployment/llm"
    assert row[-4:-2] == ["1", "4"]

    def controller_reported() -> dict:
        """The HPA controller has written AbleToScale/ScalingActive conditions."""
        status = get_json(cluster, "hpa", "-n", namespace, "llm").get("status", {})
        return {c["type"]: c for c in status.get("conditions", [])}

    conditions = wait_until(controller_reported)
    assert "AbleToScale" in conditions
    # No custom metrics API is served, so the controller reports it cannot read the Pods metric.
    assert conditions["ScalingActive"]["status"] == "False"


def test_kubectl_matches_server_minor_version(cluster):
    versions = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    client, server = versions["clientVersion"], versions["serverVersion"]
    assert client["major"] == server["major"] == "1"
    assert client["minor"] == server["minor"]
    assert server["gitVersion"].startswith(f"v1.{server['minor']}.")


def test_helm_version_and_template(cluster, tmp_path):
    assert cluster.helm("version", "--short").stdout.startswith("v3.")
    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("replicas: 2\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cfg\n"
        "data:\n  replicas: {{ .Values.replicas | quote }}\n"
    )
    out = cluster.helm("template", "rel", str(chart), "--set", "replicas=3").stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert docs == [{
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "rel-cfg"}, "data": {"replicas": "3"},
    }]
