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
    before = metric_value(server.base_url, "kubeinfer_generation_tokens_total", model=MODEL)
    client.completions.create(model=MODEL, prompt="count me", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    resp = httpx.get(f"{server.base_url}/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    for name in ("kubeinfer_queue_length", "kubeinfer_num_requests_running", "kubeinfer_kv_cache_usage_ratio",
                 "kubeinfer_time_to_first_token_seconds_count", "kubeinfer_inter_token_latency_seconds_count",
                 "kubeinfer_e2e_request_latency_seconds_count", "kubeinfer_prompt_tokens_total",
                 "kubeinfer_generation_tokens_total", "kubeinfer_model_loads_total", "kubeinfer_model_load_seconds_count"):
        assert f'{name}{{model="{MODEL}"}}' in resp.text, name
    assert metric_value(server.base_url, "kubeinfer_generation_tokens_total", model=MODEL) == before + 5
    assert metric_value(server.base_url, "kubeinfer_model_loads_total", model=MODEL) >= 1
