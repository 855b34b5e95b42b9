"""The test cluster's metrics stack: Prometheus and KEDA (operator + metrics adapter) as local processes.

Built from Go modules by ``tests/metrics-stack/build.sh`` (cached like the control plane) and
wired into the test cluster (``tests/cluster_fixture.py``) the way a real cluster has them:

* Prometheus discovers pods through the API server with ``kubernetes_sd_configs`` and the job in
  ``deploy/prometheus/kubeinfer-scrape-config.yaml`` (the operator's scrape annotations), every
  2 s. One test-only rule is added: only pod IPs in ``allowed_pod_ips`` (a regex) are scraped,
  so kwok's fake pod IPs never make Prometheus send packets off the machine.
* KEDA's CRDs are installed; ``keda-operator`` and ``keda-adapter`` run with the admin
  kubeconfig and talk to each other over mutual TLS (certificates signed by the cluster CA).
* The adapter serves ``external.metrics.k8s.io`` through the aggregation layer: an APIService
  (caBundle = cluster CA) pointing at Service ``keda/keda-operator-metrics-apiserver``, whose
  hand-written Endpoints hold this machine's address (``--enable-aggregator-routing`` makes the
  API server dial endpoints, not the ClusterIP), and the RBAC that lets the HPA controller read
  external metrics (as KEDA's own manifests grant).

Use::

    @pytest.mark.metrics
    def test_x(cluster, metrics_stack):
        metrics_stack.query('kubeinfer_queue_length')
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
STACK_SRC = REPO / "tests" / "metrics-stack"
SCRAPE_JOB = REPO / "deploy" / "prometheus" / "kubeinfer-scrape-config.yaml"
LOG_ARTIFACTS = REPO / "tests" / ".artifacts" / "metrics-stack-logs"
KEDA_NS = "keda"
ADAPTER_SERVICE = "keda-operator-metrics-apiserver"
EXTERNAL_METRICS_APISERVICE = "v1beta1.external.metrics.k8s.io"


class MetricsStackError(RuntimeError):
    """The metrics stack could not be built or started; the message has the output or log tail."""


def build_metrics_bin() -> Path:
    """Build (or reuse from ``$KUBEINFER_CACHE``) prometheus, promtool, keda-operator and
    keda-adapter; return the directory (``.cache/metrics-bin``).

    Raises:
        MetricsStackError: the build failed (the message has its output).
    """
    result = subprocess.run([str(STACK_SRC / "build.sh")], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise MetricsStackError(f"tests/metrics-stack/build.sh failed:\n{result.stderr[-8000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def host_ip() -> str:
    """This machine's own IPv4 address on its default-route interface (``$KUBEINFER_HOST_IP``
    overrides), reachable from the API server and from pods; never a loopback address (the API
    server refuses loopback endpoints)."""
    if os.environ.get("KUBEINFER_HOST_IP"):
        return os.environ["KUBEINFER_HOST_IP"]
    dev = subprocess.run(["ip", "-4", "-o", "route", "show", "default"], capture_output=True, text=True).stdout.split()
    args = ["ip", "-4", "-o", "addr", "show"] + (["dev", dev[dev.index("dev") + 1]] if "dev" in dev else ["scope", "global"])
    for line in subprocess.run(args, capture_output=True, text=True).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            address = parts[parts.index("inet") + 1].split("/")[0]
            if not address.startswith("127."):
                return address
    raise MetricsStackError("no non-loopback IPv4 address found (set KUBEINFER_HOST_IP)")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free on ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _issue_cert(pki: Path, out: Path, name: str, cn: str, sans: str, usage: str) -> None:
    """A certificate ``out/name.crt`` + key signed by the cluster CA in ``pki``."""
    key, csr, crt, ext = (out / f"{name}.key", out / f"{name}.csr", out / f"{name}.crt", out / f"{name}.ext")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(csr))
    ext.write_text(f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   f"extendedKeyUsage={usage}\nsubjectAltName={sans}\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
             "-CAcreateserial", "-days", "30", "-extfile", str(ext), "-out", str(crt))
    key.chmod(0o600)


@dataclass
class MetricsStack:
    """A running Prometheus + KEDA wired into a test cluster.

    Attributes:
        prometheus_url: Prometheus' HTTP API base URL (loopback); what ScaledObjects query.
        bin_dir: the directory with prometheus, promtool, keda-operator, keda-adapter, keda-crds/.
        state_dir: config, TSDB, certificates and ``logs/<component>.log``.
        host_ip: the machine address the adapter listens on (its APIService endpoint).
    """

    prometheus_url: str
    bin_dir: Path
    state_dir: Path
    host_ip: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query result vector (``[{"metric": {...}, "value": [ts, "v"]}, ...]``).

        Raises:
            urllib.error.URLError: Prometheus did not answer.
        """
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)["data"]["result"]

    def targets(self) -> list[dict[str, Any]]:
        """Prometheus' active scrape targets (``/api/v1/targets``)."""
        with urllib.request.urlopen(f"{self.prometheus_url}/api/v1/targets?state=active", timeout=10) as r:
            return json.load(r)["data"]["activeTargets"]

    def log(self, component: str) -> str:
        """The log of ``prometheus``, ``keda-operator`` or ``keda-adapter``."""
        path = self.state_dir / "logs" / f"{component}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop every process (SIGTERM, SIGKILL after 10 s), in reverse start order."""
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            self.procs.pop(name, None)


def _start(stack: MetricsStack, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
    log = (stack.state_dir / "logs" / f"{name}.log").open("w")
    stack.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})}, start_new_session=True)


def _wait(stack: MetricsStack, what: str, probe, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for name, proc in stack.procs.items():
            if proc.poll() is not None:
                raise MetricsStackError(f"{name} exited ({proc.returncode}) waiting for {what}:\n"
                                        f"{stack.log(name)[-4000:]}")
        try:
            last = probe()
            if last:
                return last
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.5)
    logs = "\n".join(f"--- {n} ---\n{stack.log(n)[-3000:]}" for n in stack.procs)
    raise MetricsStackError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})\n{logs}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def prometheus_config(kubeconfig: Path, allowed_pod_ips: str, interval: str = "2s") -> dict[str, Any]:
    """Prometheus' configuration: the shipped kubernetes-pods job, API credentials from
    ``kubeconfig``, and the test-only keep rule on ``allowed_pod_ips`` (a regex)."""
    jobs = yaml.safe_load(SCRAPE_JOB.read_text())
    for job in jobs:
        for sd in job["kubernetes_sd_configs"]:
            sd["kubeconfig_file"] = str(kubeconfig)
        job["relabel_configs"].insert(0, {"source_labels": ["__meta_kubernetes_pod_ip"], "action": "keep",
                                          "regex": allowed_pod_ips})
    return {"global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": jobs}


def start_metrics_stack(
    cluster: Any, state_dir: Path, allowed_pod_ips: str | None = None, with_keda: bool = True,
    address: str | None = None,
) -> MetricsStack:
    """Build if needed, then start Prometheus and KEDA against ``cluster`` (a
    ``tests.cluster_fixture.Cluster``) and wait until the external metrics API is Available.

    Args:
        allowed_pod_ips: regex of pod IPs Prometheus may scrape (default: this machine's address
            and the real node's pod range 10.244.0.0/16).
        with_keda: False starts Prometheus only.
        address: the address KEDA's adapter listens on for the API server (its APIService
            endpoint); default :func:`host_ip`. With the real node: the bridge's gateway, where
            the API server itself is advertised.

    Raises:
        MetricsStackError: a build or start-up failure (logs in ``state_dir/logs``).
    """
    bin_dir = build_metrics_bin()
    ip = address or host_ip()
    allowed = allowed_pod_ips or rf"{ip.replace('.', '[.]')}|10[.]244[.][0-9]+[.][0-9]+"
    for sub in ("logs", "certs", "serving-cert", "tsdb"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    prom_port, op_metrics, op_probe, grpc_port, adapter_port, adapter_metrics = (
        free_port(), free_port(), free_port(), free_port(), free_port(ip), free_port())
    stack = MetricsStack(f"http://127.0.0.1:{prom_port}", bin_dir, state_dir, ip)
    kubeconfig = Path(cluster.kubeconfig)
    pki = Path(cluster.state_dir) / "pki"
    try:
        # --- Prometheus ---
        config = state_dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(kubeconfig, allowed)))
        _start(stack, "prometheus", [str(bin_dir / "prometheus"), f"--config.file={config}",
                                     f"--storage.tsdb.path={state_dir / 'tsdb'}",
                                     f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=info"])
        _wait(stack, "Prometheus /-/ready", lambda: _http_ok(f"{stack.prometheus_url}/-/ready"))
        if not with_keda:
            return stack

        # --- KEDA: CRDs, namespace, certificates, RBAC for the HPA controller ---
        certs = state_dir / "certs"
        shutil.copy(pki / "ca.crt", certs / "ca.crt")
        _issue_cert(pki, certs, "tls", "keda-operator", "IP:127.0.0.1,DNS:localhost", "serverAuth,clientAuth")
        serving = state_dir / "serving-cert"
        _issue_cert(pki, serving, "apiserver", ADAPTER_SERVICE,
                    f"DNS:{ADAPTER_SERVICE}.{KEDA_NS}.svc,DNS:{ADAPTER_SERVICE}.{KEDA_NS}.svc.cluster.local,IP:{ip}",
                    "serverAuth")
        cluster.kubectl("apply", "--server-side", "-f", str(bin_dir / "keda-crds"))
        ca_bundle = base64.b64encode((pki / "ca.crt").read_bytes()).decode()
        cluster.kubectl("apply", "-f", "-", input=_keda_objects(ip, adapter_port, ca_bundle))
        env = {"KUBECONFIG": str(kubeconfig), "WATCH_NAMESPACE": "", "KEDA_CLUSTER_OBJECT_NAMESPACE": KEDA_NS,
               "POD_NAMESPACE": KEDA_NS, "POD_NAME": "keda-operator-local", "KEDA_HTTP_DEFAULT_TIMEOUT": "3000"}
        _start(stack, "keda-operator", [
            str(bin_dir / "keda-operator"), "--leader-elect=false", "--zap-log-level=info",
            f"--metrics-bind-address=127.0.0.1:{op_metrics}", f"--health-probe-bind-address=127.0.0.1:{op_probe}",
            f"--metrics-service-bind-address=127.0.0.1:{grpc_port}", f"--cert-dir={certs}",
            "--enable-cert-rotation=false", "--enable-webhook-patching=false", "--enable-apiservice-patching=false",
        ], env)
        _start(stack, "keda-adapter", [
            str(bin_dir / "keda-adapter"), f"--secure-port={adapter_port}", f"--bind-address={ip}",
            f"--cert-dir={certs}", f"--tls-cert-file={serving / 'apiserver.crt'}",
            f"--tls-private-key-file={serving / 'apiserver.key'}",
            f"--metrics-service-address=127.0.0.1:{grpc_port}", f"--port={adapter_metrics}",
            f"--lister-kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}", "--zap-log-level=info",
        ], env)
        _wait(stack, "keda-operator /readyz", lambda: _http_ok(f"http://127.0.0.1:{op_probe}/readyz"))

        def available() -> bool:
            out = cluster.kubectl("get", "apiservice", EXTERNAL_METRICS_APISERVICE, "-o", "json", check=False)
            if out.returncode != 0:
                return False
            conds = {c["type"]: c for c in json.loads(out.stdout)["status"].get("conditions", [])}
            return conds.get("Available", {}).get("status") == "True"

        _wait(stack, f"APIService {EXTERNAL_METRICS_APISERVICE} Available", available, timeout=120)
    except BaseException:
        save_logs(stack)
        stack.stop()
        raise
    return stack


def _keda_objects(ip: str, port: int, ca_bundle: str) -> str:
    """Namespace, adapter Service + Endpoints, APIService and HPA-controller RBAC (YAML)."""
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KEDA_NS}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": ADAPTER_SERVICE, "namespace": KEDA_NS},
         "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port, "protocol": "TCP"}]}},
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": ADAPTER_SERVICE, "namespace": KEDA_NS},
         "subsets": [{"addresses": [{"ip": ip}], "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}]},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
         "metadata": {"name": EXTERNAL_METRICS_APISERVICE},
         "spec": {"group": "external.metrics.k8s.io", "version": "v1beta1", "caBundle": ca_bundle,
                  "service": {"name": ADAPTER_SERVICE, "namespace": KEDA_NS, "port": 443},
                  "groupPriorityMinimum": 100, "versionPriority": 100}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "keda-external-metrics-reader"},
         "rules": [{"apiGroups": ["external.metrics.k8s.io"], "resources": ["*"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "keda-hpa-controller-external-metrics"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "keda-external-metrics-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "horizontal-pod-autoscaler", "namespace": "kube-system"}]},
    ]
    return yaml.safe_dump_all(docs)


def save_logs(stack: MetricsStack, dest: Path = LOG_ARTIFACTS) -> Path:
    """Copy the component logs into ``dest`` (tests/.artifacts/metrics-stack-logs)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    for log in (stack.state_dir / "logs").glob("*.log"):
        shutil.copy2(log, dest / log.name)
    return dest


@pytest.fixture(scope="session")
def metrics_stack(cluster: Any, request: pytest.FixtureRequest) -> Iterator[MetricsStack]:
    """Prometheus + KEDA on the session's cluster, started on first use, stopped at the end;
    logs saved to tests/.artifacts/metrics-stack-logs when a test failed."""
    state_dir = Path(tempfile.mkdtemp(prefix="kubeinfer-metrics-"))
    stack = start_metrics_stack(cluster, state_dir)
    try:
        yield stack
    finally:
        if request.session.testsfailed:
            save_logs(stack)
        stack.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
