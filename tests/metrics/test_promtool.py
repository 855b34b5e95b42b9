"""The chart's alert rules and dashboard queries through promtool (built by tests/metrics-stack).

* ``promtool check rules`` on files/kubeinfer-alerts.yaml (syntax, templates, label rules);
* ``promtool test rules`` on tests/metrics/alerts_test.yaml (each alert fires when and only
  when it should, with the annotations an SRE reads);
* every Grafana panel query parses as PromQL (as recording rules through ``promtool check rules``,
  Grafana's ``$variables`` replaced by what Grafana sends).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.metrics_stack_fixture import build_metrics_bin

pytestmark = pytest.mark.metrics

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "deploy" / "helm" / "kubeinfer" / "files"
ALERTS = FILES / "kubeinfer-alerts.yaml"


@pytest.fixture(scope="module")
def promtool() -> Path:
    return build_metrics_bin() / "promtool"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_alert_rules_pass_promtool_check(promtool: Path) -> None:
    res = run(promtool, "check", "rules", ALERTS)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 11 rules found" in res.stdout


def test_alert_rules_unit_tests(promtool: Path) -> None:
    res = run(promtool, "test", "rules", REPO / "tests" / "metrics" / "alerts_test.yaml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_a_broken_alert_fails_its_unit_test(promtool: Path, tmp_path: Path) -> None:
    broken = ALERTS.read_text().replace("kubeinfer_kv_cache_usage_ratio) > 0.95", "kubeinfer_kv_cache_usage_ratio) > 0.99")
    (tmp_path / "kubeinfer-alerts.yaml").write_text(broken)
    tests = (REPO / "tests" / "metrics" / "alerts_test.yaml").read_text().replace(
        "../../deploy/helm/kubeinfer/files/kubeinfer-alerts.yaml", "kubeinfer-alerts.yaml")
    (tmp_path / "alerts_test.yaml").write_text(tests)
    res = run(promtool, "test", "rules", tmp_path / "alerts_test.yaml")
    assert res.returncode != 0 and "KubeinferKVCacheNearlyFull" in res.stdout + res.stderr


def test_dashboard_queries_are_valid_promql(promtool: Path, tmp_path: Path) -> None:
    dash = json.loads((FILES / "kubeinfer-dashboard.json").read_text())
    rules = []
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = (target["expr"].replace("$__rate_interval", "5m").replace("$namespace", ".*")
                    .replace("$model_name", ".*"))
            rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
    (tmp_path / "dashboard-rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = run(promtool, "check", "rules", tmp_path / "dashboard-rules.yaml")
    assert res.returncode == 0, res.stdout + res.stderr
