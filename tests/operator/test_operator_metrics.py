"""The operator's /metrics and /readyz, read over HTTP as Prometheus and the kubelet would."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from kubeinfer_operator import metrics
from kubeinfer_operator.config import OperatorConfig
from kubeinfer_operator.kube import Kube, KubeError
from kubeinfer_operator.models_poll import ModelPoller
from kubeinfer_operator.reconcile import Reconciler
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from tests.operator.test_reconcile import GOOD, NOW, MemoryKube, isvc, run


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    server = metrics.serve("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value of every sample /metrics serves."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def reconciles(samples, result: str) -> float:
    return samples[("kubeinfer_operator_reconciles_total", (("result", result),))]


def ready(base: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _reconciler(spec: dict) -> tuple[MemoryKube, Reconciler]:
    kube = MemoryKube(isvc(spec))
    return kube, Reconciler(kube, OperatorConfig(model_poll=False), lambda *a: None, clock=lambda: NOW)


def test_reconciles_are_counted_by_result_and_timed(base):
    before = scrape(base)
    kube, rec = _reconciler(GOOD)
    run(rec)
    _, bad = _reconciler({"models": []})
    run(bad)
    kube.reject["ConfigMap"] = KubeError(503, "Service Unavailable", "etcd is down")
    rec._applied.clear()
    with pytest.raises(KubeError):
        run(rec)
    after = scrape(base)
    assert reconciles(after, "ok") - reconciles(before, "ok") == 1
    assert reconciles(after, "invalid_spec") - reconciles(before, "invalid_spec") == 1
    assert reconciles(after, "error") - reconciles(before, "error") == 1
    count = ("kubeinfer_operator_reconcile_duration_seconds_count", ())
    assert after[count] - before.get(count, 0) == 3
    assert after[("kubeinfer_operator_reconciles_in_progress", ())] == 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_api_server_is_counted_and_makes_the_operator_not_ready(base):
    metrics.HEALTH.mark_started()
    metrics.HEALTH.api_ok()
    assert ready(base) == (200, "ok")
    before = scrape(base)
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(KubeError) as err:
        Kube(client.ApiClient(cfg)).list_isvcs("default")
    assert err.value.status == 0
    after = scrape(base)
    key = ("kubeinfer_operator_api_errors_total", (("code", "0"),))
    assert after[key] - before.get(key, 0) == 1
    status, reason = ready(base)
    assert status == 503 and "kubernetes API: no response" in reason
    metrics.HEALTH.api_ok()  # the next successful call makes it ready again
    assert ready(base)[0] == 200


def test_a_model_poll_is_counted(base):
    before = scrape(base)
    pod = {"metadata": {"name": "p", "uid": "u", "resourceVersion": "1"},
           "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
           "spec": {"containers": [{"ports": [{"name": "http", "containerPort": _closed_port()}]}]}}
    (answer,) = ModelPoller(timeout=2).poll([pod])
    assert answer.error is not None
    key = ("kubeinfer_operator_model_polls_total", (("result", "error"),))
    assert scrape(base)[key] - before[key] == 1


def test_unknown_paths_are_404(base):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/nope", timeout=5)
    assert err.value.code == 404


@pytest.mark.parametrize(("text", "expected"), [("0.0.0.0:8081", ("0.0.0.0", 8081)), (":9000", ("0.0.0.0", 9000)),
                                                 ("[::]:8081", ("::", 8081))])
def test_metrics_address(text, expected):
    assert metrics.parse_address(text) == expected


def test_bad_metrics_address():
    with pytest.raises(ValueError, match="HOST:PORT"):
        metrics.parse_address("localhost")
