"""The built-in tiny model: deterministic from its seed and loadable by plain Hugging Face."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path

import pytest
import torch
from kubeinfer_serving.models import builtin
from kubeinfer_serving.models.build_tiny import (
    BOS_ID,
    EOS_ID,
    EOT_ID,
    PAD_ID,
    build_tiny_model,
    main,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tiny_seed0: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert main(["--out", str(again), "--seed", "0"]) == 0
    first, second = _digests(tiny_seed0), _digests(again)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(first)
    assert first == second


def test_different_seed_changes_weights_not_tokenizer(tiny_seed0: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "seed1", seed=1)
    w0, w1 = load_file(tiny_seed0 / "model.safetensors"), load_file(other / "model.safetensors")
    assert w0.keys() == w1.keys()
    assert not torch.equal(w0["model.embed_tokens.weight"], w1["model.embed_tokens.weight"])
    assert not torch.equal(w0["lm_head.weight"], w1["lm_head.weight"])
    assert (tiny_seed0 / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_hugging_face_loads_and_generates(tiny_seed0: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_seed0, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tiny_seed0, local_files_only=True)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.dtype == torch.float32
    assert len(tok) == model.config.vocab_size == 8192
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert model.generation_config.eos_token_id == [EOS_ID, EOT_ID]

    text = "The harbour was quiet in the early morning."
    ids = tok(text).input_ids
    assert ids[0] == BOS_ID and len(ids) < len(text) // 2  # trained merges, not bytes
    assert tok.decode(ids, skip_special_tokens=True) == text

    model.generation_config.eos_token_id = None
    for prompt in ["The harbour was", "def fibonacci(n):", "Q: Why is the sky blue?"]:
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)[0, enc.input_ids.shape[1]:]
        assert len(set(out.tolist())) > 4, f"greedy output degenerates for {prompt!r}: {out.tolist()}"
        with torch.no_grad():
            logits = model(**enc).logits[0, -1]
        top2 = torch.topk(logits, 2).values
        assert float(top2[0] - top2[1]) > 1e-3, "greedy pick is a near-tie"


def test_chat_template_renders_llama3_layout(tiny_seed0: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_seed0, local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1 and ids.count(EOT_ID) == 2


def test_ensure_builtin_model_builds_once_and_survives_a_race(
    tiny_seed0: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(builtin.MODEL_CACHE_ENV, str(tmp_path / "cache"))
    both_building = threading.Barrier(2)
    builds: list[Path] = []

    def copy_build(out: Path, seed: int) -> Path:
        # Both racers finish building before either renames: the loser must keep the winner's copy.
        shutil.copytree(tiny_seed0, out, dirs_exist_ok=True)
        builds.append(out)
        both_building.wait(timeout=30)
        return out

    monkeypatch.setattr(builtin, "build_tiny_model", copy_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(builtin.ensure_builtin_model())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 2 and len(results) == 2
    final = results[0]
    assert results[1] == final and final.parent == tmp_path / "cache"
    assert final.name.startswith("tiny-llama-v") and final.name.endswith("-seed0")
    assert _digests(final) == _digests(tiny_seed0)
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # temporary copies removed
    assert builtin.ensure_builtin_model() == final and len(builds) == 2  # cached: no third build


def test_builtin_embedding_model_dir_has_sentence_transformers_files() -> None:
    path = builtin.builtin_embedding_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        assert (path / name).is_file(), name
