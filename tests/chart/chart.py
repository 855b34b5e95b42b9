"""Rendering the chart with the test cluster's helm, and the values that set every knob.

helm comes from tests/cluster (``build_binaries``: built once from Go modules, then cached).
That helm is built without the release build's default Kubernetes version (its ``helm template``
assumes v1.20, below the chart's ``kubeVersion``), so renders pass ``--kube-version``: the test
control plane's version, pinned in tests/cluster/build.sh.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.cluster_fixture import CLUSTER_SRC, REPO, build_binaries

CHART = REPO / "deploy" / "helm" / "kubeinfer"
MONITORING_API = "monitoring.coreos.com/v1"


@cache
def values_readme():
    """deploy/helm/values_readme.py as a module (it is a script, outside the Python packages)."""
    spec = importlib.util.spec_from_file_location("values_readme", CHART.parent / "values_readme.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def kube_version() -> str:
    """The test control plane's Kubernetes version (``v1.34.4``), from tests/cluster/build.sh."""
    match = re.search(r"^KUBE_VERSION=(v\S+)$", (CLUSTER_SRC / "build.sh").read_text(), flags=re.M)
    assert match, "KUBE_VERSION not found in tests/cluster/build.sh"
    return match.group(1)


def helm_binary() -> Path:
    """The helm binary of tests/cluster (built on first use)."""
    return build_binaries() / "helm"


def template(*args: str, values: dict[str, Any] | None = None, chart: Path = CHART, release: str = "k",
             namespace: str = "kubeinfer-system", check: bool = True) -> subprocess.CompletedProcess[str]:
    """``helm template RELEASE CHART --namespace NS --kube-version <cluster's> [-f values] *args``.

    ``values`` is written to a values file (so types survive, unlike ``--set``). Raises
    ``subprocess.CalledProcessError`` (stderr attached) on failure when ``check``.
    """
    argv = [str(helm_binary()), "template", release, str(chart), "--namespace", namespace,
            "--kube-version", kube_version(), *args]
    if values is not None:
        argv += ["--values", "-"]
    result = subprocess.run(argv, input=yaml.safe_dump(values) if values is not None else None,
                            capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, argv, output=result.stdout, stderr=result.stderr)
    return result


def render(*args: str, values: dict[str, Any] | None = None, **kwargs: Any) -> list[dict]:
    """The non-empty documents ``template`` prints."""
    return [d for d in yaml.safe_load_all(template(*args, values=values, **kwargs).stdout) if d]


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    """The single document of ``kind`` whose name ends with ``name_suffix``; AssertionError otherwise."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, (kind, name_suffix, [d["metadata"]["name"] for d in docs if d["kind"] == kind])
    return found[0]


def operator_container(docs: list[dict]) -> dict:
    """The operator container of the rendered Deployment."""
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, Any]:
    """Container env as name -> value (or the ``valueFrom`` dict)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


#: Every value of values.yaml set to something other than its default (tests/chart/test_render.py
#: checks that this covers every key of values.yaml, so a new knob gets a test).
EVERY_KNOB: dict[str, Any] = {
    "nameOverride": "infer",
    "fullnameOverride": "platform-infer",
    "global": {"imagePullSecrets": [{"name": "global-regcred"}], "imageRegistry": "ignored.example.com"},
    "enabled": True,
    "image": {"repository": "registry.example.com/ml/kubeinfer-operator", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}, "other-regcred"],
    "servingImage": "registry.example.com/ml/kubeinfer-serving:1.2.3",
    "watchNamespaces": ["team-a", "team-b"],
    "startupTimeoutSeconds": 600,
    "drainSeconds": 30,
    "prometheusUrl": "http://prom.obs:9090",
    "kedaPollingSeconds": 5,
    "activator": {"retryAfterSeconds": 9},
    "operator": {"livenessPort": 9081, "metrics": {"port": 9090, "readinessPath": "/readyz"}},
    "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"},
                 {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    "podSecurityContext": {"runAsUser": 70000, "fsGroup": 70000},
    "securityContext": {"readOnlyRootFilesystem": False},
    "podAnnotations": {"example.com/owner": "ml-platform", "prometheus.io/scrape": "false"},
    "podLabels": {"team": "ml-platform"},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
    "serviceAccount": {"create": True, "name": "infer-operator"},
    "metricsAdapter": {"rulesConfigMap": {"enabled": True}},
    "monitoringCRDs": True,
    "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
    "podMonitor": {"enabled": True, "interval": "30s", "labels": {"release": "kps"}},
    "grafanaDashboard": {"enabled": True, "namespace": "grafana", "sidecarLabel": "grafana_dashboard_llm",
                         "sidecarLabelValue": "yes", "folder": "LLM"},
}
