"""KEDA mode end to end on the test control plane: queue length -> Prometheus -> KEDA -> HPA -> Deployment.

Real: the API server with the aggregation layer, the HPA controller, Prometheus discovering pods
through the API with the shipped kubernetes-pods job, KEDA's operator and metrics adapter behind
the external.metrics.k8s.io APIService, the operator (as its least-privilege ServiceAccount), and
a real ``kubeinfer-serve`` whose queue fills under load. Faked: the kubelet. kwok runs the
Deployment's pods (no process behind them), so the series comes from one extra pod named like
the isvc's pods whose status the test writes (kwok leaves it alone): its IP is this machine's
address and its ``http`` port is the real server's, so Prometheus scrapes and the operator polls
a real serving process exactly as they would a pod. tests/e2e repeats this with real pods.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubeinfer_serving.models.builtin import BUILTIN_MODEL_NAME, ensure_builtin_model

from tests.api.conftest import stop_process, wait_ready
from tests.metrics_stack_fixture import free_port
from tests.operator import test_operator_cluster as toc
from tests.operator.conftest import CRD_PATH, REPO
from tests.stream_load import StreamLoad

pytestmark = [pytest.mark.cluster, pytest.mark.metrics]

NS = "kubeinfer-keda"
TRANSCRIPT = REPO / "tests" / ".artifacts" / "keda-scaling-transcript.txt"


def log(line: str) -> None:
    TRANSCRIPT.parent.mkdir(parents=True, exist_ok=True)
    with TRANSCRIPT.open("a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {line}\n")


@pytest.fixture(scope="module")
def serving(metrics_stack) -> Iterator[str]:
    """A real kubeinfer-serve on this machine's address: one running slot, so a queue builds."""
    port = free_port(metrics_stack.host_ip)
    script = Path(sys.executable).with_name("kubeinfer-serve")
    cmd = [str(script), "--host", metrics_stack.host_ip, "--port", str(port), "--model-dir",
           str(ensure_builtin_model()), "--served-model-name", BUILTIN_MODEL_NAME, "--max-num-seqs", "1",
           "--max-waiting-requests", "256", "--max-model-len", "1024", "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    base = f"http://{metrics_stack.host_ip}:{port}"
    try:
        wait_ready(base, proc=proc)
        yield base
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def k(cluster):
    class K:
        def run(self, *args: str, check: bool = True, input: str | None = None):
            return cluster.kubectl(*args, check=check, input=input)

        def json(self, *args: str) -> dict | None:
            res = cluster.kubectl("-n", NS, "get", *args, "-o", "json", check=False)
            return json.loads(res.stdout) if res.returncode == 0 else None

        def apply(self, manifest: dict):
            return cluster.kubectl("-n", NS, "apply", "-f", "-", input=yaml.safe_dump(manifest))

    return K()


@pytest.fixture(scope="module")
def operator(cluster, metrics_stack, k) -> Iterator[toc.Operator]:
    k.run("apply", "--server-side", "-f", str(CRD_PATH))
    k.run("wait", "--for", "condition=Established", f"crd/{toc.CRD_NAME}", "--timeout=60s")
    k.run("apply", "-f", str(REPO / "deploy" / "operator" / "namespace.yaml"),
          "-f", str(REPO / "deploy" / "operator" / "rbac.yaml"))
    k.run("create", "namespace", NS, check=False)
    token = k.run("-n", "kubeinfer-system", "create", "token", "kubeinfer-operator", "--duration=2h").stdout.strip()
    workdir = Path(tempfile.mkdtemp(prefix="kubeinfer-operator-keda-"))
    cfg = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    cfg["users"] = [{"name": "op", "user": {"token": token}}]
    for ctx in cfg["contexts"]:
        ctx["context"]["user"] = "op"
    (workdir / "kubeconfig").write_text(yaml.safe_dump(cfg))
    op = toc.Operator(workdir / "kubeconfig", workdir, namespace=NS, extra_env={
        "KUBEINFER_PROMETHEUS_URL": metrics_stack.prometheus_url,
        "KUBEINFER_KEDA_POLLING_SECONDS": "2",
        "KUBEINFER_MODEL_POLL_NETWORKS": f"{metrics_stack.host_ip}/32",
    })
    op.start()
    try:
        yield op
    finally:
        op.stop()
        (REPO / "tests" / ".artifacts").mkdir(parents=True, exist_ok=True)
        (REPO / "tests" / ".artifacts" / "operator-keda.log").write_text(op.log())


def isvc(name: str, min_r: int, max_r: int, target: int = 2, activation: int = 0) -> dict:
    return {"apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"models": [{"name": BUILTIN_MODEL_NAME, "source": "file:///opt/kubeinfer/models/tiny-llama",
                                 "preload": True}],
                     "scaling": {"autoscaler": "keda", "minReplicas": min_r, "maxReplicas": max_r,
                                 "targetQueueLength": target, "activationQueueLength": activation,
                                 "scaleDownStabilizationSeconds": 5}}}


def target_pod(k, isvc_name: str, serving_url: str) -> str:
    """A pod named like the isvc's pods, labelled as they are, whose status says Running/Ready at
    this machine's address with the real server's port: what Prometheus and the operator reach."""
    url = urllib.parse.urlparse(serving_url)
    name = f"{isvc_name}-5d8f7c9b6d-probe"
    labels = {"app.kubernetes.io/managed-by": "kubeinfer-operator", "app.kubernetes.io/component": "serving",
              "app.kubernetes.io/name": "kubeinfer-serving", "serving.kubeinfer.io/inferenceservice": isvc_name}
    k.apply({"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": name, "namespace": NS, "labels": labels,
                          "annotations": {"kwok.x-k8s.io/status": "custom", "prometheus.io/scrape": "true",
                                          "prometheus.io/port": str(url.port), "prometheus.io/path": "/metrics"}},
             "spec": {"nodeName": "kwok-node-0",
                      "containers": [{"name": "serving", "image": toc.SERVING_IMAGE,
                                      "ports": [{"name": "http", "containerPort": url.port}]}]}})
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {"status": {"phase": "Running", "podIP": url.hostname, "podIPs": [{"ip": url.hostname}],
                         "hostIP": url.hostname, "startTime": now,
                         "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now},
                                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}]}}
    k.run("-n", NS, "patch", "pod", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))
    return name


def external_metric(k, scaled_object: str) -> tuple[str, float] | None:
    """(metric name, value) of the ScaledObject's external metric, read like the HPA controller does."""
    hpa = k.json("hpa", f"keda-hpa-{scaled_object}")
    if not hpa:
        return None
    metric = hpa["spec"]["metrics"][0]["external"]["metric"]["name"]
    sel = urllib.parse.quote(f"scaledobject.keda.sh/name={scaled_object}")
    res = k.run("get", "--raw", f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{NS}/{metric}?labelSelector={sel}",
                check=False)
    if res.returncode != 0:
        return None
    items = json.loads(res.stdout)["items"]
    if not items:
        return None
    raw = items[0]["value"]
    value = float(raw[:-1]) / 1000 if raw.endswith("m") else float(raw)
    return metric, value


def hpa_line(k, name: str) -> str:
    return k.run("-n", NS, "get", "hpa", name, "--no-headers").stdout.strip()


def test_keda_scales_up_on_queue_length_and_back_down(cluster, metrics_stack, operator, serving, k):
    TRANSCRIPT.unlink(missing_ok=True)
    k.apply(isvc("qchat", 1, 3))
    keda_hpa = toc.wait_for("the ScaledObject and KEDA's HPA", lambda: k.json("scaledobject", "qchat")
                      and k.json("hpa", "keda-hpa-qchat"), timeout=90)
    assert keda_hpa["spec"]["metrics"][0]["type"] == "External"
    assert not k.json("hpa", "qchat")  # KEDA owns the HPA; the operator renders none in keda mode
    pod = target_pod(k, "qchat", serving)
    toc.wait_for("Prometheus scraping the serving pod", lambda: metrics_stack.query(
        f'kubeinfer_queue_length{{namespace="{NS}",pod="{pod}"}}'), timeout=60)

    def flowing():
        got = external_metric(k, "qchat")
        obj = k.json("isvc", "qchat")
        return got is not None and toc.condition(obj, "AutoscalerReady").get("status") == "True" and (got, obj)

    (metric, value), obj = toc.wait_for("the external metric and AutoscalerReady=True", flowing, timeout=120)
    log(f"external metric {metric} = {value} (idle); AutoscalerReady: {toc.condition(obj, 'AutoscalerReady')}")
    assert value == 0

    def models_polled():
        o = k.json("isvc", "qchat")
        models = (o.get("status") or {}).get("models") or []
        return models and models[0].get("readyPods") == 1 and o

    obj = toc.wait_for("status.models from the polled pod", models_polled, timeout=90)
    assert obj["status"]["models"][0]["state"] == "Loaded" and obj["status"]["modelSummary"] == f"{BUILTIN_MODEL_NAME} 1/1"

    t_load = time.monotonic()
    with StreamLoad(f"{serving}/v1", BUILTIN_MODEL_NAME, concurrency=12, prompt="tell me a long story",
                    max_tokens=200):
        def metric_up():
            got = external_metric(k, "qchat")
            return got and got[1] >= 4 and got

        _, value = toc.wait_for("the queue in the external metric", metric_up, timeout=90)
        t_metric = time.monotonic()
        log(f"load started; metric {value} after {t_metric - t_load:.1f}s: {hpa_line(k, 'keda-hpa-qchat')}")
        dep = toc.wait_for("the HPA scaling the Deployment to 3", lambda: (d := k.json("deployment", "qchat"))
                           and d["spec"].get("replicas") == 3 and d, timeout=90)
        t_scaled = time.monotonic()
        log(f"scale decision 1 -> 3 after {t_scaled - t_load:.1f}s: {hpa_line(k, 'keda-hpa-qchat')}")
        toc.wait_for("3 ready pods", lambda: (d := k.json("deployment", "qchat"))
                     and d["status"].get("readyReplicas") == 3, timeout=90)
        t_ready = time.monotonic()
        log(f"3 pods Ready after {t_ready - t_load:.1f}s")
        hpa = k.json("hpa", "keda-hpa-qchat")
        current = hpa["status"]["currentMetrics"][0]["external"]["current"]
        assert float(current.get("averageValue", "0").rstrip("m") or 0) > 0, hpa["status"]
    t_stop = time.monotonic()
    log(f"load stopped: {hpa_line(k, 'keda-hpa-qchat')}")
    toc.wait_for("scale-down to minReplicas 1", lambda: (d := k.json("deployment", "qchat"))
                 and d["spec"].get("replicas") == 1, timeout=200, interval=2)
    log(f"scaled back to 1 after {time.monotonic() - t_stop:.1f}s: {hpa_line(k, 'keda-hpa-qchat')}")
    assert dep["spec"]["replicas"] == 3


def test_scale_to_zero_and_activation_from_the_queue(metrics_stack, operator, serving, k):
    k.apply(isvc("qzero", 0, 2, activation=1))
    toc.wait_for("KEDA scaling qzero to zero", lambda: (d := k.json("deployment", "qzero"))
                 and d["spec"].get("replicas") == 0, timeout=120)

    def zero_ready():
        o = k.json("isvc", "qzero")
        return toc.condition(o, "AutoscalerReady").get("reason") == "ScaledToZero" and o

    obj = toc.wait_for("AutoscalerReady=True/ScaledToZero", zero_ready, timeout=60)
    assert toc.condition(obj, "Ready")["status"] == "True"
    log(f"qzero at zero: {toc.condition(obj, 'AutoscalerReady')['message']}")
    target_pod(k, "qzero", serving)  # its queue is what KEDA's activation looks at
    t0 = time.monotonic()
    with StreamLoad(f"{serving}/v1", BUILTIN_MODEL_NAME, concurrency=6, prompt="tell me a long story",
                    max_tokens=200):
        toc.wait_for("activation 0 -> 1", lambda: (d := k.json("deployment", "qzero"))
                     and (d["spec"].get("replicas") or 0) >= 1, timeout=90)
    log(f"qzero activated 0 -> 1 after {time.monotonic() - t0:.1f}s of queue above activationQueueLength")
