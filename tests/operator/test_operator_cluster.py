"""The operator against the real control plane (tests/cluster): kubectl in, children and status out.

The operator runs as a local process (``kubeinfer-operator -n NAMESPACE``) with the credentials
of the ServiceAccount from deploy/operator/rbac.yaml, so every test here also proves that the
least-privilege RBAC is enough. kwok plays the kubelets: it marks scheduled pods Running and Ready.
Tests run in file order and share one InferenceService lifecycle.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.conftest import CRD_PATH, EXAMPLES, REPO, load_yaml_docs

pytestmark = pytest.mark.cluster

NS = "kubeinfer-e2e"
CRD_NAME = "inferenceservices.serving.kubeinfer.io"
FIRST = EXAMPLES[0]
TRANSCRIPT = REPO / "tests" / ".artifacts" / "operator-transcript.txt"
SERVING_IMAGE = "registry.local/kubeinfer-serving:e2e"


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 90.0, interval: float = 0.5) -> Any:
    """Poll ``probe`` until it returns a truthy value; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class Operator:
    """A ``kubeinfer-operator`` process with its log in a file."""

    def __init__(self, kubeconfig: Path, log_dir: Path, extra_env: dict[str, str] | None = None,
                 namespace: str = NS) -> None:
        self.extra_env = extra_env or {}
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.log_dir / f"operator-{self.starts}.log"
        with socket.socket() as s, socket.socket() as m:
            s.bind(("127.0.0.1", 0))
            m.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            self.metrics_port = m.getsockname()[1]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KUBEINFER_SERVING_IMAGE": SERVING_IMAGE,
               # kwok's fake pod IPs lead off this machine: poll /v1/models only on local addresses
               "KUBEINFER_MODEL_POLL_NETWORKS": os.environ.get("KUBEINFER_MODEL_POLL_NETWORKS", "127.0.0.0/8"),
               **self.extra_env}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "kubeinfer-operator"), "-n", self.namespace, "-v",
             "--liveness", f"http://127.0.0.1:{port}/healthz", "--metrics", f"127.0.0.1:{self.metrics_port}"],
            env=env, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )

        def live() -> bool:
            assert self.proc.poll() is None, f"operator exited:\n{self.log()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for("the operator's liveness endpoint", live, timeout=60)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""


@pytest.fixture(scope="module")
def k(cluster):
    """kubectl with JSON helpers, bound to the test namespace."""

    class K:
        def run(self, *args: str, check: bool = True, input: str | None = None):
            return cluster.kubectl(*args, check=check, input=input)

        def json(self, *args: str) -> dict | None:
            res = cluster.kubectl("-n", NS, "get", *args, "-o", "json", "--show-managed-fields", check=False)
            return json.loads(res.stdout) if res.returncode == 0 else None

        def apply(self, manifest: str | dict, check: bool = True):
            text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
            return cluster.kubectl("-n", NS, "apply", "-f", "-", input=text, check=check)

    return K()


def _sa_kubeconfig(cluster, token: str, path: Path) -> Path:
    cfg = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    cfg["users"] = [{"name": "kubeinfer-operator", "user": {"token": token}}]
    for ctx in cfg["contexts"]:
        ctx["context"]["user"] = "kubeinfer-operator"
        ctx["context"]["namespace"] = NS
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def operator(cluster, k) -> Iterator[Operator]:
    """CRD + RBAC installed, namespace created, operator running as its ServiceAccount."""
    k.run("apply", "--server-side", "-f", str(CRD_PATH))
    k.run("wait", "--for", "condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    k.run("apply", "-f", str(REPO / "deploy" / "operator" / "namespace.yaml"),
          "-f", str(REPO / "deploy" / "operator" / "rbac.yaml"))
    k.run("create", "namespace", NS, check=False)
    token = k.run("-n", "kubeinfer-system", "create", "token", "kubeinfer-operator", "--duration=2h").stdout.strip()
    workdir = Path(tempfile.mkdtemp(prefix="kubeinfer-operator-"))
    op = Operator(_sa_kubeconfig(cluster, token, workdir / "kubeconfig"), workdir)
    op.start()
    try:
        yield op
    finally:
        op.stop()
        artifacts = REPO / "tests" / ".artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        for log in sorted(workdir.glob("operator-*.log")):
            (artifacts / log.name).write_text(log.read_text())


def condition(isvc: dict | None, ctype: str) -> dict:
    for c in ((isvc or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == ctype:
            return c
    return {}


def first_example() -> dict:
    (doc,) = [d for d in load_yaml_docs(FIRST) if d["kind"] == "InferenceService"]
    return doc


def children_of(k, name: str) -> dict[str, dict | None]:
    return {
        "configmap": k.json("configmap", f"{name}-models"),
        "service": k.json("service", name),
        "deployment": k.json("deployment", name),
        "hpa": k.json("hpa", name),
    }


def router_children_of(k, name: str) -> dict[str, dict | None]:
    """The router-mode children (routing.mode router, the default)."""
    return {
        "router": k.json("deployment", f"{name}-router"),
        "pods_service": k.json("service", f"{name}-pods"),
        "serviceaccount": k.json("serviceaccount", f"{name}-router"),
        "role": k.json("role", f"{name}-router"),
        "rolebinding": k.json("rolebinding", f"{name}-router"),
    }


def _create_raw(cluster, body: dict) -> tuple[int, str]:
    """POST an InferenceService with the kubernetes client; returns (HTTP status, message)."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    try:
        api.create_namespaced_custom_object("serving.kubeinfer.io", "v1alpha1", NS, "inferenceservices", body)
    except ApiException as err:
        return err.status, json.loads(err.body)["message"]
    return 201, ""


MODEL = {"name": "tiny", "source": "file:///opt/kubeinfer/models/tiny-llama"}


@pytest.mark.parametrize(
    ("name", "spec", "message"),
    [
        ("min-over-max", {"models": [MODEL], "scaling": {"minReplicas": 3, "maxReplicas": 2}},
         "scaling.minReplicas must be less than or equal to scaling.maxReplicas"),
        ("duplicate-names", {"models": [MODEL, MODEL]}, "spec.models names must be unique"),
        ("bad-scheme", {"models": [{**MODEL, "source": "gs://bucket/model"}]},
         "source must be pvc://CLAIM/PATH, file:///ABSOLUTE/PATH, hf://ORG/NAME[/FILE.gguf][@REVISION] or s3://BUCKET/PREFIX"),
        ("bad-bucket", {"models": [{**MODEL, "source": "s3://Bucket_1/model"}]},
         "source must be pvc://CLAIM/PATH, file:///ABSOLUTE/PATH, hf://ORG/NAME[/FILE.gguf][@REVISION] or s3://BUCKET/PREFIX"),
        ("no-models", {"models": []}, "spec.models must list at least one model"),
        ("bad-model-name", {"models": [{**MODEL, "name": "Llama_3"}]}, "model name must be a DNS-1123 label"),
        ("kv-both", {"models": [{**MODEL, "kvCacheBytes": 1 << 30, "kvCacheFraction": 0.5}]},
         "set kvCacheBytes or kvCacheFraction, not both"),
        ("kv-embed", {"models": [{**MODEL, "kind": "embed", "kvCacheFraction": 0.5}]},
         "kvCacheBytes and kvCacheFraction apply to kind generate only"),
        ("eager-embed", {"models": [{**MODEL, "kind": "embed", "enforceEager": True}]},
         "enforceEager applies to kind generate only"),
        ("dup-served-ids", {"models": [{**MODEL, "servedModelName": "meta-llama/Llama-3.2-1B-Instruct"},
                                       {**MODEL, "name": "b", "servedModelName": "meta-llama/Llama-3.2-1B-Instruct"}]},
         "spec.models served ids (servedModelName, else name) must be unique"),
        ("served-id-is-a-name", {"models": [{**MODEL, "servedModelName": "b"}, {**MODEL, "name": "b"}]},
         "spec.models served ids (servedModelName, else name) must be unique"),
        ("adapter-id-is-model-id", {"models": [{**MODEL, "servedModelName": "org/base", "adapters": [
            {"name": "a", "servedModelName": "org/base", "source": "file:///opt/a"}]}]},
         "an adapter's served id (servedModelName, else name) must not be a model's served id"),
        ("adapter-ids-in-one-model", {"models": [{**MODEL, "adapters": [
            {"name": "a", "servedModelName": "org/sql", "source": "file:///opt/a"},
            {"name": "c", "servedModelName": "org/sql", "source": "file:///opt/c"}]}]},
         "adapter served ids (servedModelName, else name) must be unique"),
        ("bad-served-id", {"models": [{**MODEL, "servedModelName": "has space"}]}, "servedModelName"),
        ("router-overcommit", {"models": [MODEL], "routing": {"resources": {"requests": {"memory": "1Gi"},
                                                                          "limits": {"memory": "512Mi"}}}},
         "routing.resources: every request must be at most its limit"),
    ],
)
def test_schema_rejects_invalid_specs_with_a_readable_message(cluster, operator, k, name, spec, message):
    body = {"apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name}, "spec": spec}
    status, text = _create_raw(cluster, body)
    assert status == 422
    assert message in text
    res = k.apply(body, check=False)
    assert res.returncode != 0 and message in res.stderr
    assert k.json("isvc", name) is None


def test_first_example_becomes_ready_with_its_children(cluster, operator, k):
    isvc = first_example()
    name = isvc["metadata"]["name"]
    applied = k.run("-n", NS, "apply", "-f", str(FIRST)).stdout
    kids = wait_for("all four children", lambda: (c := children_of(k, name)) and all(c.values()) and c)

    uid = k.json("isvc", name)["metadata"]["uid"]
    for obj in kids.values():
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("InferenceService", name, uid, True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubeinfer-operator"

    catalogue = yaml.safe_load(kids["configmap"]["data"]["models.yaml"])
    assert [m["name"] for m in catalogue["models"]] == [m["name"] for m in isvc["spec"]["models"]]

    dep = kids["deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == SERVING_IMAGE
    assert c["command"] == ["kubeinfer-serve"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    ours = [m for m in dep["metadata"]["managedFields"] if m["manager"] == "kubeinfer-operator"]
    assert ours and all(m["operation"] == "Apply" for m in ours)
    assert all("f:replicas" not in m["fieldsV1"].get("f:spec", {}) for m in ours)  # the HPA owns replicas

    svc = kids["service"]["spec"]
    assert svc["ports"][0]["port"] == 80 and svc["ports"][0]["name"] == "http"
    assert svc["ports"][0]["targetPort"] == "http"
    hpa = kids["hpa"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "kubeinfer_queue_length"
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 1)

    def ready():
        obj = k.json("isvc", name)
        return condition(obj, "Ready").get("status") == "True" and obj

    obj = wait_for("Ready=True", ready, timeout=120)
    cond = condition(obj, "Ready")
    assert cond["reason"] == "Available"
    assert not obj["metadata"].get("finalizers")  # deleting never waits for the operator
    gen = obj["metadata"]["generation"]
    assert obj["status"]["observedGeneration"] == gen
    assert all(c["observedGeneration"] == gen for c in obj["status"]["conditions"])
    assert obj["status"]["url"] == f"http://{name}.{NS}.svc.cluster.local"
    assert obj["status"]["replicaSummary"] == "1/1"
    assert [m["state"] for m in obj["status"]["models"]] == ["Loaded"]  # preloaded + a ready pod

    assert condition(obj, "RouterReady")["status"] == "True"  # router mode is the default
    table = k.run("-n", NS, "get", "isvc").stdout
    header, row = table.splitlines()[0], next(line for line in table.splitlines() if line.startswith(name))
    assert header.split() == ["NAME", "URL", "READY", "REASON", "REPLICAS", "ROUTER", "MODELS", "AGE"]
    assert row.split()[1:7] == [obj["status"]["url"], "True", "Available", "1/1", "2/2", "tiny-llama"]

    events = k.run("-n", NS, "get", "events", "--field-selector", f"involvedObject.name={name}",
                   "-o", "json").stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert "Created" in reasons

    TRANSCRIPT.parent.mkdir(parents=True, exist_ok=True)
    children_table = k.run("-n", NS, "get", "deploy,svc,hpa,sa,role,rolebinding").stdout
    TRANSCRIPT.write_text(
        f"$ kubectl apply -f deploy/examples/{FIRST.name}\n{applied}"
        f"$ kubectl get isvc\n{table}\n$ kubectl get deploy,svc,hpa,sa,role,rolebinding\n{children_table}"
    )


def test_operator_serves_its_metrics_and_readiness(operator, k):
    base = f"http://127.0.0.1:{operator.metrics_port}"
    with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
        assert (r.status, r.read()) == (200, b"ok")
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        text = r.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("kubeinfer_operator_reconciles_total", (("result", "ok"),))] >= 1  # the first example's
    assert samples[("kubeinfer_operator_reconcile_duration_seconds_count", ())] >= 1


def test_router_children_with_their_rbac_and_selectors(operator, k):
    name = first_example()["metadata"]["name"]
    kids = router_children_of(k, name)
    assert all(kids.values()), {key: bool(v) for key, v in kids.items()}
    uid = k.json("isvc", name)["metadata"]["uid"]
    for obj in kids.values():
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["name"], ref["uid"], ref["controller"]) == (name, uid, True)
    # The operator (least-privilege ServiceAccount) could create this Role: RBAC escalation
    # prevention lets it grant only what it holds itself.
    assert kids["role"]["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                                      "verbs": ["get", "list", "watch"]}]
    router_sa = f"system:serviceaccount:{NS}:{name}-router"
    can = {what: k.run("auth", "can-i", *what.split(), "-n", NS, "--as", router_sa, check=False).stdout.strip()
           for what in ("watch endpointslices.discovery.k8s.io", "list endpointslices.discovery.k8s.io",
                        "get pods", "get secrets", "create endpointslices.discovery.k8s.io")}
    assert can == {"watch endpointslices.discovery.k8s.io": "yes", "list endpointslices.discovery.k8s.io": "yes",
                   "get pods": "no", "get secrets": "no", "create endpointslices.discovery.k8s.io": "no"}
    assert k.run("auth", "can-i", "list", "endpointslices.discovery.k8s.io", "-n", "default", "--as", router_sa,
                 check=False).stdout.strip() == "no"  # its own namespace only
    # The Service's endpoints are the router pods; the headless Service's are the serving pods.
    pods = k.json("pods", "-l", f"serving.kubeinfer.io/inferenceservice={name}")["items"]
    by_component: dict[str, set[str]] = {}
    for pod in pods:
        by_component.setdefault(pod["metadata"]["labels"]["app.kubernetes.io/component"], set()).add(
            pod["status"].get("podIP"))

    def endpoint_ips(service: str) -> set[str]:
        slices = k.json("endpointslices", "-l", f"kubernetes.io/service-name={service}")["items"]
        return {a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"]}

    wait_for("EndpointSlices of both Services", lambda: endpoint_ips(name) and endpoint_ips(f"{name}-pods"))
    assert endpoint_ips(name) == by_component["router"] and len(by_component["router"]) == 2
    assert endpoint_ips(f"{name}-pods") == by_component["serving"]
    assert kids["pods_service"]["spec"]["clusterIP"] == "None"
    (c,) = kids["router"]["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["kubeinfer-router"] and f"{name}-pods" in c["args"]


def test_spec_update_rolls_deployment_and_updates_hpa(operator, k):
    name = first_example()["metadata"]["name"]
    before = children_of(k, name)
    old_gen = k.json("isvc", name)["metadata"]["generation"]
    models = first_example()["spec"]["models"] + [{"name": "minilm", "source": "hf://sentence-transformers/all-MiniLM-L6-v2",
                                                   "kind": "embed"}]
    patch = {"spec": {"models": models, "scaling": {"maxReplicas": 3}}}
    k.run("-n", NS, "patch", "isvc", name, "--type", "merge", "-p", json.dumps(patch))

    def observed():
        obj = k.json("isvc", name)
        return obj["metadata"]["generation"] > old_gen and obj["status"]["observedGeneration"] == obj["metadata"]["generation"] and obj

    obj = wait_for("observedGeneration to follow", observed)
    after = children_of(k, name)
    assert "minilm" in after["configmap"]["data"]["models.yaml"]
    key = "serving.kubeinfer.io/config-hash"
    assert (after["deployment"]["spec"]["template"]["metadata"]["annotations"][key]
            != before["deployment"]["spec"]["template"]["metadata"]["annotations"][key])
    assert after["deployment"]["metadata"]["generation"] > before["deployment"]["metadata"]["generation"]
    assert after["hpa"]["spec"]["maxReplicas"] == 3
    assert obj["status"]["modelNames"] == "tiny-llama,minilm"

    # Now 1..3 replicas needs the queue-length metric, which this cluster has no adapter for:
    # Ready must say so instead of claiming readiness.
    def honest():
        o = k.json("isvc", name)
        return condition(o, "AutoscalerReady").get("status") == "False" and o

    o = wait_for("AutoscalerReady=False without a metrics adapter", honest, timeout=60)
    assert condition(o, "Ready")["status"] == "False"
    assert condition(o, "Ready")["reason"] == condition(o, "AutoscalerReady")["reason"]
    assert "kubeinfer_queue_length" in condition(o, "Ready")["message"]
    assert condition(o, "DeploymentAvailable")["status"] == "True"


def test_deleted_or_edited_children_are_put_back(operator, k):
    name = first_example()["metadata"]["name"]
    old = children_of(k, name)
    k.run("-n", NS, "delete", "service", name, "--wait=true")
    k.run("-n", NS, "delete", "configmap", f"{name}-models", "--wait=true")
    k.run("-n", NS, "patch", "hpa", name, "--type", "merge", "-p", '{"spec":{"maxReplicas":7}}')

    def restored():
        c = children_of(k, name)
        return (
            c["service"] and c["service"]["metadata"]["uid"] != old["service"]["metadata"]["uid"]
            and c["configmap"] and c["configmap"]["metadata"]["uid"] != old["configmap"]["metadata"]["uid"]
            and c["hpa"]["spec"]["maxReplicas"] == 3
        ) and c

    c = wait_for("the deleted Service and ConfigMap back and the HPA edit reverted", restored, timeout=60)
    assert c["service"]["spec"]["ports"][0]["port"] == 80
    assert "minilm" in c["configmap"]["data"]["models.yaml"]

    k.run("-n", NS, "delete", "deployment", name, "--wait=true")
    wait_for("the deleted Deployment back", lambda: (d := k.json("deployment", name))
             and d["metadata"]["uid"] != old["deployment"]["metadata"]["uid"], timeout=60)


def test_switching_routing_mode_swaps_the_router_objects(operator, k):
    name = first_example()["metadata"]["name"]
    serving_before = k.json("deployment", name)
    k.run("-n", NS, "patch", "isvc", name, "--type", "merge", "-p", '{"spec":{"routing":{"mode":"service"}}}')
    wait_for("the router objects gone", lambda: not any(router_children_of(k, name).values()), timeout=90)
    svc = wait_for("the Service selecting the serving pods", lambda: (s := k.json("service", name))
                   and s["spec"]["selector"] == {"serving.kubeinfer.io/inferenceservice": name} and s)
    assert svc
    obj = wait_for("RouterReady=True/ServiceMode", lambda: (o := k.json("isvc", name))
                   and condition(o, "RouterReady").get("reason") == "ServiceMode" and o)
    assert obj["status"]["routerSummary"] == "service"
    k.run("-n", NS, "patch", "isvc", name, "--type", "merge", "-p", '{"spec":{"routing":{"mode":"router"}}}')
    wait_for("the router objects back", lambda: all(router_children_of(k, name).values()), timeout=90)
    wait_for("RouterReady=True with the router pods", lambda: (o := k.json("isvc", name))
             and condition(o, "RouterReady").get("status") == "True"
             and condition(o, "RouterReady").get("reason") != "ServiceMode")
    after = k.json("deployment", name)
    # the serving pods never roll for a routing switch
    assert after["metadata"]["generation"] == serving_before["metadata"]["generation"]


def test_invalid_spec_beyond_the_schema_is_reported_once(operator, k):
    bad = {"apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService",
           "metadata": {"name": "overcommitted"},
           "spec": {"models": [MODEL], "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}}
    k.apply(bad)

    def invalid():
        o = k.json("isvc", "overcommitted")
        return condition(o, "Ready").get("reason") == "InvalidSpec" and o

    obj = wait_for("Ready=False/InvalidSpec", invalid)
    ready = condition(obj, "Ready")
    assert ready["status"] == "False"
    assert "requests[cpu] (2) exceeds limits[cpu] (1)" in ready["message"]
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert children_of(k, "overcommitted")["deployment"] is None

    def invalid_events():
        out = k.run("-n", NS, "get", "events", "--field-selector",
                    "involvedObject.name=overcommitted,reason=InvalidSpec", "-o", "json").stdout
        return json.loads(out)["items"]

    wait_for("an InvalidSpec event", invalid_events)
    # kopf records the handled spec in an annotation right after the handler; from then on, quiet.
    handled = wait_for("kopf's last-handled annotation", lambda: (o := k.json("isvc", "overcommitted"))
                       and "serving.kubeinfer.io/last-handled-configuration" in o["metadata"].get("annotations", {})
                       and o)
    rv = handled["metadata"]["resourceVersion"]
    time.sleep(8)  # no retry storm: nothing rewrites the object or posts more events meanwhile
    assert k.json("isvc", "overcommitted")["metadata"]["resourceVersion"] == rv
    assert len(invalid_events()) == 1
    assert operator.proc.poll() is None

    k.run("-n", NS, "patch", "isvc", "overcommitted", "--type", "merge",
          "-p", '{"spec":{"resources":{"requests":{"cpu":"1"}}}}')
    wait_for("children once the spec is fixed", lambda: children_of(k, "overcommitted")["deployment"])


def test_operator_restart_makes_no_duplicates_and_no_rollout(operator, k):
    name = first_example()["metadata"]["name"]
    wait_for("the Deployment rollout to settle", lambda: (d := k.json("deployment", name))
             and d["status"].get("observedGeneration") == d["metadata"]["generation"])
    before = children_of(k, name)
    before_router = router_children_of(k, name)
    rs_before = k.json("replicasets", "-l", f"serving.kubeinfer.io/inferenceservice={name}")["items"]
    operator.stop()
    operator.start()
    wait_for("the restarted operator to resume the isvc", lambda: f"{NS}/{name} (resume)" in operator.log())
    time.sleep(3)
    after = children_of(k, name)
    assert after["deployment"]["metadata"]["generation"] == before["deployment"]["metadata"]["generation"]
    assert after["configmap"]["metadata"]["resourceVersion"] == before["configmap"]["metadata"]["resourceVersion"]
    assert after["service"]["metadata"]["resourceVersion"] == before["service"]["metadata"]["resourceVersion"]
    rs_after = k.json("replicasets", "-l", f"serving.kubeinfer.io/inferenceservice={name}")["items"]
    assert sorted(r["metadata"]["name"] for r in rs_after) == sorted(r["metadata"]["name"] for r in rs_before)
    sel = f"serving.kubeinfer.io/inferenceservice={name}"
    for kind, count in (("deployments", 2), ("services", 2), ("configmaps", 1), ("hpa", 1), ("serviceaccounts", 1),
                        ("roles", 1), ("rolebindings", 1)):  # serving + router Deployment, Service NAME + NAME-pods
        assert len(k.json(kind, "-l", sel)["items"]) == count, kind
    for key, obj in router_children_of(k, name).items():  # the Deployment's status moves: compare its generation
        field = "generation" if key == "router" else "resourceVersion"
        assert obj["metadata"][field] == before_router[key]["metadata"][field], key


def test_deleting_the_isvc_garbage_collects_children(operator, k):
    name = first_example()["metadata"]["name"]
    k.run("-n", NS, "delete", "isvc", name, "overcommitted", "--wait=true")
    sel = "app.kubernetes.io/managed-by=kubeinfer-operator"
    wait_for("children garbage-collected", lambda: all(
        not k.json(kind, "-l", sel)["items"] for kind in ("deployments", "services", "configmaps", "hpa",
                                                          "serviceaccounts", "roles", "rolebindings")
    ), timeout=90)


def test_every_example_is_accepted_and_rendered(operator, k):
    for path in EXAMPLES:
        for doc in load_yaml_docs(path):
            if doc.get("kind") != "InferenceService":  # e.g. the credentials Secret of example 03
                continue
            name = doc["metadata"]["name"]
            k.run("-n", NS, "apply", "-f", str(path))
            kids = wait_for(f"children of {path.name}", lambda n=name: (c := children_of(k, n)) and all(c.values()) and c)
            assert kids["hpa"]["spec"]["maxReplicas"] == doc["spec"].get("scaling", {}).get("maxReplicas", 1)
            k.run("-n", NS, "delete", "isvc", name, "--wait=true")


def test_kubectl_scale_sets_fixed_replicas_and_is_refused_under_an_autoscaler(operator, k):
    # The scale subresource through the real API server: with scaling.autoscaler none, `kubectl scale`
    # writes spec.replicas and the serving Deployment follows; with an autoscaler the API server
    # refuses it with the CEL message (the autoscaler owns replicas). `kisvc` and the fully
    # qualified name reach our kind even where KServe's `isvc` would clash.
    fixed = {"apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService",
             "metadata": {"name": "fixed"},
             "spec": {"models": [{**MODEL, "servedModelName": "meta-llama/Llama-3.2-1B-Instruct", "preload": True}],
                      "scaling": {"autoscaler": "none"}, "routing": {"mode": "service"}}}
    k.apply(fixed)
    dep = wait_for("the fixed-size Deployment", lambda: k.json("deployment", "fixed"))
    assert dep["spec"]["replicas"] == 1  # spec.replicas unset: minReplicas
    assert k.json("hpa", "fixed") is None
    catalogue = yaml.safe_load(k.json("configmap", "fixed-models")["data"]["models.yaml"])
    assert [m["name"] for m in catalogue["models"]] == ["meta-llama/Llama-3.2-1B-Instruct"]

    k.run("-n", NS, "scale", "inferenceservices.serving.kubeinfer.io/fixed", "--replicas", "3")
    assert k.json("kisvc", "fixed")["spec"]["replicas"] == 3
    wait_for("the Deployment to follow kubectl scale",
             lambda: (k.json("deployment", "fixed") or {}).get("spec", {}).get("replicas") == 3)

    def scale_status():
        res = k.run("-n", NS, "get", "inferenceservices.serving.kubeinfer.io", "fixed", "--subresource", "scale",
                    "-o", "json", check=False)
        scale = json.loads(res.stdout) if res.returncode == 0 else {}
        return scale.get("status", {}).get("replicas") == 3 and scale
    scale = wait_for("the scale subresource's status", scale_status, timeout=120)
    assert scale["spec"]["replicas"] == 3
    assert scale["status"]["selector"] == "serving.kubeinfer.io/inferenceservice=fixed,app.kubernetes.io/component=serving"
    pods = k.json("pods", "-l", scale["status"]["selector"])["items"]
    assert len(pods) >= 3  # the selector the scale subresource reports finds the serving pods

    k.run("-n", NS, "scale", "kisvc/fixed", "--replicas", "0")
    wait_for("scale to zero", lambda: (k.json("deployment", "fixed") or {}).get("spec", {}).get("replicas") == 0)

    k.apply({**fixed, "metadata": {"name": "autoscaled"}, "spec": {**fixed["spec"], "scaling": {"autoscaler": "hpa"}}})
    wait_for("the autoscaled isvc's HPA", lambda: k.json("hpa", "autoscaled"))
    res = k.run("-n", NS, "scale", "kisvc/autoscaled", "--replicas", "3", check=False)
    assert res.returncode != 0
    assert "spec.replicas (kubectl scale) applies to scaling.autoscaler none only" in res.stderr
    assert "replicas" not in k.json("kisvc", "autoscaled")["spec"]
    names = k.run("-n", NS, "get", "kubeinfer", "-o", "name").stdout.split()  # the category
    assert "inferenceservice.serving.kubeinfer.io/fixed" in names
    k.run("-n", NS, "delete", "kisvc", "fixed", "autoscaled", "--wait=true")


def test_crd_directory_and_kustomization_apply_cleanly(cluster, k):
    # `kubectl apply -f deploy/crds/` must see the CRD only (the kustomize entry is named
    # "Kustomization", which kubectl skips), and `kubectl apply -k deploy/operator` still gets it.
    out = k.run("apply", "--dry-run=server", "-f", str(REPO / "deploy" / "crds")).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME} "), out
    rendered = k.run("kustomize", str(REPO / "deploy" / "operator")).stdout
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(rendered) if d)
    assert "CustomResourceDefinition" in kinds and "Deployment" in kinds, kinds
