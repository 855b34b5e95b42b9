"""/health, /ready and /metrics of the serving pod."""

from __future__ import annotations

import httpx
import openai

from tests.api.conftest import MODEL, metric_value, wait_idle


def test_health_and_ready_are_200_once_the_model_is_loaded(server) -> None:
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.base_url}/ready", timeout=10).status_code == 200


def test_metrics_expose_the_design_names_labelled_by_model(server, client: openai.OpenAI) -> None:
    wait_idle(server.base_url)  # no earlier (aborted) request still adding tokens
    before = metric_value(server.base_url, "kubeinfer_generation_tokens_total", model_name=MODEL)
    client.completions.create(model=MODEL, prompt="count me", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    resp = httpx.get(f"{server.base_url}/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    for name in ("kubeinfer_queue_length", "kubeinfer_num_requests_running", "kubeinfer_kv_cache_usage_ratio",
                 "kubeinfer_time_to_first_token_seconds_count", "kubeinfer_inter_token_latency_seconds_count",
                 "kubeinfer_e2e_request_latency_seconds_count", "kubeinfer_prompt_tokens_total",
                 "kubeinfer_generation_tokens_total", "kubeinfer_model_loads_total", "kubeinfer_model_load_seconds_count"):
        assert f'{name}{{model_name="{MODEL}"}}' in resp.text, name
    assert metric_value(server.base_url, "kubeinfer_generation_tokens_total", model_name=MODEL) == before + 5
    assert metric_value(server.base_url, "kubeinfer_model_loads_total", model_name=MODEL) >= 1


def test_per_request_token_and_phase_histograms(server, client: openai.OpenAI) -> None:
    wait_idle(server.base_url)
    count = "kubeinfer_request_generation_tokens_count"
    before = {name: metric_value(server.base_url, name, model_name=MODEL) for name in (
        count, "kubeinfer_request_generation_tokens_sum", "kubeinfer_request_decode_time_seconds_count",
        "kubeinfer_request_prefill_time_seconds_count")}
    out = client.completions.create(model=MODEL, prompt="four tokens please", max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    after = {name: metric_value(server.base_url, name, model_name=MODEL) for name in before}
    assert after[count] == before[count] + 1
    assert after["kubeinfer_request_generation_tokens_sum"] == before["kubeinfer_request_generation_tokens_sum"] + 7
    assert after["kubeinfer_request_prefill_time_seconds_count"] == before["kubeinfer_request_prefill_time_seconds_count"] + 1
    assert after["kubeinfer_request_decode_time_seconds_count"] == before["kubeinfer_request_decode_time_seconds_count"] + 1
    prompt_sum = metric_value(server.base_url, "kubeinfer_request_prompt_tokens_sum", model_name=MODEL)
    assert prompt_sum >= out.usage.prompt_tokens


def test_http_requests_counted_by_route_template_and_status(server, client: openai.OpenAI) -> None:
    def n(route: str, status: str, method: str = "GET") -> float:
        return metric_value(server.base_url, "kubeinfer_http_requests_total", route=route, method=method, status=status)

    ok, missing, unmatched = n("/v1/models/{name:path}", "200"), n("/v1/models/{name:path}", "404"), n("unmatched", "404")
    bad = n("/v1/completions", "400", "POST")
    assert httpx.get(f"{server.base_url}/v1/models/{MODEL}", timeout=10).status_code == 200
    assert httpx.get(f"{server.base_url}/v1/models/no-such-model", timeout=10).status_code == 404
    assert httpx.get(f"{server.base_url}/no/such/route", timeout=10).status_code == 404
    with_bad = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1},
                          timeout=10)
    assert with_bad.status_code == 400
    assert (n("/v1/models/{name:path}", "200"), n("/v1/models/{name:path}", "404"), n("unmatched", "404")) == (
        ok + 1, missing + 1, unmatched + 1)
    assert n("/v1/completions", "400", "POST") == bad + 1
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    assert "no-such-model" not in text.split("kubeinfer_http_requests_total", 1)[1].split("# HELP", 1)[0]


def test_process_metrics_and_model_state_gauge(server) -> None:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    assert metric_value(server.base_url, "process_resident_memory_bytes") > 0
    assert "process_cpu_seconds_total" in text
    assert metric_value(server.base_url, "kubeinfer_model_state", model_name=MODEL, state="loaded") == 1.0
    assert metric_value(server.base_url, "kubeinfer_model_state", model_name=MODEL, state="loading") == 0.0
    assert metric_value(server.base_url, "kubeinfer_ready") == 1.0
