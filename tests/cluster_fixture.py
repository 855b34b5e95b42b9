"""Session fixture that runs the real Kubernetes control plane for ``@pytest.mark.cluster`` tests.

The control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
kwok with fake ``nvidia.com/gpu`` nodes) is the one ``make cluster`` starts: this module
calls ``tests/cluster/build.sh`` (a no-op when the cached binaries match the pins) and
``tests/cluster/up.sh`` with a temporary state directory, and ``tests/cluster/down.sh``
at the end of the session. When a test of the session failed, or start-up failed, each
component's log is copied to ``tests/.artifacts/cluster-logs/`` first.

Use from ``tests/conftest.py``::

    from cluster_fixture import cluster  # noqa: F401  (session fixture)

and in a test::

    @pytest.mark.cluster
    def test_something(cluster):
        cluster.kubectl("get", "nodes")
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SRC = REPO / "tests" / "cluster"
LOG_ARTIFACTS = REPO / "tests" / ".artifacts" / "cluster-logs"


class ClusterError(RuntimeError):
    """The control plane could not be built or started; the message holds the script output."""


@dataclass(frozen=True)
class Cluster:
    """A running test control plane.

    Attributes:
        kubeconfig: path of a kubeconfig for a ``system:masters`` user (bearer token),
            default namespace ``default``.
        bin_dir: directory with ``kubectl``, ``helm``, ``kwok``, ``kube-apiserver`` and the
            other binaries, all built for the pinned Kubernetes minor version.
        state_dir: directory with ``pki/``, ``logs/<component>.log`` and ``etcd/``.
        gpu_nodes: names of the fake nodes, each with ``nvidia.com/gpu`` capacity
            ``gpus_per_node`` and label ``type=kwok``.
        gpus_per_node: ``nvidia.com/gpu`` capacity and allocatable of every fake node.
    """

    kubeconfig: Path
    bin_dir: Path
    state_dir: Path
    gpu_nodes: tuple[str, ...]
    gpus_per_node: int

    @property
    def env(self) -> dict[str, str]:
        """Environment for child processes: ``KUBECONFIG`` set and ``bin_dir`` first on ``PATH``."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _run(
        self, tool: str, args: tuple[str, ...], check: bool, input: str | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / tool), *args]
        result = subprocess.run(
            cmd, env=self.env, input=input, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, cmd, output=result.stdout, stderr=result.stderr
            )
        return result

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl --kubeconfig <kubeconfig> *args`` and return the finished process (text output).

        ``input`` is passed on stdin (e.g. a manifest for ``apply -f -``); ``timeout`` is in
        seconds. Raises ``subprocess.CalledProcessError`` (stderr attached) on a non-zero
        exit when ``check`` is true, ``subprocess.TimeoutExpired`` after ``timeout``.
        """
        return self._run("kubectl", ("--kubeconfig", str(self.kubeconfig), *args), check, input, timeout)

    def helm(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``helm --kubeconfig <kubeconfig> *args``; same contract as :meth:`kubectl`."""
        return self._run("helm", ("--kubeconfig", str(self.kubeconfig), *args), check, input, timeout)


def build_binaries() -> Path:
    """Build (or reuse from ``$KUBEINFER_CACHE``) the control-plane binaries; return their directory.

    The first build compiles Kubernetes from source (tens of minutes on two cores);
    later calls return at once. Raises ``ClusterError`` with the build output on failure.
    """
    result = subprocess.run(
        [str(CLUSTER_SRC / "build.sh")], capture_output=True, text=True, cwd=REPO
    )
    if result.returncode != 0:
        raise ClusterError(f"tests/cluster/build.sh failed:\n{result.stderr[-8000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def save_logs(state_dir: Path, dest: Path = LOG_ARTIFACTS) -> Path:
    """Copy the component logs into ``dest``, replacing older copies.

    Copies ``state_dir/logs/*.log`` (control plane) and, for a real node,
    ``state_dir/node/logs/*.log`` (containerd, kubelet, kube-proxy) and the containers' logs
    under ``state_dir/node/pod-logs`` (into ``dest/pods/``).
    """
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    for log in sorted((state_dir / "logs").glob("*.log")) + sorted((state_dir / "node" / "logs").glob("*.log")):
        shutil.copy2(log, dest / log.name)
    pod_logs = state_dir / "node" / "pod-logs"
    if pod_logs.is_dir():
        shutil.copytree(pod_logs, dest / "pods", dirs_exist_ok=True)
    return dest


def start_cluster(
    state_dir: Path, nodes: int = 2, gpus_per_node: int = 8, real_node_images: tuple[str, ...] | None = None
) -> Cluster:
    """Build if needed, then start a control plane in ``state_dir`` and wait until it is healthy.

    Healthy means: ``/readyz`` answers ok, the ``default`` ServiceAccount exists and all
    ``nodes`` fake nodes are Ready. With ``real_node_images`` (Docker image references, possibly
    empty) a real node ``real-node-0`` joins too (``up.sh --real-node``, needs root), with those
    images loaded into its containerd, and is Ready with kube-proxy's rules in place.
    Raises ``ClusterError`` (with the component log tails) when start-up fails; the logs are
    then saved to ``tests/.artifacts/cluster-logs``.
    """
    bin_dir = build_binaries()
    cmd = [
        str(CLUSTER_SRC / "up.sh"),
        "--dir", str(state_dir),
        "--bin", str(bin_dir),
        "--nodes", str(nodes),
        "--gpus-per-node", str(gpus_per_node),
    ]
    if real_node_images is not None:
        cmd.append("--real-node")
        for image in real_node_images:
            cmd += ["--image", image]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        saved = save_logs(state_dir)
        raise ClusterError(f"tests/cluster/up.sh failed (logs in {saved}):\n{result.stderr[-8000:]}")
    return Cluster(
        kubeconfig=state_dir / "kubeconfig",
        bin_dir=bin_dir,
        state_dir=state_dir,
        gpu_nodes=tuple(f"kwok-node-{i}" for i in range(nodes)),
        gpus_per_node=gpus_per_node,
    )


def stop_cluster(state_dir: Path) -> None:
    """Stop every component started in ``state_dir`` and delete the directory."""
    subprocess.run([str(CLUSTER_SRC / "down.sh"), "--dir", str(state_dir)], check=False)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The session's control plane, started on first use and stopped after the last test.

    Component logs are copied to ``tests/.artifacts/cluster-logs/`` when any test of the
    session failed.
    """
    state_dir = Path(tempfile.mkdtemp(prefix="kubeinfer-cluster-"))
    try:
        running = start_cluster(state_dir)
    except ClusterError:
        stop_cluster(state_dir)
        raise
    try:
        yield running
    finally:
        if request.session.testsfailed:
            save_logs(state_dir)
        stop_cluster(state_dir)
