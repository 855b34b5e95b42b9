"""LoRA adapters through a real uvicorn server and the official openai client.

The catalogue lists three PEFT adapters of the tiny model, plus four broken ones, under a base
with 2 LoRA slots: requests naming an adapter run on the base with it (greedy text equals
PEFT's merged model), more adapters than slots under concurrency are all served by the right
adapter, and broken adapters fail alone with their reason.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.registry.catalogue import parse_catalogue
from kubeinfer_serving.registry.manager import ModelRegistry
from safetensors.torch import load_file, save_file

from tests.api.conftest import ServerThread, metric_value
from tests.lora.peft_adapters import AdapterSpec, greedy, make_adapter

BASE = "tiny-base"
GOOD = ["qv-r8", "all-r4", "mlp-o-r16-rslora"]
PROMPT = [17, 4242, 99, 1000, 7, 512, 3071, 45]


@pytest.fixture(scope="module")
def bad_adapters(tiny_dir, adapter_dirs, tmp_path_factory):
    """Name -> directory of adapters that must fail, each for another reason."""
    root = tmp_path_factory.mktemp("bad-adapters")
    rank32 = make_adapter(tiny_dir, AdapterSpec("rank32", 9, 32, 32, ("q_proj",)), root / "rank32")
    corrupt = root / "corrupt"
    shutil.copytree(adapter_dirs["qv-r8"], corrupt)
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[:100])
    missing = root / "missing-target"
    shutil.copytree(adapter_dirs["qv-r8"], missing)
    tensors = load_file(missing / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".q_proj." not in k}, missing / "adapter_model.safetensors")
    shape = root / "other-shape"
    shutil.copytree(adapter_dirs["qv-r8"], shape)
    tensors = load_file(shape / "adapter_model.safetensors")
    save_file({k: (v[:, :128].contiguous() if "lora_A" in k else v) for k, v in tensors.items()},
              shape / "adapter_model.safetensors")
    return {"bad-rank32": rank32, "bad-corrupt": corrupt, "bad-missing-target": missing, "bad-shape": shape}


@pytest.fixture(scope="module")
def lora_server(tiny_dir, adapter_dirs, bad_adapters):
    adapters = [{"name": n, "source": adapter_dirs[n].as_uri()} for n in GOOD]
    adapters += [{"name": n, "source": p.as_uri()} for n, p in bad_adapters.items()]
    catalogue = parse_catalogue({
        "models": [{"name": BASE, "source": str(tiny_dir), "preload": True, "maxModelLen": 256, "adapters": adapters}],
        "maxLoras": 2, "maxLoraRank": 16, "maxNumSeqs": 16, "maxNumBatchedTokens": 256,
        "memoryBudgetBytes": 2 * 1024**3,
    })
    srv = ServerThread(create_app(ModelRegistry(catalogue, device="cpu"),
                                  settings=ServerSettings(host="127.0.0.1", port=0)))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(lora_server):
    return openai.OpenAI(base_url=f"{lora_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected_text(tiny, peft_models):
    """Adapter name (None: base) -> the text of PEFT's 10 greedy tokens after PROMPT."""
    tokenizer = tiny[2]
    return {n: tokenizer.decode(greedy(peft_models(n), PROMPT, 10)) for n in [None, *GOOD]}


def _complete(oai, model):
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0,
                               extra_body={"ignore_eos": True})
    return r.choices[0].text


def test_models_lists_adapters_with_parent_and_state(oai):
    cards = {m.id: m.model_dump() for m in oai.models.list().data}
    assert cards[BASE]["parent"] is None
    for name in GOOD:
        assert cards[name]["parent"] == BASE and cards[name]["state"] == "loaded" and cards[name]["bytes"] > 0
    reasons = {n: cards[n]["message"] for n in cards if n.startswith("bad-")}
    assert all(cards[n]["state"] == "failed" and cards[n]["parent"] == BASE for n in reasons)
    assert "rank 32" in reasons["bad-rank32"] and "maxLoraRank 16" in reasons["bad-rank32"]
    assert "corrupt adapter_model.safetensors" in reasons["bad-corrupt"]
    assert "['q_proj'] are listed" in reasons["bad-missing-target"]
    assert "do not fit the base model" in reasons["bad-shape"]


def test_router_reports_show_adapters_with_their_base(lora_server, oai):
    """The fleet router's sources (``/kubeinfer/load``, ``x-kubeinfer-resident``) list serving adapters."""
    report = httpx.get(f"{lora_server.base_url}/kubeinfer/load", timeout=30).json()
    by_id = {m["id"]: m for m in report["models"]}
    assert by_id[GOOD[0]]["parent"] == BASE and by_id[GOOD[0]]["tier"] == "device"
    assert by_id["bad-rank32"]["state"] == "failed" and by_id["bad-rank32"]["tier"] == "disk"
    assert by_id[BASE]["parent"] is None
    resident = httpx.get(f"{lora_server.base_url}/v1/models", timeout=30).headers["x-kubeinfer-resident"]
    assert resident.split(", ") == [BASE, *GOOD]
    assert {m.id: m.model_dump()["tier"] for m in oai.models.list().data}[GOOD[1]] == "device"


def test_a_request_naming_an_adapter_runs_the_base_with_it(oai, expected_text):
    for name in [BASE, *GOOD]:
        got = _complete(oai, name)
        assert got == expected_text[None if name == BASE else name], name
    chat = oai.chat.completions.create(model=GOOD[0], messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == GOOD[0] and chat.choices[0].message.content is not None


def test_more_adapters_than_slots_under_concurrency(oai, expected_text, lora_server):
    names = [BASE, *GOOD] * 4  # 3 adapters over 2 slots, 16 concurrent requests
    with ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(lambda n: _complete(oai, n), names))
    for name, text in zip(names, got, strict=True):
        assert text == expected_text[None if name == BASE else name], name
    assert metric_value(lora_server.base_url, "kubeinfer_lora_slot_evictions_total", model_name=BASE) > 0


def test_broken_adapters_fail_alone_with_their_reason(oai, expected_text):
    with pytest.raises(openai.APIStatusError) as err:
        _complete(oai, "bad-rank32")
    assert err.value.status_code == 503
    assert "rank 32" in json.dumps(err.value.body)
    with pytest.raises(openai.NotFoundError):
        _complete(oai, "no-such-adapter")
    assert _complete(oai, GOOD[1]) == expected_text[GOOD[1]]
    assert _complete(oai, BASE) == expected_text[None]
