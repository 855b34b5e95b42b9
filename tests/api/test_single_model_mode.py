"""Single-model mode (``kubeinfer-serve --model-dir``), a one-entry catalogue over the registry, as users see it."""

from __future__ import annotations

import httpx

from tests.api.conftest import MAX_MODEL_LEN, MODEL, metric_value
from tests.tiny_model import BLOCK, LINEAR_WEIGHTS, WEIGHTS


def test_models_lists_the_one_preloaded_model_without_its_local_path(cli_server: str) -> None:
    body = httpx.get(f"{cli_server}/v1/models", timeout=30).json()
    [m] = body["data"]
    assert (m["id"], m["kind"], m["state"], m["preload"]) == (MODEL, "generate", "loaded", True)
    assert (m["max_model_len"], m["message"], m["source"], m["idle_timeout_seconds"]) == (MAX_MODEL_LEN, "", "", None)
    # CPU: weights, the oneDNN-packed copies of the linear weights (at least as large; the
    # blocked layout may pad a little) and a 256 MiB pool capped at --max-num-seqs 1 x
    # --max-model-len (64 blocks of 16 tokens).
    pool = (MAX_MODEL_LEN // 16) * BLOCK
    assert WEIGHTS + LINEAR_WEIGHTS + pool <= m["bytes"] <= WEIGHTS + int(1.1 * LINEAR_WEIGHTS) + pool
    assert metric_value(cli_server, "kubeinfer_model_loaded_bytes", model_name=MODEL) == m["bytes"]
    assert httpx.get(f"{cli_server}/ready", timeout=30).status_code == 200


def test_other_names_are_404_naming_the_served_model_and_unload_is_refused(cli_server: str) -> None:
    r = httpx.post(f"{cli_server}/v1/completions", json={"model": "other", "prompt": "hi", "max_tokens": 1}, timeout=30)
    assert r.status_code == 404
    assert r.json()["error"]["message"] == f"The model 'other' does not exist; this server serves '{MODEL}'"
    r = httpx.post(f"{cli_server}/admin/models/{MODEL}/unload", timeout=30)
    assert r.status_code == 503 and "preloaded" in r.json()["error"]["message"]
