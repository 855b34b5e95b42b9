"""Fixtures of the real-model tier (marker ``realmodel``): SmolLM2-135M-Instruct, built once per
machine into the model cache (:mod:`kubeinfer_serving.models.smollm2`), served by a real uvicorn
server over the production registry on CPU float32, and transformers' own model of the same
directory as the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import torch
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.models.builtin import BUILTIN_CHAT_MODEL_NAME, builtin_model_dir
from kubeinfer_serving.registry.catalogue import Catalogue, ModelEntry
from kubeinfer_serving.registry.manager import ModelRegistry

from tests.api.conftest import ServerThread

MODEL = BUILTIN_CHAT_MODEL_NAME
#: Context of the test server (tokens): room for every prompt and answer here.
MAX_MODEL_LEN = 1024


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in this directory carries the ``realmodel`` marker."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.realmodel)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The built SmolLM2 directory (downloaded and converted on the machine's first run, then cached)."""
    return builtin_model_dir(MODEL)


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir: Path) -> Iterator[ServerThread]:
    """SmolLM2 preloaded by the registry (8 sequences, 1024-token context) behind one uvicorn server."""
    catalogue = Catalogue(models=[ModelEntry(name=MODEL, source=f"builtin://{MODEL}", preload=True,
                                             max_model_len=MAX_MODEL_LEN)],
                          max_num_seqs=8, max_num_batched_tokens=1024, memory_budget_bytes=4 * 1024**3)
    srv = ServerThread(create_app(ModelRegistry(catalogue, device="cpu"),
                                  settings=ServerSettings(host="127.0.0.1", port=0)))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def sclient(smollm2_server: ServerThread) -> openai.OpenAI:
    """The official OpenAI client on the SmolLM2 server (no retries)."""
    return openai.OpenAI(base_url=f"{smollm2_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


class Reference:
    """transformers' SmolLM2 (float32, CPU) and tokenizer from the same directory."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt ids of ``messages`` under the model's chat template (generation prompt added)."""
        return list(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """``generate`` greedy continuation, stopping after EOS like the server does."""
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        return out[0, len(ids):].tolist()

    def log_softmax(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] float32 log-probabilities of the next token at each position."""
        with torch.inference_mode():
            return self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    def logits(self, ids: list[int]) -> torch.Tensor:
        """[vocab] float32 logits of the token after ``ids``."""
        with torch.inference_mode():
            return self.model(torch.tensor([ids])).logits[0, -1].float()


@pytest.fixture(scope="session")
def reference(smollm2_dir: Path) -> Reference:
    """transformers' model of the built directory: what the server must reproduce."""
    return Reference(smollm2_dir)


@pytest.fixture(scope="session")
def tokenize(smollm2_server: ServerThread) -> Callable[..., list[int]]:
    """The server's ``/tokenize`` (the ids its engine sees)."""
    import httpx

    def run(**body) -> list[int]:
        r = httpx.post(f"{smollm2_server.base_url}/tokenize", json={"model": MODEL, **body}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    return run
