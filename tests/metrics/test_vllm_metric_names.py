"""--metrics-names vllm|both: vLLM's series names and labels at /metrics, read by vLLM's dashboards unchanged."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest

from tests.api.conftest import _free_port, metric_value, wait_ready
from tests.api.test_settings_table import _env


@pytest.mark.parametrize("mode", ["vllm", "both"])
def test_vllm_names_and_labels_are_exported(mode: str) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "kubeinfer_serving", "--host", "127.0.0.1", "--port", str(port),
           "--model", "builtin://tiny-llama", "--max-model-len", "256", "--device", "cpu",
           "--metrics-names", mode, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=_env())
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc=proc)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        out = client.completions.create(model="tiny-llama", prompt="one two three", max_tokens=4,
                                     extra_body={"ignore_eos": True})
        labels = {"model_name": "tiny-llama", "engine": "0"}
        assert metric_value(base, "vllm:request_success_total", finished_reason="length", **labels) == 1
        assert metric_value(base, "vllm:prompt_tokens_total", **labels) == out.usage.prompt_tokens
        assert metric_value(base, "vllm:generation_tokens_total", **labels) == 4
        for name in ("vllm:e2e_request_latency_seconds_count", "vllm:time_to_first_token_seconds_count",
                     "vllm:request_inference_time_seconds_count", "vllm:request_time_per_output_token_seconds_count"):
            assert metric_value(base, name, **labels) == 1, name
        text = httpx.get(f"{base}/metrics", timeout=10).text
        for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            assert f'{gauge}{{engine="0",model_name="tiny-llama"}}' in text
        assert 'vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="tiny-llama"}' in text
        assert ("kubeinfer_kv_cache_usage_ratio{" in text) == (mode == "both")
        assert "kubeinfer_queue_length{" in text  # the operator's autoscaling signal, in every mode
        assert "kubeinfer_http_requests_total{" in text and "kubeinfer_model_state{" in text  # pod series stay
    finally:
        proc.terminate()
        proc.wait(timeout=30)
