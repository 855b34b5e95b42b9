"""The e2e tier: the product as a user runs it, on the test control plane plus a real node.

``e2e_cluster`` (session) starts a control plane with ``real-node-0`` (``tests/cluster/up.sh
--real-node``: containerd + kubelet + kube-proxy, pods on bridge ``kubeinfer0``) and loads the
images ``make images`` built into the node. Tests then do what the README's "Install on a
cluster" section says: ``helm install`` the chart, ``kubectl apply`` an example, call the
Service's ClusterIP with the official ``openai`` client (kube-proxy's iptables rules make
ClusterIPs answer from this machine; the Service CIDR is routed to our bridge).

Needs root (containerd, kubelet, bridge, iptables) and Docker with the images built; ``make test``
builds them before pytest. Container logs are read from the kubelet's ``podLogsDir``
(``state_dir/node/pod-logs``): nobody may call the kubelet's API, so ``kubectl logs`` is not used.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

from tests.cluster_fixture import REPO, Cluster, ClusterError, save_logs, start_cluster, stop_cluster

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
#: What `make images` tags by default (mk/images.mk REGISTRY).
REGISTRY = "kubeinfer.local"
SERVING_IMAGE = f"{REGISTRY}/kubeinfer-serving:{VERSION}"
OPERATOR_IMAGE = f"{REGISTRY}/kubeinfer-operator:{VERSION}"
NODE_NAME = "real-node-0"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/e2e is marked ``e2e`` (select or deselect the tier with ``-m``)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@dataclass(frozen=True)
class E2ECluster:
    """The control plane plus the real node.

    Attributes:
        cluster: the control plane (``kubectl``, ``helm``, kubeconfig, ``state_dir``).
        node: name of the real node (``real-node-0``).
    """

    cluster: Cluster
    node: str = NODE_NAME

    def kubectl(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        """``kubectl`` against the cluster (see :meth:`Cluster.kubectl`)."""
        return self.cluster.kubectl(*args, **kw)

    def helm(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        """``helm`` against the cluster (see :meth:`Cluster.helm`)."""
        return self.cluster.helm(*args, **kw)

    @property
    def gateway(self) -> str:
        """The real node's bridge address (where the API server is advertised): what processes on
        this machine that the API server or pods must reach listen on."""
        env = (self.cluster.state_dir / "node.env").read_text()
        return next(line.split("=", 1)[1] for line in env.splitlines() if line.startswith("GATEWAY="))

    def get(self, *args: str) -> dict:
        """``kubectl get ARGS -o json`` parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def container_log(self, namespace: str, pod: str, container: str) -> str:
        """Every log line the container wrote so far (all restarts), from the kubelet's podLogsDir.

        Raises ``FileNotFoundError`` when the pod never ran on the real node.
        """
        root = self.cluster.state_dir / "node" / "pod-logs"
        dirs = sorted(root.glob(f"{namespace}_{pod}_*/{container}"))
        if not dirs:
            raise FileNotFoundError(f"no logs for {namespace}/{pod}/{container} under {root}")
        return "".join(p.read_text(errors="replace") for p in sorted(dirs[0].glob("*.log")))


def wait_until(what: str, check: Callable[[], object], timeout: float, interval: float = 1.0):
    """Poll ``check`` until it returns something truthy; return that value.

    Raises ``AssertionError`` naming ``what`` after ``timeout`` seconds (exceptions from
    ``check`` count as not yet).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = check()
            if last:
                return last
        except (subprocess.CalledProcessError, json.JSONDecodeError, KeyError, IndexError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def docker_client() -> str:
    """The docker client images/ensure-docker.sh chooses (it starts dockerd when needed)."""
    out = subprocess.run([str(REPO / "images" / "ensure-docker.sh")], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def e2e_cluster(request: pytest.FixtureRequest) -> Iterator[E2ECluster]:
    """A control plane with the real node and the project's images loaded; stopped at the end.

    Component and container logs are copied to ``tests/.artifacts/cluster-logs/`` when a test
    of the session failed. Fails (not skips) when the images are missing: ``make images``.
    """
    if os.geteuid() != 0:
        pytest.skip("the e2e tier runs a real kubelet, containerd and a bridge: it needs root")
    docker = docker_client()
    for image in (SERVING_IMAGE, OPERATOR_IMAGE):
        if subprocess.run([docker, "image", "inspect", image], capture_output=True).returncode != 0:
            pytest.fail(f"image {image} is missing: run `make images` (make test does)")
    state_dir = Path(tempfile.mkdtemp(prefix="kubeinfer-e2e-"))
    try:
        running = start_cluster(state_dir, real_node_images=(SERVING_IMAGE, OPERATOR_IMAGE))
    except ClusterError:
        stop_cluster(state_dir)
        raise
    try:
        yield E2ECluster(running)
    finally:
        if request.session.testsfailed:
            save_logs(state_dir)
        stop_cluster(state_dir)
    assert leftovers(state_dir) == [], "make cluster-down / down.sh left these behind"


def leftovers(state_dir: Path) -> list[str]:
    """What a stopped real node must not leave on the machine: processes, mounts, bridge, route,
    kube-proxy's iptables chains, cgroups, the state directory."""
    found = []
    for proc in ("kubelet", "kube-proxy"):
        if subprocess.run(["pgrep", "-f", f"{state_dir}.*{proc}|{proc}.*{state_dir}"], capture_output=True).returncode == 0:
            found.append(f"process {proc}")
    if subprocess.run(["pgrep", "-f", f"containerd.*{state_dir}"], capture_output=True).returncode == 0:
        found.append("containerd or a shim")
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout
    found += [f"mount {m}" for m in mounts.splitlines() if m.startswith(str(state_dir)) or "/node-containerd-" in m]
    if subprocess.run(["ip", "link", "show", "kubeinfer0"], capture_output=True).returncode == 0:
        found.append("bridge kubeinfer0")
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    found += [f"route {r}" for r in routes.splitlines() if "kubeinfer0" in r]
    nat = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    found += [f"iptables {r}" for r in nat.splitlines() if "KUBE-" in r][:5]
    forward = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    found += [f"iptables {r}" for r in forward.splitlines() if "kubeinfer-node" in r]
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob("*/kubeinfer-node")]
    if state_dir.exists():
        found.append(f"directory {state_dir}")
    return found
