"""Every metric the chart's alerts and Grafana dashboard query exists on a live serving pod's /metrics.

A renamed or dropped series would leave a panel empty or an alert silent forever; this test
reads the names out of deploy/helm/kubeinfer/files/ and checks them against the exposition
of a real server (tests/api/conftest.py ``server``) after traffic that creates the labelled series.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import yaml

from tests.api.conftest import MODEL
from tests.metrics_stack_fixture import free_port

FILES = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "kubeinfer" / "files"
#: Series Prometheus itself attaches to every target (not on any /metrics page).
SYNTHETIC = {"up"}
#: The fleet router's series (router/kubeinfer_router/metrics.py): on a router's /metrics, not a serving pod's.
ROUTER_PREFIX = "kubeinfer_router_"
#: The operator's own series (the alerts' kubeinfer-operator group): on the operator's /metrics.
OPERATOR_PREFIX = "kubeinfer_operator_"
_SUFFIXES = {"_bucket": "histogram", "_sum": "histogram", "_count": "histogram", "_total": "counter"}


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((FILES / "kubeinfer-alerts.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads((FILES / "kubeinfer-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: selectors (a name before ``{`` or ``[``) and every
    ``kubeinfer_*`` / ``process_*`` identifier (also bare ones such as ``(kubeinfer_ready)``)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[\{\[]", expr))
    names |= set(re.findall(r"\b((?:kubeinfer|process)_[a-zA-Z0-9_:]*)", expr))
    return names - {"by", "without", "on", "ignoring", "group_left", "group_right", "offset"}


def exposed(text: str) -> dict[str, str]:
    """Metric family name -> type, from the ``# TYPE`` lines of an exposition."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))


def is_exposed(name: str, families: dict[str, str]) -> bool:
    if name in families:
        return True
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix) and families.get(name[: -len(suffix)]) == kind:
            return True
    return False


def test_metric_name_extraction_finds_selectors_and_bare_names() -> None:
    expr = 'sum by (le) (rate(kubeinfer_x_bucket{status=~"5.."}[5m])) / max(kubeinfer_ready) and up == 0'
    assert metric_names(expr) == {"kubeinfer_x_bucket", "kubeinfer_ready"}  # `up` has no selector: see below
    assert metric_names("up{job='a'} == 0") == {"up"}
    assert not is_exposed("kubeinfer_missing_total", {"kubeinfer_missing": "gauge"})


def test_every_alert_and_dashboard_metric_is_on_live_metrics(server, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="make the histograms", max_tokens=3, temperature=0)
    httpx.get(f"{server.base_url}/v1/models/no-such-model", timeout=10)
    families = exposed(httpx.get(f"{server.base_url}/metrics", timeout=10).text)
    used = {n for n in set().union(*(metric_names(e) for e in alert_exprs() + dashboard_exprs()))
            if not n.startswith((ROUTER_PREFIX, OPERATOR_PREFIX))}
    assert {"kubeinfer_queue_length", "kubeinfer_http_requests_total", "kubeinfer_model_state"} <= used
    missing = sorted(n for n in used - SYNTHETIC if not is_exposed(n, families))
    assert not missing, f"queried by the alerts or dashboard but not on /metrics: {missing}"


def test_every_router_dashboard_metric_is_on_a_live_routers_metrics(server) -> None:
    """The dashboard's ``kubeinfer_router_*`` series against ``kubeinfer-router`` (the checkout's
    code, as a subprocess) in front of the live serving pod, after a completion through it."""
    used = {n for n in set().union(*(metric_names(e) for e in dashboard_exprs())) if n.startswith(ROUTER_PREFIX)}
    assert {"kubeinfer_router_requests_total", "kubeinfer_router_held_requests",
            "kubeinfer_router_proxy_overhead_seconds_bucket"} <= used
    repo = Path(__file__).resolve().parents[2]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(repo / d) for d in ("router", "serving", "operator", "."))}
    proc = subprocess.Popen([sys.executable, "-m", "kubeinfer_router", "--host", "127.0.0.1", "--port", str(port),
                             "--endpoints", server.base_url, "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "kubeinfer-router exited"
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "kubeinfer-router not ready after 60 s"
            time.sleep(0.2)
        r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "route me", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200, r.text
        families = exposed(httpx.get(f"{base}/metrics", timeout=10).text)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    missing = sorted(n for n in used if not is_exposed(n, families))
    assert not missing, f"queried by the dashboard but not on the router's /metrics: {missing}"
