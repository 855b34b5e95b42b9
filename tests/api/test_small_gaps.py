"""vLLM's smaller API pieces: ``/tokenizer_info``, embeddings ``dimensions`` / ``normalize``, CORS."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.models.builtin import builtin_embedding_model_dir
from kubeinfer_serving.registry.catalogue import Catalogue, ModelEntry
from kubeinfer_serving.registry.manager import ModelRegistry
from kubeinfer_serving.registry.protocol import ModelKind
from transformers import AutoTokenizer

from tests.api.conftest import EMBED_MODEL, MAX_MODEL_LEN, MODEL, ServerThread

TEXTS = ["the cat sat on the mat", "stock markets fell sharply today"]
MATRYOSHKA = "minilm-matryoshka"
ORIGIN = "https://app.example"


def test_tokenizer_info_serves_lm_evals_remote_tokenizer(server, model_dir: Path) -> None:
    """lm-eval's ``RemoteTokenizer`` reads ``eos_token``/``bos_token``/``chat_template`` from
    ``/tokenizer_info`` and finds the ids with ``/tokenize`` (``add_special_tokens: false``)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    resp = httpx.get(f"{server.base_url}/tokenizer_info", params={"model": MODEL}, timeout=30)
    assert resp.status_code == 200, resp.text
    info = resp.json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["chat_template"] == tok.chat_template
    assert info["tokenizer_class"] and info["model_max_length"] == tok.model_max_length
    assert str(model_dir) not in resp.text and "name_or_path" not in info  # no local paths
    for text, expected in ((info["eos_token"], tok.eos_token_id), (info["bos_token"], tok.bos_token_id)):
        ids = httpx.post(f"{server.base_url}/tokenize", timeout=30, json={
            "model": MODEL, "prompt": text, "add_special_tokens": False}).json()["tokens"]
        assert ids == [expected]
    # Several generative models and no ``model``: 400 naming it, as /tokenize answers.
    resp = httpx.get(f"{server.base_url}/tokenizer_info", timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"


def _embed(base_url: str, model: str, **extra) -> tuple[int, dict]:
    resp = httpx.post(f"{base_url}/v1/embeddings", timeout=60,
                      json={"model": model, "input": TEXTS, "encoding_format": "float", **extra})
    return resp.status_code, resp.json()


def _vectors(body: dict) -> np.ndarray:
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float64)


def test_normalize_and_dimensions_on_a_fixed_size_model(server) -> None:
    status, default = _embed(server.base_url, EMBED_MODEL)
    assert status == 200
    _, on = _embed(server.base_url, EMBED_MODEL, normalize=True)
    _, off = _embed(server.base_url, EMBED_MODEL, normalize=False)
    raw, unit = _vectors(off), _vectors(on)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    assert np.allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=1e-5)
    assert np.allclose(_vectors(default), unit, atol=1e-6)  # all-MiniLM's pipeline normalises
    dim = raw.shape[1]
    status, same = _embed(server.base_url, EMBED_MODEL, dimensions=dim)
    assert status == 200 and np.allclose(_vectors(same), unit, atol=1e-6)
    status, err = _embed(server.base_url, EMBED_MODEL, dimensions=64)
    assert status == 400 and err["error"]["param"] == "dimensions" and "Matryoshka" in err["error"]["message"]


@pytest.fixture(scope="module")
def matryoshka_server(tmp_path_factory) -> Iterator[ServerThread]:
    """The built-in embedding model, marked as Matryoshka-trained (``matryoshka_dimensions``),
    behind a server whose pages from :data:`ORIGIN` may call it (CORS)."""
    d = tmp_path_factory.mktemp("matryoshka") / "model"
    shutil.copytree(builtin_embedding_model_dir(), d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [384, 128, 64]}))
    catalogue = Catalogue(models=[
        ModelEntry(name=MATRYOSHKA, source=str(d), kind=ModelKind.EMBED, preload=True),
        ModelEntry(name=MODEL, source=f"builtin://{MODEL}", preload=True, max_model_len=MAX_MODEL_LEN)],
        max_num_seqs=2, memory_budget_bytes=2 * 1024**3)
    srv = ServerThread(create_app(ModelRegistry(catalogue, device="cpu"),
                                  settings=ServerSettings(host="127.0.0.1", port=0, allowed_origins=(ORIGIN,))))
    srv.start()
    yield srv
    srv.stop()


def test_matryoshka_dimensions_truncate_and_renormalise(matryoshka_server: ServerThread) -> None:
    base = matryoshka_server.base_url
    _, off = _embed(base, MATRYOSHKA, normalize=False)
    raw = _vectors(off)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    out = client.embeddings.create(model=MATRYOSHKA, input=TEXTS, dimensions=64)  # the client's base64 path
    short = np.array([d.embedding for d in out.data])
    expected = raw[:, :64] / np.linalg.norm(raw[:, :64], axis=1, keepdims=True)
    assert short.shape == (2, 64) and np.allclose(short, expected, atol=1e-5)
    status, kept = _embed(base, MATRYOSHKA, dimensions=128, normalize=False)
    assert status == 200 and np.allclose(_vectors(kept), raw[:, :128], atol=1e-5)
    for bad in (100, 500):
        status, err = _embed(base, MATRYOSHKA, dimensions=bad)
        assert status == 400 and err["error"]["param"] == "dimensions", err


def test_cors_for_allowed_origins(matryoshka_server: ServerThread, server) -> None:
    base = matryoshka_server.base_url
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    resp = httpx.options(f"{base}/v1/chat/completions", headers=preflight, timeout=10)
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in resp.headers["access-control-allow-headers"].lower()
    resp = httpx.post(f"{base}/v1/chat/completions", headers={"Origin": ORIGIN}, timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in resp.headers["access-control-expose-headers"].lower()
    # Another origin gets no CORS grant; a server without --allowed-origins grants none.
    other = httpx.options(f"{base}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    plain = httpx.options(f"{server.base_url}/v1/chat/completions", headers=preflight, timeout=10)
    assert "access-control-allow-origin" not in plain.headers


def test_openapi_documents_the_bearer_scheme(server) -> None:
    """FastAPI's ``HTTPBearer`` scheme is in the document, so ``/docs`` offers "Authorize"."""
    doc = httpx.get(f"{server.base_url}/openapi.json", timeout=30).json()
    schemes = doc["components"]["securitySchemes"]
    assert list(schemes.values()) == [{"type": "http", "scheme": "bearer",
                                       "description": schemes[next(iter(schemes))]["description"]}]
    name = next(iter(schemes))
    assert doc["paths"]["/v1/chat/completions"]["post"]["security"] == [{name: []}]
    assert doc["paths"]["/v1/responses"]["post"]["security"] == [{name: []}]
    assert "security" not in doc["paths"]["/health"]["get"]
