"""``kubeinfer-router``'s command line: every flag is also a ``KUBEINFER_ROUTER_*`` variable, flags win,
bad values name the flag, and ``python -m kubeinfer_router`` serves (a real process on loopback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from kubeinfer_router.config import RouterSettings, build_parser, parse_settings

from tests.metrics_stack_fixture import free_port

REPO = Path(__file__).resolve().parents[2]

#: A non-default value for every setting, as a flag/variable string, and the value it parses to.
SAMPLES = {
    "host": ("127.0.0.2", "127.0.0.2"),
    "port": ("9123", 9123),
    "kube_service": ("chat-pods", "chat-pods"),
    "kube_namespace": ("team-a", "team-a"),
    "isvc": ("chat", "chat"),
    "load_factor": ("1.5", 1.5),
    "virtual_nodes": ("64", 64),
    "prefix_chars": ("200", 200),
    "affinity_ttl_seconds": ("60", 60.0),
    "affinity_keys": ("1000", 1000),
    "imbalance_min_requests": ("8", 8),
    "imbalance_ratio": ("2.5", 2.5),
    "poll_interval_seconds": ("0.5", 0.5),
    "hold_timeout_seconds": ("120", 120.0),
    "max_held_requests": ("50", 50),
    "max_retries": ("0", 0),
    "eject_after_failures": ("5", 5),
    "eject_base_seconds": ("1", 1.0),
    "eject_max_seconds": ("30", 30.0),
    "max_body_bytes": ("2048", 2048),
    "connect_timeout_seconds": ("2", 2.0),
    "timeout_graceful_shutdown": ("10", 10.0),
    "log_level": ("debug", "debug"),
}


def test_every_setting_is_a_flag_and_a_variable():
    flags = {o for a in build_parser()._actions for o in a.option_strings}
    for name in RouterSettings.model_fields:
        assert f"--{name.replace('_', '-')}" in flags, name
    assert set(SAMPLES) | {"endpoints"} == set(RouterSettings.model_fields)
    env = {RouterSettings.env_name(k): raw for k, (raw, _) in SAMPLES.items()}
    from_env = parse_settings([], env)
    argv = [x for k, (raw, _) in SAMPLES.items() for x in (f"--{k.replace('_', '-')}", raw)]
    from_flags = parse_settings(argv, {})
    for name, (_, value) in SAMPLES.items():
        assert getattr(from_env, name) == value == getattr(from_flags, name), name


def test_defaults_are_the_contracts():
    s = parse_settings(["--endpoints", "http://10.0.0.1:8000"], {})
    assert (s.host, s.port, s.load_factor, s.virtual_nodes, s.prefix_chars) == ("0.0.0.0", 8000, 1.25, 256, 100)
    assert (s.imbalance_min_requests, s.imbalance_ratio, s.poll_interval_seconds) == (64, 1.5, 1.0)
    assert (s.hold_timeout_seconds, s.max_held_requests, s.max_retries) == (60.0, 1000, 2)
    assert (s.eject_after_failures, s.eject_base_seconds, s.eject_max_seconds) == (3, 2.0, 60.0)
    assert s.max_body_bytes == 16 * 1024 * 1024 and s.log_level == "info"


def test_a_flag_wins_over_its_variable_and_endpoints_come_comma_separated():
    env = {"KUBEINFER_ROUTER_PORT": "9000",
           "KUBEINFER_ROUTER_ENDPOINTS": " http://10.0.0.1:8000/, http://[fd00::1]:8000,,"}
    s = parse_settings(["--port", "9001"], env)
    assert s.port == 9001
    assert s.endpoints == ["http://10.0.0.1:8000", "http://[fd00::1]:8000"]
    assert s.service_name() == "the fleet"


def test_the_namespace_defaults_to_the_pods_own(tmp_path, monkeypatch):
    import kubeinfer_router.config as config

    monkeypatch.setattr(config, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "namespace")
    s = parse_settings(["--kube-service", "chat-pods", "--isvc", "chat"], {})
    assert s.namespace() == "default"
    (tmp_path / "namespace").write_text("team-a\n")
    assert s.namespace() == "team-a" and s.service_name() == "chat"
    assert parse_settings(["--kube-service", "x", "--kube-namespace", "ns"], {}).namespace() == "ns"


@pytest.mark.parametrize(("argv", "env", "message"), [
    ([], {}, "exactly one endpoint source"),
    (["--endpoints", "http://a:1", "--kube-service", "s"], {}, "exactly one endpoint source"),
    (["--endpoints", "10.0.0.1:8000"], {}, "--endpoints / KUBEINFER_ROUTER_ENDPOINTS"),
    (["--endpoints", "http://a:1/v1"], {}, "not a base URL"),
    (["--endpoints", "http://a:1,http://a:1/"], {}, "listed twice"),
    (["--endpoints", "http://a:1"], {"KUBEINFER_ROUTER_LOAD_FACTOR": "0.5"}, "--load-factor / KUBEINFER_ROUTER_LOAD_FACTOR"),
    (["--endpoints", "http://a:1", "--kube-namespace", "ns"], {}, "--kube-namespace needs --kube-service"),
    (["--endpoints", "http://a:1", "--eject-max-seconds", "1"], {}, "at least --eject-base-seconds"),
])
def test_bad_settings_exit_2_naming_the_flag(argv, env, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_settings(argv, env)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_python_m_kubeinfer_router_serves_from_environment_variables_and_stops_on_sigterm():
    port, dead = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("router", "serving", "operator")),
           "KUBEINFER_ROUTER_HOST": "127.0.0.1", "KUBEINFER_ROUTER_PORT": str(port),
           "KUBEINFER_ROUTER_ENDPOINTS": f"http://127.0.0.1:{dead}", "KUBEINFER_ROUTER_ISVC": "chat"}
    proc = subprocess.Popen([sys.executable, "-m", "kubeinfer_router"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the router did not start"
            time.sleep(0.1)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        # the only endpoint refuses connections: tried, then 502 with OpenAI's body (nothing hangs)
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "p"}, timeout=10)
        assert r.status_code == 502 and r.json()["error"]["code"] == "endpoint_unreachable"
        assert "kubeinfer_router_requests_total" in httpx.get(f"{url}/metrics", timeout=5).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read() if proc.stdout else ""
    assert f"routing to endpoints http://127.0.0.1:{dead}" in output
