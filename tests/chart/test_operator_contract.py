"""The chart and the operator meet: the args and env the chart renders are what the operator's CLI
and ``OperatorConfig`` read, and the paths its probes and PodMonitor use are served by the
operator's own metrics server, with the series the chart's operator alerts query."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
import yaml
from kubeinfer_operator import metrics
from kubeinfer_operator.__main__ import build_parser
from kubeinfer_operator.config import OperatorConfig

from tests.chart.chart import CHART, EVERY_KNOB, MONITORING_API, one, operator_container, render

pytestmark = pytest.mark.cluster


def test_the_operator_reads_the_args_and_env_the_chart_renders():
    container = operator_container(render(values=EVERY_KNOB))
    args = build_parser().parse_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert metrics.parse_address(args.metrics) == ("0.0.0.0", ports["metrics"])
    liveness = urlsplit(args.liveness)
    assert liveness.port == ports["health"] and liveness.path == container["livenessProbe"]["httpGet"]["path"]
    assert args.namespace == EVERY_KNOB["watchNamespaces"] and not args.all_namespaces

    config = OperatorConfig.from_env({e["name"]: e["value"] for e in container["env"] if "value" in e})
    assert config.image_pull_secrets == ("regcred", "other-regcred", "global-regcred")
    assert config.serving_image == EVERY_KNOB["servingImage"]
    operator_image = "registry.example.com/ml/kubeinfer-operator:1.2.3"
    assert config.activator_image == config.router_image == operator_image
    assert (config.startup_timeout_seconds, config.drain_seconds) == (600, 30)
    assert config.prometheus_url == EVERY_KNOB["prometheusUrl"]
    assert config.keda_polling_seconds == 5 and config.activator_retry_after_seconds == 9


def test_defaults_watch_every_namespace_and_pull_with_no_secret():
    container = operator_container(render())
    args = build_parser().parse_args(container["args"])
    assert args.all_namespaces and metrics.parse_address(args.metrics)[1] == metrics.METRICS_PORT
    assert OperatorConfig.from_env({e["name"]: e["value"] for e in container["env"]}).image_pull_secrets == ()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_probe_scrape_paths_and_alert_series_are_the_operators():
    docs = render("--set", "podMonitor.enabled=true", "--api-versions", MONITORING_API)
    container = operator_container(docs)
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    (endpoint,) = one(docs, "PodMonitor", "-operator")["spec"]["podMetricsEndpoints"]
    server = metrics.serve("127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, body = _get(base + container["readinessProbe"]["httpGet"]["path"])
        assert status in (200, 503), (status, body)  # the readiness endpoint (503 "starting" before start-up)
        assert endpoint["path"] == annotations["prometheus.io/path"]
        status, text = _get(base + endpoint["path"])
        assert status == 200
    finally:
        server.shutdown()
    alerts = yaml.safe_load((CHART / "files" / "kubeinfer-alerts.yaml").read_text())
    (group,) = [g for g in alerts["groups"] if g["name"] == "kubeinfer-operator"]
    selectors = {m for r in group["rules"] for m in re.findall(r"\b(kubeinfer_operator_\w+)\{([^}]*)\}", r["expr"])}
    assert selectors == {("kubeinfer_operator_reconciles_total", 'result="error"')}
    assert re.search(r'^kubeinfer_operator_reconciles_total\{result="error"\} ', text, flags=re.M), text
