"""/v1/embeddings against sentence-transformers, and the registry's admin routes, through the server."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
from kubeinfer_serving.models.builtin import builtin_embedding_model_dir

from tests.api.conftest import EMBED_MODEL, MODEL, ON_DEMAND_MODEL

TEXTS = ["The river ran past the old mill.", "A cat sleeps on the warm stones.", "Stock prices fell sharply today."]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """sentence-transformers' own embeddings of ``TEXTS`` (normalised, as the model's pipeline does)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(builtin_embedding_model_dir()), device="cpu")
    return model.encode(TEXTS, convert_to_numpy=True)


def test_embeddings_match_sentence_transformers(client: openai.OpenAI, reference: np.ndarray) -> None:
    resp = client.embeddings.create(model=EMBED_MODEL, input=TEXTS)  # the client asks for base64
    got = np.array([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)
    assert got.shape == reference.shape == (3, 384)
    np.testing.assert_allclose(got, reference, atol=1e-4)
    assert resp.usage.prompt_tokens > len(TEXTS) and resp.usage.total_tokens == resp.usage.prompt_tokens


def test_float_encoding_and_single_string_input(server, reference: np.ndarray) -> None:
    r = httpx.post(f"{server.base_url}/v1/embeddings",
                   json={"model": EMBED_MODEL, "input": TEXTS[1], "encoding_format": "float"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    np.testing.assert_allclose(np.array(body["data"][0]["embedding"]), reference[1], atol=1e-4)


def test_models_are_used_only_for_their_kind(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MODEL, input="hi")
    assert err.value.code == "model_not_supported"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=EMBED_MODEL, prompt="hi", max_tokens=2)
    assert err.value.code == "model_not_supported"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBED_MODEL, input=[])


def test_models_list_shows_the_catalogue_with_states(client: openai.OpenAI) -> None:
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert cards[MODEL]["kind"] == "generate" and cards[MODEL]["preload"] is True
    assert cards[EMBED_MODEL]["kind"] == "embed" and cards[EMBED_MODEL]["state"] == "loaded"
    assert cards[MODEL]["bytes"] > 0 and cards[MODEL]["max_model_len"] == 1024


def test_admin_load_and_unload_an_on_demand_model(server, client: openai.OpenAI) -> None:
    url = f"{server.base_url}/admin/models"
    r = httpx.post(f"{url}/{ON_DEMAND_MODEL}/load", timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "loaded" and r.json()["bytes"] > 0
    out = client.completions.create(model=ON_DEMAND_MODEL, prompt="hello", max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3
    r = httpx.post(f"{url}/{ON_DEMAND_MODEL}/unload", timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "unloaded" and r.json()["bytes"] == 0
    states = {m.id: m.model_extra["state"] for m in client.models.list().data}
    assert states[ON_DEMAND_MODEL] == "unloaded"
    # A request loads it again on demand.
    again = client.completions.create(model=ON_DEMAND_MODEL, prompt="hello", max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == out.choices[0].text


def test_admin_errors(server) -> None:
    url = f"{server.base_url}/admin/models"
    r = httpx.post(f"{url}/{MODEL}/unload", timeout=30)
    assert r.status_code == 503 and r.json()["error"]["message"]
    r = httpx.post(f"{url}/no-such-model/load", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
