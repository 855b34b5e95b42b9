"""What a user does, in order, on the real node: the README's "Install on a cluster" section.

1. ``helm install`` of the chart with the built operator image: the operator runs as a real pod
   under the chart's ServiceAccount and RBAC.
2. ``kubectl apply -f deploy/examples/01-tiny-chat.yaml``: the serving pod runs the built serving
   image with the security context the operator renders (non-root, read-only root filesystem)
   and its startup, readiness and liveness probes pass.
3. The official ``openai`` client reaches the isvc through its Service's ClusterIP and the fleet
   router (two pods of the operator image, ``routing.mode: router`` being the default): models, a
   completion, a streamed chat completion; ``kubectl get isvc`` shows READY True, REPLICAS 1/1,
   ROUTER 2/2.
4. Deleting the serving pod while requests stream: they complete (preStop pause, then SIGTERM and
   uvicorn's drain), and the Deployment's new pod serves. SIGTERM to the serving process while
   streams run: they complete (drain), the kubelet restarts the container and it serves again.
5. A spec change rolls the pod and the new pod serves.
6. ``kubectl delete isvc`` removes its pods; example 03 fetches its model from S3 (S3Proxy on the
   bridge) into the disk tier and answers; ``helm uninstall`` leaves no operator objects (the CRD
   stays, as Helm documents for crds/).

The tests of this module run in file order and share one installation (module fixture); the
helm/kubectl commands of steps 1-2 are taken verbatim from README.md.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest
import yaml
from kubeinfer_operator.config import SERVING_UID
from kubeinfer_serving.models.builtin import builtin_embedding_model_dir
from openai import OpenAI
from sentence_transformers import SentenceTransformer

from tests.cluster_fixture import REPO
from tests.e2e.conftest import OPERATOR_IMAGE, SERVING_IMAGE, E2ECluster, wait_until
from tests.remote_stores import S3Server

pytestmark = pytest.mark.timeout(900)

ISVC = "tiny-chat"
RELEASE_NS = "kubeinfer-system"
#: Every object and pod of the isvc (serving and router).
ISVC_SELECTOR = f"serving.kubeinfer.io/inferenceservice={ISVC}"
SERVING_SELECTOR = f"{ISVC_SELECTOR},app.kubernetes.io/component=serving"
ROUTER_SELECTOR = f"{ISVC_SELECTOR},app.kubernetes.io/component=router"
OPERATOR_SELECTOR = "app.kubernetes.io/instance=kubeinfer,app.kubernetes.io/name=kubeinfer-operator"


def readme_install_commands() -> list[str]:
    """The shell commands of README.md's "Install on a cluster" section, in order.

    Lines of its ```bash blocks with continuation backslashes joined and comments dropped.
    """
    text = (REPO / "README.md").read_text()
    section = text.split("## Install on a cluster", 1)[1].split("\n## ", 1)[0]
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


@dataclass
class State:
    """What earlier steps learned, for later ones (tests of this module run in order)."""

    timings: dict[str, float] = field(default_factory=dict)
    serving_pod: str = ""


@pytest.fixture(scope="module")
def e2e(e2e_cluster: E2ECluster) -> E2ECluster:
    return e2e_cluster


@pytest.fixture(scope="module")
def state() -> State:
    return State()


def run_readme_command(e2e: E2ECluster, command: str) -> str:
    """Run one README command (``helm ...`` or ``kubectl ...``) with the cluster's binaries; return stdout."""
    argv = shlex.split(command)
    tool, args = argv[0], argv[1:]
    if tool == "helm":
        return e2e.helm(*args, timeout=600).stdout
    if tool == "kubectl":
        return e2e.kubectl(*args, timeout=900).stdout
    raise AssertionError(f"README command not run by the e2e test: {command}")


def serving_pods(e2e: E2ECluster) -> list[dict]:
    """The isvc's pods that are not terminating."""
    pods = e2e.get("pods", "-n", "default", "-l", SERVING_SELECTOR)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def ready(pod: dict) -> bool:
    conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return conditions.get("Ready") == "True"


def client(e2e: E2ECluster) -> OpenAI:
    """An ``openai`` client on the isvc's Service ClusterIP (port 80)."""
    ip = e2e.get("service", ISVC, "-n", "default")["spec"]["clusterIP"]
    return OpenAI(base_url=f"http://{ip}/v1", api_key="unused", timeout=120, max_retries=0)


def one_ready_serving_pod(e2e: E2ECluster, exclude: str = "") -> dict:
    """Wait until exactly one non-terminating serving pod exists, other than ``exclude``, and it is Ready."""
    def check():
        pods = [p for p in serving_pods(e2e) if p["metadata"]["name"] != exclude]
        return pods[0] if len(pods) == 1 and ready(pods[0]) and len(serving_pods(e2e)) == 1 else None
    return wait_until("one Ready serving pod", check, timeout=600)


def test_readme_section_is_what_this_test_runs():
    commands = readme_install_commands()
    helm = [c for c in commands if c.startswith("helm install")]
    assert helm and f"image.repository={OPERATOR_IMAGE.rsplit(':', 1)[0]}" in helm[0]
    assert f"servingImage={SERVING_IMAGE}" in helm[0]
    assert "kubectl apply -f deploy/examples/01-tiny-chat.yaml" in commands


def test_helm_install_runs_the_operator_as_a_pod(e2e: E2ECluster, state: State):
    start = time.monotonic()
    for command in readme_install_commands():
        if command.startswith("helm install"):
            run_readme_command(e2e, command)
    pods = e2e.get("pods", "-n", RELEASE_NS, "-l", OPERATOR_SELECTOR)["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    pod = pods[0]
    assert ready(pod), pod["status"]
    assert pod["spec"]["nodeName"] == e2e.node
    assert pod["spec"]["serviceAccountName"] == "kubeinfer-operator"
    assert pod["spec"]["containers"][0]["image"] == OPERATOR_IMAGE
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    state.timings["helm install --wait (s)"] = time.monotonic() - start


def test_example_becomes_ready_on_the_real_node(e2e: E2ECluster, state: State):
    start = time.monotonic()
    for command in readme_install_commands():
        if command.startswith("kubectl "):
            print(f"$ {command}\n{run_readme_command(e2e, command)}")
    state.timings["apply to isvc Ready (s)"] = time.monotonic() - start
    pod = one_ready_serving_pod(e2e)
    state.serving_pod = pod["metadata"]["name"]
    spec = pod["spec"]
    container = spec["containers"][0]
    assert spec["nodeName"] == e2e.node
    assert container["image"] == SERVING_IMAGE
    assert spec["securityContext"]["runAsUser"] == SERVING_UID
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["runAsNonRoot"] is True
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= container.keys()
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0, status
    started = pod["status"]["startTime"]
    assert started

    table = e2e.kubectl("get", "isvc", ISVC, "-n", "default").stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    columns = dict(zip(header, row, strict=False))
    assert columns["READY"] == "True", table
    assert columns["REPLICAS"] == "1/1", table
    assert columns["ROUTER"] == "2/2", table
    assert "MODELS" in header, table
    routers = e2e.get("pods", "-n", "default", "-l", ROUTER_SELECTOR)["items"]
    assert len(routers) == 2 and all(ready(p) for p in routers), [p["metadata"]["name"] for p in routers]
    assert {p["spec"]["containers"][0]["image"] for p in routers} == {OPERATOR_IMAGE}
    assert all(p["spec"]["nodeName"] == e2e.node for p in routers)
    # status.models comes from the operator pod polling the serving pod's /v1/models (pod to pod)
    wait_until("status.models: the model loaded on the one ready pod", lambda: e2e.get(
        "isvc", ISVC, "-n", "default")["status"].get("modelSummary") == "tiny-llama 1/1", timeout=90, interval=2)


def test_openai_client_through_the_service(e2e: E2ECluster, state: State):
    api = client(e2e)
    assert "tiny-llama" in [m.id for m in api.models.list()]

    raw = api.completions.with_raw_response.create(model="tiny-llama", prompt="The river ran", max_tokens=8,
                                                   temperature=0)
    done = raw.parse()
    assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
    # the router answered: it names the serving pod and its decision
    assert raw.headers["x-kubeinfer-endpoint"] == state.serving_pod, dict(raw.headers)
    assert raw.headers["x-kubeinfer-route"] in ("hash", "only", "cold_hash", "cold_memory")

    start = time.monotonic()
    stream = api.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Tell me about the river."}],
        max_tokens=64, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    elapsed = time.monotonic() - start
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 64
    state.timings["64-token chat stream (s)"] = elapsed


def stream_in_background(api: OpenAI, streams: int, max_tokens: int) -> tuple[list[threading.Thread], list[dict]]:
    """Start ``streams`` streamed completions of ``max_tokens`` tokens (``ignore_eos``) in threads.

    Each result dict gets ``first`` (monotonic time of the first chunk), ``chunks`` and ``end``,
    or ``error``.
    """
    results: list[dict] = [{} for _ in range(streams)]

    def run(result: dict) -> None:
        try:
            stream = api.completions.create(model="tiny-llama", prompt="Once", max_tokens=max_tokens, stream=True,
                                            temperature=0, extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True})
            chunks = []
            for chunk in stream:
                chunks.append(chunk)
                result.setdefault("first", time.monotonic())
            result["chunks"] = chunks
        except Exception as exc:  # noqa: BLE001 - reported by check_streams
            result["error"] = exc
        result["end"] = time.monotonic()

    workers = [threading.Thread(target=run, args=(r,)) for r in results]
    for w in workers:
        w.start()
    wait_until("the first chunk of every stream", lambda: all("first" in r or "error" in r for r in results),
               timeout=120, interval=0.1)
    return workers, results


def check_streams(workers: list[threading.Thread], results: list[dict], max_tokens: int) -> float:
    """Join the threads; assert every stream ended normally with all its tokens; return the last end time."""
    for w in workers:
        w.join(timeout=600)
    errors = [r.get("error") for r in results if "chunks" not in r]
    assert not errors, errors
    for r in results:
        assert r["chunks"][-1].usage.completion_tokens == max_tokens
        assert [c.choices[0].finish_reason for c in r["chunks"] if c.choices][-1] == "length"
    return max(r["end"] for r in results)


def test_deleting_a_pod_keeps_its_streams_and_a_new_pod_serves(e2e: E2ECluster, state: State):
    api = client(e2e)
    old = state.serving_pod
    workers, results = stream_in_background(api, streams=4, max_tokens=1500)
    deleted_at = time.monotonic()
    e2e.kubectl("delete", "pod", old, "-n", "default", "--wait=false")
    # Endpoint removal, the preStop pause, then SIGTERM and uvicorn's drain: every stream ends whole.
    state.timings["streams finished after the delete (s)"] = check_streams(workers, results, 1500) - deleted_at

    start = time.monotonic()
    new = one_ready_serving_pod(e2e, exclude=old)
    state.timings["replacement pod Ready (s)"] = time.monotonic() - start
    state.serving_pod = new["metadata"]["name"]
    done = api.completions.create(model="tiny-llama", prompt="Again", max_tokens=4, temperature=0)
    assert done.usage.completion_tokens == 4


def test_sigterm_drains_in_flight_streams(e2e: E2ECluster, state: State):
    # SIGTERM straight to the serving process of the real pod while streams run (deterministic,
    # whatever the machine's speed, unlike waiting out the preStop pause): uvicorn stops accepting,
    # waits for the open streams, they end whole, and the kubelet restarts the container.
    api = client(e2e)
    pod = e2e.get("pod", state.serving_pod, "-n", "default")
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    ctr = ["ctr", "--address", str(e2e.cluster.state_dir / "node" / "containerd" / "containerd.sock"), "-n", "k8s.io"]
    tasks = subprocess.run([*ctr, "tasks", "ls"], capture_output=True, text=True, check=True).stdout
    (pid,) = [line.split()[1] for line in tasks.splitlines() if line.startswith(container_id)]
    workers, results = stream_in_background(api, streams=2, max_tokens=1000)
    os.kill(int(pid), signal.SIGTERM)
    check_streams(workers, results, 1000)
    log = e2e.container_log("default", state.serving_pod, "serving")
    assert "Shutting down" in log and "Waiting for connections to close" in log, log[-3000:]
    assert "timeout graceful shutdown exceeded" not in log
    restarted = wait_until(
        "the container restarted and Ready",
        lambda: (p := e2e.get("pod", state.serving_pod, "-n", "default"))["status"]["containerStatuses"][0]["restartCount"] == 1
        and ready(p) and p, timeout=300)
    assert restarted
    done = api.completions.create(model="tiny-llama", prompt="Back", max_tokens=4, temperature=0)
    assert done.usage.completion_tokens == 4


def test_spec_change_rolls_the_pod(e2e: E2ECluster, state: State):
    before = state.serving_pod
    start = time.monotonic()
    e2e.kubectl("patch", "isvc", ISVC, "-n", "default", "--type", "merge", "-p",
                '{"spec": {"runtime": {"maxNumSeqs": 16}}}')
    catalogue = wait_until(
        "the catalogue to change",
        lambda: "maxNumSeqs: 16" in (text := e2e.get("configmap", f"{ISVC}-models", "-n", "default")["data"]["models.yaml"]) and text,
        timeout=60)
    assert "maxNumSeqs: 16" in catalogue
    new = wait_until(
        "a new Ready pod and the old one gone",
        lambda: (pods := serving_pods(e2e)) and len(pods) == 1 and pods[0]["metadata"]["name"] != before
        and ready(pods[0]) and pods[0],
        timeout=600)
    state.timings["spec change to new pod Ready (s)"] = time.monotonic() - start
    state.serving_pod = new["metadata"]["name"]
    isvc = wait_until(
        "isvc Ready for the new generation",
        lambda: (o := e2e.get("isvc", ISVC, "-n", "default"))["status"].get("observedGeneration") == o["metadata"]["generation"]
        and any(c["type"] == "Ready" and c["status"] == "True" for c in o["status"]["conditions"]) and o,
        timeout=120)
    assert isvc
    done = client(e2e).completions.create(model="tiny-llama", prompt="New pod", max_tokens=4, temperature=0)
    assert done.usage.completion_tokens == 4


def test_delete_isvc_removes_its_pods(e2e: E2ECluster):
    e2e.kubectl("delete", "isvc", ISVC, "-n", "default", "--wait=true", timeout=300)
    wait_until("serving and router pods gone",
                lambda: not e2e.get("pods", "-n", "default", "-l", ISVC_SELECTOR)["items"], timeout=300)
    for kind in ("deployment", "service", "configmap", "hpa", "serviceaccount", "role", "rolebinding"):
        left = e2e.get(kind, "-n", "default", "-l", ISVC_SELECTOR)["items"]
        assert not left, (kind, [o["metadata"]["name"] for o in left])


def test_s3_example_fetches_its_model_and_answers(e2e: E2ECluster, state: State, tmp_path):
    """deploy/examples/03-s3-embeddings.yaml: the model comes from S3 at load time into the pod's disk tier.

    The store is S3Proxy on this machine, listening on the node bridge's gateway address, behind a
    selector-less Service ``model-store`` in ``kubeinfer-system`` (what the example's Secret names).
    The test cluster has no cluster DNS, so the only change to the example is the Secret's
    endpoint: the Service's ClusterIP instead of its DNS name.
    """
    docs = list(yaml.safe_load_all((REPO / "deploy" / "examples" / "03-s3-embeddings.yaml").read_text()))
    secret = next(d for d in docs if d["kind"] == "Secret")
    isvc = next(d for d in docs if d["kind"] == "InferenceService")
    gateway = e2e.get("endpoints", "kubernetes", "-n", "default")["subsets"][0]["addresses"][0]["ip"]
    store = S3Server(tmp_path / "s3", host=gateway, access_key=secret["stringData"]["AWS_ACCESS_KEY_ID"],
                     secret_key=secret["stringData"]["AWS_SECRET_ACCESS_KEY"]).start()
    try:
        bucket, prefix = isvc["spec"]["models"][0]["source"].removeprefix("s3://").split("/", 1)
        uploaded = store.upload_dir(bucket, prefix, builtin_embedding_model_dir())
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "model-store", "namespace": RELEASE_NS},
                   "spec": {"ports": [{"name": "http", "port": 80, "targetPort": store.port}]}}
        endpoints = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "model-store", "namespace": RELEASE_NS},
                     "subsets": [{"addresses": [{"ip": gateway}], "ports": [{"name": "http", "port": store.port}]}]}
        e2e.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([service, endpoints]))
        ip = e2e.get("service", "model-store", "-n", RELEASE_NS)["spec"]["clusterIP"]
        secret["stringData"]["AWS_ENDPOINT_URL"] = f"http://{ip}"
        start = time.monotonic()
        e2e.kubectl("apply", "-n", "default", "-f", "-", input=yaml.safe_dump_all([secret, isvc]))
        e2e.kubectl("wait", "--for=condition=Ready", "isvc/embeddings", "-n", "default", "--timeout=600s", timeout=620)
        state.timings["s3 example apply to Ready (s)"] = time.monotonic() - start

        svc_ip = e2e.get("service", "embeddings", "-n", "default")["spec"]["clusterIP"]
        api = OpenAI(base_url=f"http://{svc_ip}/v1", api_key="unused", timeout=120, max_retries=0)
        model = api.models.retrieve("all-minilm-l6-v2")
        assert model.model_extra.get("state") == "loaded" and model.model_extra.get("revision"), model
        texts = ["a cat sat on the mat", "stock prices fell sharply"]
        got = [d.embedding for d in api.embeddings.create(model="all-minilm-l6-v2", input=texts).data]
        want = SentenceTransformer(str(builtin_embedding_model_dir()), device="cpu").encode(texts)
        for g, w in zip(got, want, strict=True):
            cosine = sum(a * b for a, b in zip(g, w, strict=True)) / (
                sum(a * a for a in g) ** 0.5 * sum(b * b for b in w) ** 0.5)
            assert cosine > 0.9999, cosine
        assert uploaded > 0
        e2e.kubectl("delete", "isvc", "embeddings", "-n", "default", "--wait=true", timeout=300)
        e2e.kubectl("delete", "secret", secret["metadata"]["name"], "-n", "default")
        e2e.kubectl("delete", "service,endpoints", "model-store", "-n", RELEASE_NS, "--ignore-not-found")
    finally:
        store.stop()


def test_helm_uninstall_leaves_no_operator_objects(e2e: E2ECluster, state: State):
    e2e.helm("uninstall", "kubeinfer", "--namespace", RELEASE_NS, "--wait", timeout=300)
    wait_until("operator pods gone",
                lambda: not e2e.get("pods", "-n", RELEASE_NS, "-l", OPERATOR_SELECTOR)["items"], timeout=120)
    for kind, scope in (("deployment", ["-n", RELEASE_NS]), ("serviceaccount", ["-n", RELEASE_NS]),
                        ("clusterrole", []), ("clusterrolebinding", []), ("configmap", ["-n", RELEASE_NS])):
        left = e2e.get(kind, *scope, "-l", "app.kubernetes.io/instance=kubeinfer")["items"]
        assert not left, (kind, [o["metadata"]["name"] for o in left])
    # Helm never deletes what it installed from crds/: the CRD and so users' isvcs stay.
    e2e.kubectl("get", "crd", "inferenceservices.serving.kubeinfer.io")
    print("e2e timings:", {k: round(v, 1) for k, v in state.timings.items()})
