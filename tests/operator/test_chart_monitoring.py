"""The chart's monitoring values: PrometheusRule, PodMonitor and Grafana dashboard render from
the same files promtool and the dashboard test check (``helm template``; helm from tests/cluster)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.cluster_fixture import build_binaries
from tests.operator.conftest import REPO

pytestmark = pytest.mark.cluster

CHART = REPO / "deploy" / "helm" / "kubeinfer"


def render(*sets: str) -> list[dict]:
    helm = build_binaries() / "helm"
    args = [str(helm), "template", "k", str(CHART), "--namespace", "obs"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_monitoring_objects_are_off_by_default():
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"PrometheusRule", "PodMonitor"}


def test_monitoring_objects_carry_the_checked_files():
    docs = render("prometheusRule.enabled=true", "prometheusRule.labels.release=kps", "podMonitor.enabled=true",
                  "grafanaDashboard.enabled=true", "watchNamespaces={team-a}",
                  "prometheusUrl=http://prom.obs:9090")
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"]["groups"] == yaml.safe_load((CHART / "files" / "kubeinfer-alerts.yaml").read_text())["groups"]
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "kubeinfer-operator"
    dash = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["kubeinfer-serving.json"]) == json.loads(
        (CHART / "files" / "kubeinfer-dashboard.json").read_text())
    operator = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEINFER_PROMETHEUS_URL"] == "http://prom.obs:9090"
