"""How many API requests the operator makes, counted in the test API server's audit log.

The control plane (tests/cluster/up.sh) writes a Metadata-level audit log; every request of the
operator's ServiceAccount is one line. Watches are long-running and excluded: the counts are
the reads and writes a reconcile causes. Measured: one isvc created until it is Ready and the
operator is quiet, and one reconcile of an unchanged isvc (an annotation edit, which kopf
delivers as an update). The numbers are written to tests/.artifacts/operator-api-requests.txt.
"""

from __future__ import annotations

import collections
import json
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.operator import test_operator_cluster as toc
from tests.operator.conftest import CRD_PATH, REPO

pytestmark = pytest.mark.cluster

NS = "kubeinfer-api-count"
OPERATOR_USER = "system:serviceaccount:kubeinfer-system:kubeinfer-operator"
REPORT = REPO / "tests" / ".artifacts" / "operator-api-requests.txt"
#: Upper bounds this test holds the operator to (before the watch-driven reconcile: ~60 for a
#: create, ~12 for one reconcile). Router mode (the default) adds five children (headless Service,
#: ServiceAccount, Role, RoleBinding, router Deployment) and the router pods' progress in status:
#: measured 28 for a create (16 before the router).
MAX_PER_CREATE = 32
MAX_PER_RECONCILE = 3


def operator_requests(audit: Path, since: float) -> list[dict]:
    """Completed non-watch requests of the operator's ServiceAccount received after ``since`` (epoch s)."""
    out = []
    for line in audit.read_text().splitlines():
        event = json.loads(line)
        if event.get("stage") != "ResponseComplete" or event.get("verb") == "watch":
            continue
        if event["user"]["username"] != OPERATOR_USER:
            continue
        received = event["requestReceivedTimestamp"]
        ts = time.mktime(time.strptime(received[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        ts += float("0." + received[20:-1]) if "." in received else 0.0
        if ts >= since:
            out.append(event)
    return out


def describe(events: list[dict]) -> str:
    counts = collections.Counter(
        f"{e['verb']} {(e.get('objectRef') or {}).get('resource', e['requestURI'])}"
        + (f"/{e['objectRef']['subresource']}" if (e.get("objectRef") or {}).get("subresource") else "")
        for e in events)
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def wait_quiet(audit: Path, since: float, quiet: float = 4.0, timeout: float = 60.0) -> list[dict]:
    """Wait until the operator made no request for ``quiet`` seconds; its requests since ``since``."""
    deadline = time.monotonic() + timeout
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        events = operator_requests(audit, since)
        if len(events) != last_count:
            last_count, last_change = len(events), time.monotonic()
        elif time.monotonic() - last_change >= quiet:
            return events
        time.sleep(0.5)
    pytest.fail("the operator never went quiet")


@pytest.fixture(scope="module")
def operator(cluster):
    cluster.kubectl("apply", "--server-side", "-f", str(CRD_PATH))
    cluster.kubectl("wait", "--for", "condition=Established", f"crd/{toc.CRD_NAME}", "--timeout=60s")
    cluster.kubectl("apply", "-f", str(REPO / "deploy" / "operator" / "namespace.yaml"),
                    "-f", str(REPO / "deploy" / "operator" / "rbac.yaml"))
    cluster.kubectl("create", "namespace", NS, check=False)
    token = cluster.kubectl("-n", "kubeinfer-system", "create", "token", "kubeinfer-operator",
                            "--duration=1h").stdout.strip()
    workdir = Path(tempfile.mkdtemp(prefix="kubeinfer-operator-count-"))
    cfg = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    cfg["users"] = [{"name": "op", "user": {"token": token}}]
    for ctx in cfg["contexts"]:
        ctx["context"]["user"] = "op"
    (workdir / "kubeconfig").write_text(yaml.safe_dump(cfg))
    op = toc.Operator(workdir / "kubeconfig", workdir, namespace=NS)
    op.start()
    try:
        yield op
    finally:
        op.stop()


def test_api_requests_per_create_and_per_reconcile(cluster, operator):
    audit = Path(cluster.state_dir) / "audit.log"
    time.sleep(3)  # the operator's start-up requests are done
    isvc = {"apiVersion": "serving.kubeinfer.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "counted", "namespace": NS},
            "spec": {"models": [{"name": "tiny", "source": "file:///opt/kubeinfer/models/tiny-llama",
                                 "preload": True}]}}
    t0 = time.time()
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(isvc))
    toc.wait_for("the isvc Ready", lambda: toc.condition(json.loads(cluster.kubectl(
        "-n", NS, "get", "isvc", "counted", "-o", "json").stdout), "Ready").get("status") == "True", timeout=90)
    create = wait_quiet(audit, t0)

    t1 = time.time()
    cluster.kubectl("-n", NS, "annotate", "isvc", "counted", "example.com/touched=1")
    reconcile = wait_quiet(audit, t1)
    reconciled = [line for line in operator.log().splitlines() if f"{NS}/counted (update)" in line]
    assert reconciled, operator.log()[-2000:]  # the annotation edit did run a reconcile

    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(
        f"create (until Ready and quiet): {len(create)} requests: {describe(create)}\n"
        f"one reconcile of an unchanged isvc: {len(reconcile)} requests: {describe(reconcile)}\n")
    print(REPORT.read_text())
    assert len(create) <= MAX_PER_CREATE, describe(create)
    assert len(reconcile) <= MAX_PER_RECONCILE, describe(reconcile)
    cluster.kubectl("-n", NS, "delete", "isvc", "counted", "--wait=true")
