"""The embedding runner against sentence-transformers on the built-in all-MiniLM-L6-v2."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from kubeinfer_serving.embeddings import Embedder, read_pooling_config
from kubeinfer_serving.models.builtin import builtin_embedding_model_dir
from kubeinfer_serving.models.loader import ModelLoadError, UnsupportedModelError

TEXTS = [
    "a cat sat on the mat",
    "a kitten rested on the rug",
    "stock prices fell sharply",
    "The quick brown fox jumps over the lazy dog. " * 8,
    "Kubernetes schedules pods onto nodes.",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return builtin_embedding_model_dir()


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    return st.encode(TEXTS, convert_to_numpy=True)


@pytest.fixture
async def embedder(model_dir: Path):
    emb = Embedder.from_model_dir(model_dir, device="cpu", name="minilm")
    yield emb
    await emb.shutdown()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


async def test_matches_sentence_transformers(embedder: Embedder, reference: np.ndarray) -> None:
    vectors, tokens = await embedder.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    assert np.all(1 - cosine(vectors, reference) < 1e-5)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)  # Normalize module applied
    expected = sum(len(ids) for ids in embedder.tokenizer(TEXTS)["input_ids"])
    assert tokens == expected


async def test_similar_sentences_are_closer(embedder: Embedder) -> None:
    (cat, kitten, stocks), _ = await embedder.embed(TEXTS[:3])
    assert cosine(cat, kitten) > cosine(cat, stocks) + 0.3
    assert cosine(cat, kitten) > cosine(kitten, stocks) + 0.3


async def test_concurrent_callers_are_batched_and_get_their_own_rows(
    embedder: Embedder, reference: np.ndarray
) -> None:
    results = await asyncio.gather(*(embedder.embed([t]) for t in TEXTS))
    assert embedder.num_forwards < len(TEXTS)
    for (vec, n), ref, text in zip(results, reference, TEXTS, strict=True):
        assert 1 - cosine(vec[0], ref) < 1e-5
        assert n == len(embedder.tokenizer(text)["input_ids"])


async def test_token_id_input_equals_text_input(embedder: Embedder) -> None:
    ids = embedder.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    (from_ids,), n = await embedder.embed([ids])
    (from_text,), _ = await embedder.embed([TEXTS[0]])
    assert n == len(ids) + 2  # [CLS] ... [SEP]
    assert np.allclose(from_ids, from_text, atol=1e-6)


async def test_bad_inputs_raise_value_error(embedder: Embedder) -> None:
    with pytest.raises(ValueError, match="more than the model"):
        await embedder.embed(["word " * 400])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        await embedder.embed([[1, 2, 10**9]])
    with pytest.raises(ValueError, match="empty"):
        await embedder.embed([])


async def test_shutdown_refuses_new_work(model_dir: Path) -> None:
    emb = Embedder.from_model_dir(model_dir, device="cpu")
    assert 80_000_000 < emb.memory_bytes < 100_000_000  # 22.7M float32 parameters
    await emb.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        await emb.embed(["hello"])


def test_pooling_config_from_modules_json(model_dir: Path, tmp_path: Path) -> None:
    cfg = read_pooling_config(model_dir)
    assert (cfg.mode, cfg.normalize, cfg.max_seq_length) == ("mean", True, 256)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert read_pooling_config(plain).mode == "mean" and not read_pooling_config(plain).normalize
    dense = tmp_path / "dense"
    shutil.copytree(model_dir, dense)
    modules = json.loads((dense / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModelError, match="Dense"):
        read_pooling_config(dense)


def test_corrupt_weights_fail_with_the_file_name(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"bad/model\.safetensors"):
        Embedder.from_model_dir(bad, device="cpu")
