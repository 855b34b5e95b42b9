"""The chart against the real test API server (tests/cluster): server-side validation of every
knob's manifests, installs with and without prometheus-operator's API, and the chart as a
subchart of a platform chart that passes ``global`` values and image pull secrets.

prometheus-operator's CRDs (the pinned Go module, tests/chart/schemas.py) are installed for the
tests that need them and removed after, so the rest of the session sees an API server without them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import yaml

from tests.chart.chart import CHART, EVERY_KNOB, MONITORING_API, kube_version, one, render
from tests.chart.schemas import prometheus_operator_crds
from tests.chart.wrapper import PULL_SECRETS, write_parent_chart

pytestmark = pytest.mark.cluster

CRD_PATH = CHART.parents[2] / "deploy" / "crds" / "serving.kubeinfer.io_inferenceservices.yaml"
PLAIN_RBAC = CHART.parents[2] / "deploy" / "operator" / "rbac.yaml"


def api_versions(cluster) -> set[str]:
    return set(cluster.kubectl("api-versions").stdout.split())


def deployment(cluster, namespace: str, name: str) -> dict:
    return json.loads(cluster.kubectl("-n", namespace, "get", "deployment", name, "-o", "json").stdout)


def env_of(dep: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


@pytest.fixture
def release(cluster) -> Iterator[list[tuple[str, str]]]:
    """Releases a test installs, as (name, namespace); uninstalled after the test."""
    installed: list[tuple[str, str]] = []
    yield installed
    for name, namespace in installed:
        cluster.helm("uninstall", name, "--namespace", namespace, "--wait", check=False, timeout=180)


@pytest.fixture
def monitoring_crds(cluster) -> Iterator[None]:
    """prometheus-operator's PodMonitor and PrometheusRule CRDs, installed (and Established) for one test."""
    crds = prometheus_operator_crds()
    manifest = yaml.safe_dump_all(list(crds.values()))
    # server-side: the CRDs are too large for client-side apply's last-applied annotation
    cluster.kubectl("apply", "--server-side", "-f", "-", input=manifest)
    names = [c["metadata"]["name"] for c in crds.values()]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in names])
    try:
        yield
    finally:
        cluster.kubectl("delete", "--wait=true", *[f"crd/{n}" for n in names], timeout=180)


def test_lint_templates_and_install_with_watch_namespaces(cluster, release):
    # (was tests/operator/test_operator_cluster.py's chart test)
    cluster.helm("lint", "--kube-version", kube_version(), str(CHART))
    docs = render("--include-crds", "--set", "metricsAdapter.rulesConfigMap.enabled=true", release="kubeinfer")
    assert [d for d in docs if d["kind"] == "CustomResourceDefinition"] == [yaml.safe_load(CRD_PATH.read_text())]
    assert sorted(d["kind"] for d in docs) == sorted(["CustomResourceDefinition", "ServiceAccount", "ClusterRole",
                                                      "ClusterRoleBinding", "Deployment", "ConfigMap"])
    plain_rules = next(d for d in yaml.safe_load_all(PLAIN_RBAC.read_text()) if d and d["kind"] == "ClusterRole")
    assert one(docs, "ClusterRole")["rules"] == plain_rules["rules"]

    assert MONITORING_API not in api_versions(cluster)
    release.append(("kubeinfer", "chart-plain"))
    out = cluster.helm("install", "kubeinfer", str(CHART), "--namespace", "chart-plain", "--create-namespace",
                       "--set", "watchNamespaces={team-a}", "--set", "podMonitor.enabled=true",
                       "--set", "prometheusRule.enabled=true").stdout
    # without prometheus-operator the monitors are left out, and the notes say so
    assert "serves no monitoring.coreos.com/v1" in out, out
    # the notes' commands name our kind unambiguously (KServe's is also "isvc")
    assert "kubectl wait --for=condition=Ready inferenceservices.serving.kubeinfer.io/tiny-chat" in out, out
    manifest = cluster.helm("get", "manifest", "kubeinfer", "--namespace", "chart-plain").stdout
    assert "kind: PodMonitor" not in manifest and "kind: PrometheusRule" not in manifest
    dep = deployment(cluster, "chart-plain", "kubeinfer-kubeinfer-operator")
    assert "--namespace=team-a" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    cluster.kubectl("get", "crd", "inferenceservices.serving.kubeinfer.io")


def test_every_knob_passes_server_side_validation(cluster, monitoring_crds):
    docs = render("--include-crds", values=EVERY_KNOB, namespace="chart-knobs")
    for namespace in ("chart-knobs", "grafana"):
        cluster.kubectl("create", "namespace", namespace, check=False)
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(crds))
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
    # strict: the API server refuses unknown and duplicate fields instead of dropping them
    out = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "--server-side", "-f", "-",
                          input=yaml.safe_dump_all(rest)).stdout
    assert len(out.strip().splitlines()) == len(rest), out
    for kind in ("deployment.apps/platform-infer-operator", "podmonitor.monitoring.coreos.com/platform-infer-operator",
                 "podmonitor.monitoring.coreos.com/platform-infer-serving",
                 "prometheusrule.monitoring.coreos.com/platform-infer-alerts"):
        assert kind in out, out

    # the same check refuses a field the kind does not have
    monitor = one(rest, "PodMonitor", "-operator")
    monitor["spec"]["podMetricsEndpoints"][0]["scrapeInterval"] = "15s"
    bad = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "--server-side", "-f", "-",
                          input=yaml.safe_dump(monitor), check=False)
    assert bad.returncode != 0 and "scrapeInterval" in bad.stderr, bad.stderr


def test_install_with_prometheus_operator_creates_the_monitors(cluster, monitoring_crds, release):
    assert MONITORING_API in api_versions(cluster)
    release.append(("kubeinfer", "chart-mon"))
    out = cluster.helm("install", "kubeinfer", str(CHART), "--namespace", "chart-mon", "--create-namespace",
                       "--set", "podMonitor.enabled=true", "--set", "prometheusRule.enabled=true").stdout
    assert "serves no monitoring.coreos.com/v1" not in out
    monitors = json.loads(cluster.kubectl("-n", "chart-mon", "get", "podmonitors", "-o", "json").stdout)["items"]
    assert sorted(m["metadata"]["name"] for m in monitors) == ["kubeinfer-kubeinfer-operator",
                                                               "kubeinfer-kubeinfer-serving"]
    rules = json.loads(cluster.kubectl("-n", "chart-mon", "get", "prometheusrules", "-o", "json").stdout)["items"]
    assert [r["metadata"]["name"] for r in rules] == ["kubeinfer-kubeinfer-alerts"]
    assert "kubeinfer-operator" in [g["name"] for g in rules[0]["spec"]["groups"]]


def test_chart_as_a_subchart_passes_global_values_and_pull_secrets(cluster, release, tmp_path):
    parent = write_parent_chart(tmp_path)
    cluster.helm("dependency", "update", "--skip-refresh", str(parent))
    assert (parent / "charts" / "kubeinfer-0.1.0.tgz").is_file()
    cluster.helm("lint", "--kube-version", kube_version(), str(parent))
    # the dependency's condition turns it off
    off = cluster.helm("template", "p", str(parent), "--kube-version", kube_version(),
                       "--set", "kubeinfer.enabled=false").stdout
    assert [d["kind"] for d in yaml.safe_load_all(off) if d] == ["ConfigMap"]

    release.append(("platform", "chart-wrapper"))
    out = cluster.helm("install", "platform", str(parent), "--namespace", "chart-wrapper", "--create-namespace",
                       "--render-subchart-notes").stdout
    assert "pull with the Secrets regcred, global-regcred: create them in\nchart-wrapper" in out, out
    dep = deployment(cluster, "chart-wrapper", "platform-kubeinfer-operator")
    pod = dep["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": n} for n in PULL_SECRETS]
    env = env_of(dep)
    # what the operator gives the serving, router and activator pods it creates
    assert env["KUBEINFER_IMAGE_PULL_SECRETS"] == ",".join(PULL_SECRETS)
    assert env["KUBEINFER_SERVING_IMAGE"] == "registry.example.com/ml/kubeinfer-serving:0.1.0"
    platform = json.loads(cluster.kubectl("-n", "chart-wrapper", "get", "configmap", "platform-platform",
                                          "-o", "json").stdout)
    assert json.loads(platform["data"]["pullSecrets"]) == [{"name": "global-regcred"}]


def test_a_subchart_value_the_schema_lacks_is_refused_through_the_parent(cluster, tmp_path):
    parent = write_parent_chart(tmp_path)
    cluster.helm("dependency", "update", "--skip-refresh", str(parent))
    bad = cluster.helm("template", "p", str(parent), "--kube-version", kube_version(),
                       "--set", "kubeinfer.podAnnotation.a=b", check=False)
    assert bad.returncode != 0 and "podAnnotation" in bad.stderr, bad.stderr
