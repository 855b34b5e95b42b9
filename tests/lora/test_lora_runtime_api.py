"""vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, admin keys, and the LoRA metrics,
through a real uvicorn server with the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.api.tenancy import ADMIN_API_KEYS_ENV, API_KEYS_ENV, KeyStore
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.registry.catalogue import parse_catalogue
from kubeinfer_serving.registry.manager import ModelRegistry

from tests.api.conftest import ServerThread, metric_value
from tests.lora.peft_adapters import greedy

BASE = "tiny-runtime"
PROMPT = [88, 1234, 5, 777, 4000, 12]
ADMIN, USER = "sk-admin-lora", "sk-user-lora"


@pytest.fixture(scope="module")
def runtime_server(tiny_dir):
    catalogue = parse_catalogue({
        "models": [{"name": BASE, "source": str(tiny_dir), "maxModelLen": 256}],
        "enableLora": True, "maxLoras": 1, "maxLoraRank": 8, "maxNumSeqs": 8, "memoryBudgetBytes": 2 * 1024**3,
    })
    keys = KeyStore.load(env={ADMIN_API_KEYS_ENV: ADMIN, API_KEYS_ENV: USER})
    srv = ServerThread(create_app(ModelRegistry(catalogue, device="cpu"),
                                  settings=ServerSettings(host="127.0.0.1", port=0), keys=keys))
    srv.start()
    yield srv
    srv.stop()


def _post(srv, path, body, key=ADMIN):
    return httpx.post(f"{srv.base_url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _text(oai, model):
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].text


def test_load_use_evict_reload_and_unload_an_adapter(runtime_server, adapter_dirs, peft_models, tiny):
    srv = runtime_server
    oai = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key=USER, max_retries=0, timeout=120)
    tokenizer = tiny[2]
    want = {n: tokenizer.decode(greedy(peft_models(n), PROMPT, 8)) for n in ("qv-r8", "all-r4")}

    refused = _post(srv, "/v1/load_lora_adapter", {"lora_name": "qv", "lora_path": str(adapter_dirs["qv-r8"])},
                    key=USER)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
    for name, spec in (("qv", "qv-r8"), ("all", "all-r4")):
        r = _post(srv, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": adapter_dirs[spec].as_uri()})
        assert r.status_code == 200 and r.text == f"Success: LoRA adapter '{name}' added successfully."
    again = _post(srv, "/v1/load_lora_adapter", {"lora_name": "qv", "lora_path": str(adapter_dirs["qv-r8"])})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    too_big = _post(srv, "/v1/load_lora_adapter",
                    {"lora_name": "big", "lora_path": str(adapter_dirs["mlp-o-r16-rslora"])})
    assert too_big.status_code == 400 and "exceeds maxLoraRank 8" in too_big.json()["error"]["message"]

    cards = {m.id: m.model_dump() for m in oai.models.list().data}
    assert cards["qv"]["parent"] == BASE and cards["qv"]["state"] == "loaded" and "big" not in cards
    assert _text(oai, "qv") == want["qv-r8"] and _text(oai, "all") == want["all-r4"] and _text(oai, "qv") == \
        want["qv-r8"]
    # One slot for two adapters: each switch wrote a slot; the second and third displaced one.
    assert metric_value(srv.base_url, "kubeinfer_lora_slot_loads_total", model_name=BASE) == 3
    assert metric_value(srv.base_url, "kubeinfer_lora_slot_evictions_total", model_name=BASE) == 2
    assert metric_value(srv.base_url, "kubeinfer_lora_requests_running", model_name=BASE, lora_name="qv") == 0

    # Evicting the base model does not lose adapters added at run time: its next load reads them again.
    assert _post(srv, f"/admin/models/{BASE}/unload", {}).status_code == 200
    assert {m.id: m.state for m in oai.models.list().data}["qv"] == "unloaded"
    assert _text(oai, "all") == want["all-r4"]

    r = _post(srv, "/v1/unload_lora_adapter", {"lora_name": "all"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'all' removed successfully."
    with pytest.raises(openai.NotFoundError):
        _text(oai, "all")
    assert _post(srv, "/v1/unload_lora_adapter", {"lora_name": "all"}).status_code == 404
    assert _text(oai, "qv") == want["qv-r8"]
