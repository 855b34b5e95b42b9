"""Autoscaling on queue length on the real node, KEDA mode: load through the Service and the router
-> queue -> Prometheus -> KEDA -> HPA -> more serving pods that take traffic -> load ends -> back to
minReplicas; and isvcs with minReplicas 0 that KEDA takes to zero when idle: in router mode (the
default) the first request is held by the router and answered by the pod it woke (a client with
``max_retries=0``); in service mode it meets the activator (503 + Retry-After) and is then served by
the pod that request woke.

The operator runs as a pod from the chart (image from ``make images``); Prometheus and KEDA run on
this machine from tests/metrics-stack (tests/metrics_stack_fixture.py), wired in as in a real
cluster: Prometheus discovers the serving pods through the API (kubernetes_sd_configs, the
operator's scrape annotations) and scrapes their pod IPs on the node's bridge; KEDA's adapter
listens on the bridge's gateway and serves external.metrics.k8s.io through the aggregation layer.
The measured times and the ``kubectl get hpa -w`` transcript go to tests/.artifacts/keda-e2e-*.txt.
"""

from __future__ import annotations

import calendar
import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

from tests.cluster_fixture import REPO
from tests.e2e.conftest import OPERATOR_IMAGE, SERVING_IMAGE, E2ECluster, wait_until
from tests.metrics_stack_fixture import (
    EXTERNAL_METRICS_APISERVICE,
    MetricsStack,
    save_logs,
    start_metrics_stack,
)
from tests.stream_load import StreamLoad

pytestmark = [pytest.mark.metrics, pytest.mark.timeout(1500)]

NS = "keda-e2e"
RELEASE = "kubeinfer-keda"
RELEASE_NS = "kubeinfer-keda-system"
ARTIFACTS = REPO / "tests" / ".artifacts"
MODEL = "tiny-llama"
RETRY_AFTER = 2


@pytest.fixture(scope="module")
def stack(e2e_cluster: E2ECluster) -> Iterator[MetricsStack]:
    state_dir = Path(tempfile.mkdtemp(prefix="kubeinfer-e2e-metrics-"))
    running = start_metrics_stack(e2e_cluster.cluster, state_dir, address=e2e_cluster.gateway)
    try:
        yield running
    finally:
        save_logs(running, ARTIFACTS / "keda-e2e-metrics-logs")
        # The adapter's APIService goes with the adapter: an unavailable aggregated API makes every
        # later namespace deletion in this cluster fail ("stale GroupVersion discovery").
        e2e_cluster.kubectl("delete", "apiservice", EXTERNAL_METRICS_APISERVICE, "--ignore-not-found", check=False)
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
             "--set", f"servingImage={SERVING_IMAGE}", "--set", f"watchNamespaces={{{NS}}}",
             "--set", f"prometheusUrl={stack.prometheus_url}", "--set", "kedaPollingSeconds=2",
             "--set", f"activator.retryAfterSeconds={RETRY_AFTER}", timeout=400)
    try:
        yield
    finally:
        e2e.kubectl("-n", NS, "delete", "isvc", "--all", "--wait=true", timeout=300, check=False)
        e2e.helm("uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", timeout=300, check=False)
        e2e.kubectl("delete", "namespace", NS, "--wait=true", timeout=300, check=False)


#: Seconds the router holds a request at zero: above this node's cold start (a Prometheus scrape,
#: a KEDA poll, pod start, model load).
HOLD_SECONDS = 300


def isvc(name: str, min_r: int, max_r: int, routing: dict | None = None) -> dict:
    return {"apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"models": [{"name": MODEL, "source": "file:///opt/kubeinfer/models/tiny-llama", "preload": True,
                                 "maxModelLen": 1024}],
                     "runtime": {"maxNumSeqs": 4, "maxWaitingRequests": 256},
                     "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}},
                     "routing": routing or {"holdTimeoutSeconds": HOLD_SECONDS},
                     "scaling": {"autoscaler": "keda", "minReplicas": min_r, "maxReplicas": max_r,
                                 "targetQueueLength": 4, "scaleDownStabilizationSeconds": 15}}}


def conditions(e2e: E2ECluster, name: str) -> dict[str, dict]:
    return {c["type"]: c for c in e2e.get("isvc", name, "-n", NS).get("status", {}).get("conditions", [])}


class HpaWatch:
    """``kubectl get hpa NAME -w`` into a transcript file, each line prefixed with the time."""

    def __init__(self, e2e: E2ECluster, name: str, path: Path) -> None:
        cluster = e2e.cluster
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w")
        self.proc = subprocess.Popen([str(cluster.bin_dir / "kubectl"), "--kubeconfig", str(cluster.kubeconfig),
                                      "-n", NS, "get", "hpa", name, "-w"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.thread = threading.Thread(target=self._copy, daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.file.write(f"{time.strftime('%H:%M:%S')}  {line}")
            self.file.flush()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.thread.join(timeout=10)
        self.file.close()


def _quantity(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def test_keda_scales_serving_pods_with_the_queue(e2e_cluster: E2ECluster, stack: MetricsStack, operator):
    e2e = e2e_cluster
    times: dict[str, float] = {}
    e2e.kubectl("apply", "-f", "-", input=yaml.safe_dump(isvc("scaled", 1, 3)))
    wait_until("the isvc Ready with AutoscalerReady True (the metric flows)", lambda: (
        conditions(e2e, "scaled").get("Ready", {}).get("status") == "True"
        and conditions(e2e, "scaled").get("AutoscalerReady", {}).get("status") == "True"), timeout=600, interval=2)
    assert e2e.kubectl("-n", NS, "get", "deployment", "scaled-activator", check=False).returncode != 0
    watch = HpaWatch(e2e, "keda-hpa-scaled", ARTIFACTS / "keda-e2e-hpa-watch.txt")
    ip = e2e.get("service", "scaled", "-n", NS)["spec"]["clusterIP"]
    start = time.monotonic()
    try:
        with StreamLoad(f"http://{ip}/v1", MODEL, concurrency=64, prompt="count slowly", max_tokens=256,
                        max_seconds=480) as load:
            def metric_seen():
                hpa = e2e.get("hpa", "keda-hpa-scaled", "-n", NS)
                current = (hpa.get("status", {}).get("currentMetrics") or [{}])[0].get("external", {}).get("current", {})
                return _quantity(current.get("averageValue") or current.get("value") or "0") > 0 and hpa

            metric_seen_hpa = wait_until("the queue in the HPA's metric", metric_seen, timeout=180)
            times["load start -> queue visible in the HPA status (s)"] = time.monotonic() - start
            wait_until("the HPA's scale-up decision", lambda: (
                e2e.get("deployment", "scaled", "-n", NS)["spec"].get("replicas", 1) > 1), timeout=180)
            times["load start -> scale-up decision (s)"] = time.monotonic() - start
            wait_until("3 Ready serving pods", lambda: (
                e2e.get("deployment", "scaled", "-n", NS)["status"].get("readyReplicas", 0) == 3), timeout=600)
            times["load start -> 3 pods Ready (s)"] = time.monotonic() - start

            def all_pods_generate():
                rows = stack.query(f'sum by (pod) (kubeinfer_generation_tokens_total{{namespace="{NS}",'
                                   f'pod=~"scaled-[a-z0-9]+-[a-z0-9]+"}})')
                return len([r for r in rows if float(r["value"][1]) > 0]) == 3

            wait_until("each of the 3 pods to generate tokens", all_pods_generate, timeout=300, interval=3)
            times["load start -> every pod serving (s)"] = time.monotonic() - start
        stop = time.monotonic()
        wait_until("scale-down to minReplicas 1", lambda: (
            e2e.get("deployment", "scaled", "-n", NS)["spec"].get("replicas") == 1), timeout=400, interval=2)
        times["load end -> back to 1 replica (s)"] = time.monotonic() - stop
        wait_until("the HPA reporting 1 replica (for the transcript)", lambda: (
            e2e.get("hpa", "keda-hpa-scaled", "-n", NS)["status"].get("currentReplicas") == 1), timeout=60, interval=2)
    finally:
        watch.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "keda-e2e-times.txt").write_text("".join(f"{k}: {v:.1f}\n" for k, v in times.items()))
    # 429 (queue full) is allowed under this load; anything else is a lost request
    assert not [e for e in load.errors if "429" not in e], load.errors[:5]
    assert load.completed > 0
    assert metric_seen_hpa["spec"]["metrics"][0]["type"] == "External"
    assert conditions(e2e, "scaled")["AutoscalerReady"]["status"] == "True"
    seen: list[object] = []

    def one_pod_in_status():
        status = e2e.get("isvc", "scaled", "-n", NS)["status"]
        seen[:] = [status.get("modelSummary"), status.get("models"), status.get("readyReplicas")]
        return status.get("modelSummary") == f"{MODEL} 1/1"

    try:
        wait_until("status.models back to one pod", one_pod_in_status, timeout=120, interval=2)
    except AssertionError as err:
        pods = e2e.get("pods", "-n", NS, "-l", "serving.kubeinfer.io/inferenceservice=scaled")["items"]
        probes = []
        for pod in pods:
            t0 = time.monotonic()
            try:
                code = httpx.get(f"http://{pod['status']['podIP']}:8000/v1/models", timeout=10).status_code
            except httpx.HTTPError as exc:
                code = repr(exc)
            probes.append(f"{pod['metadata']['name']}: /v1/models from this machine -> {code} in "
                          f"{time.monotonic() - t0:.2f}s; log tail:\n"
                          + "".join(e2e.container_log(NS, pod["metadata"]["name"], "serving").splitlines(True)[-30:]))
        operator_pods = e2e.get("pods", "-n", RELEASE_NS)["items"]
        op_log = "".join(e2e.container_log(RELEASE_NS, operator_pods[0]["metadata"]["name"], "operator")
                         .splitlines(True)[-40:]) if operator_pods else ""
        raise AssertionError(f"{err}; status (modelSummary, models, readyReplicas): {seen}\n" + "\n".join(probes)
                             + f"\noperator log tail:\n{op_log}") from None


class WakeTimeline:
    """Once a second until stopped: the Deployment's replicas and readiness, the activator's, and
    the values of the ScaledObject's trigger queries in Prometheus, into ``path``."""

    def __init__(self, e2e: E2ECluster, stack: MetricsStack, name: str, path: Path) -> None:
        self.e2e, self.stack, self.name, self.path = e2e, stack, name, path
        self.queries = {t["name"]: t["metadata"]["query"]
                        for t in e2e.get("scaledobject", name, "-n", NS)["spec"]["triggers"]}
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> str:
        dep = self.e2e.get("deployment", self.name, "-n", NS)
        act = self.e2e.kubectl("-n", NS, "get", "deployment", f"{self.name}-activator", "-o",
                               "jsonpath={.status.readyReplicas}", check=False)
        values = {}
        for trigger, query in self.queries.items():
            rows = self.stack.query(query)
            values[trigger] = rows[0]["value"][1] if rows else "none"
        return (f"replicas={dep['spec'].get('replicas')} ready={dep['status'].get('readyReplicas', 0)} "
                f"activator={'absent' if act.returncode else 'ready=' + (act.stdout or '0')} triggers={values}")

    def _run(self) -> None:
        with self.path.open("w") as out:
            while not self.stop_flag.is_set():
                try:
                    line = self._sample()
                except Exception as exc:  # a diagnostic: never fail the test from here
                    line = f"sample failed: {exc!r}"
                out.write(f"{time.strftime('%H:%M:%S')}  {line}\n")
                out.flush()
                self.stop_flag.wait(1.0)

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=30)


def test_router_holds_the_first_request_at_zero_and_the_woken_pod_answers_it(
    e2e_cluster: E2ECluster, stack: MetricsStack, operator
):
    """Router mode (the default): no activator; the client's single request (``max_retries=0``) is
    held by the router, its held-requests gauge activates the isvc, and the woken pod answers it."""
    e2e = e2e_cluster
    lines: list[str] = []
    e2e.kubectl("apply", "-f", "-", input=yaml.safe_dump(isvc("held", 0, 2)))
    start = time.monotonic()
    wait_until("KEDA taking the isvc to zero, its router Ready", lambda: (
        e2e.get("deployment", "held", "-n", NS)["spec"].get("replicas") == 0
        and e2e.get("deployment", "held-router", "-n", NS)["status"].get("readyReplicas") == 2
        and not e2e.get("pods", "-n", NS, "-l", "app.kubernetes.io/component=serving,"
                        "serving.kubeinfer.io/inferenceservice=held")["items"]), timeout=400, interval=2)
    lines.append(f"router mode: isvc created -> at zero, router Ready (s): {time.monotonic() - start:.1f}")
    wait_until("AutoscalerReady=True/ScaledToZero and Ready", lambda: (
        conditions(e2e, "held")["AutoscalerReady"]["reason"] == "ScaledToZero"
        and conditions(e2e, "held")["Ready"]["status"] == "True"), timeout=60)
    assert "the router holds requests" in conditions(e2e, "held")["AutoscalerReady"]["message"]
    assert e2e.kubectl("-n", NS, "get", "deployment", "held-activator", check=False).returncode != 0

    ip = e2e.get("service", "held", "-n", NS)["spec"]["clusterIP"]
    timeline = WakeTimeline(e2e, stack, "held", ARTIFACTS / "keda-e2e-router-wake-timeline.txt")
    client = OpenAI(base_url=f"http://{ip}/v1", api_key="unused", timeout=HOLD_SECONDS + 30, max_retries=0)
    first = time.monotonic()
    try:
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
    finally:
        timeline.stop()
    served = time.monotonic() - first
    answer = raw.parse()
    assert answer.usage.completion_tokens == 4
    lines.append(f"router mode: first request at zero -> answered by the woken pod, no client retry (s): {served:.1f}")
    (pod,) = [p for p in e2e.get("pods", "-n", NS, "-l", "app.kubernetes.io/component=serving,"
                                 "serving.kubeinfer.io/inferenceservice=held")["items"]
              if not p["metadata"].get("deletionTimestamp")]
    assert raw.headers["x-kubeinfer-endpoint"] == pod["metadata"]["name"], dict(raw.headers)
    with (ARTIFACTS / "keda-e2e-times.txt").open("a") as f:
        f.write("".join(line + "\n" for line in lines))


def test_min_replicas_zero_goes_to_zero_and_the_first_request_wakes_it(
    e2e_cluster: E2ECluster, stack: MetricsStack, operator
):
    """Service mode: the activator answers at zero (503 + Retry-After) and the client retries."""
    e2e = e2e_cluster
    lines: list[str] = []
    e2e.kubectl("apply", "-f", "-", input=yaml.safe_dump(isvc("idle", 0, 2, routing={"mode": "service"})))
    start = time.monotonic()
    wait_until("KEDA taking the idle isvc to zero with the activator Ready", lambda: (
        e2e.get("deployment", "idle", "-n", NS)["spec"].get("replicas") == 0
        and e2e.get("deployment", "idle-activator", "-n", NS)["status"].get("readyReplicas") == 1
        and not e2e.get("pods", "-n", NS, "-l", "app.kubernetes.io/component=serving,"
                        "serving.kubeinfer.io/inferenceservice=idle")["items"]), timeout=400, interval=2)
    lines.append(f"idle isvc created -> at zero, activator Ready (s): {time.monotonic() - start:.1f}")
    wait_until("AutoscalerReady=True/ScaledToZero", lambda: (
        conditions(e2e, "idle")["AutoscalerReady"]["reason"] == "ScaledToZero"), timeout=60)
    lines.append(f"conditions at zero: {json.dumps(list(conditions(e2e, 'idle').values()))}")

    ip = e2e.get("service", "idle", "-n", NS)["spec"]["clusterIP"]
    timeline = WakeTimeline(e2e, stack, "idle", ARTIFACTS / "keda-e2e-wake-timeline.txt")
    first, first_wall = time.monotonic(), time.time()
    r = httpx.post(f"http://{ip}/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 4}, timeout=30)
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == str(RETRY_AFTER)
    assert r.json()["error"]["code"] == "scaled_to_zero"
    # what a client sees: the official client retries the 503 after Retry-After until a pod answers
    client = OpenAI(base_url=f"http://{ip}/v1", api_key="unused", timeout=60, max_retries=100)
    try:
        answer = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
    finally:
        timeline.stop()
    served = time.monotonic() - first
    assert answer.usage.completion_tokens == 4
    lines.append(f"first request at zero -> answered by a woken pod (s): {served:.1f}")
    (pod,) = [p for p in e2e.get("pods", "-n", NS, "-l", "app.kubernetes.io/component=serving,"
                                 "serving.kubeinfer.io/inferenceservice=idle")["items"]
              if not p["metadata"].get("deletionTimestamp")]

    def since_first(stamp: str) -> float:
        return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) - first_wall

    ready_at = next(c["lastTransitionTime"] for c in pod["status"]["conditions"] if c["type"] == "Ready")
    lines.append(f"first request -> KEDA's scale-up created the pod (s, 1 s resolution): "
                 f"{since_first(pod['metadata']['creationTimestamp']):.0f}")
    lines.append(f"first request -> the woken pod Ready (s, 1 s resolution): {since_first(ready_at):.0f}")
    deployment = e2e.get("deployment", "idle", "-n", NS)
    assert deployment["spec"]["replicas"] >= 1 and deployment["status"].get("readyReplicas", 0) >= 1
    wait_until("the activator removed once a serving pod is Ready", lambda: (
        e2e.kubectl("-n", NS, "get", "deployment", "idle-activator", check=False).returncode != 0), timeout=60)
    lines.append(f"first request -> activator removed (s): {time.monotonic() - first:.1f}")
    with (ARTIFACTS / "keda-e2e-times.txt").open("a") as f:
        f.write("".join(line + "\n" for line in lines))
