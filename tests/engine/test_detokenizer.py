"""Incremental detokenization (``tokenizers.decoders.DecodeStream``) gives the text a whole decode gives."""

from __future__ import annotations

import pytest
from kubeinfer_serving.engine.detokenizer import IncrementalDetokenizer
from kubeinfer_serving.models.builtin import builtin_embedding_model_dir, ensure_builtin_model
from transformers import AutoTokenizer

TEXTS = ["Hello wörld, 日本語のテキスト and an emoji 🎉🎉!", "  leading spaces\tand\nnew lines  ",
         "naïve café — «quotes» ∑ x² ≤ ∞"]


@pytest.fixture(scope="module", params=["tiny-llama", "all-minilm-l6-v2"])
def tokenizer(request):
    path = ensure_builtin_model() if request.param == "tiny-llama" else builtin_embedding_model_dir()
    return AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_text_equals_a_whole_decode(tokenizer, text: str) -> None:
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    out = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt, [])
    assert detok._stream is not None  # the fast tokenizer's DecodeStream path
    pieces = []
    for tid in out:
        detok.add_tokens([tid])
        pieces.append(detok.take_delta(False))
    pieces.append(detok.take_delta(True))
    context = prompt[-5:]
    whole = tokenizer.decode(context + out, skip_special_tokens=True)
    expected = whole[len(tokenizer.decode(context, skip_special_tokens=True)):]
    assert "".join(pieces) == detok.text == expected
    assert not any("\ufffd" in p for p in pieces)  # no half characters on the way


def test_stop_strings_cut_the_streamed_text(tokenizer) -> None:
    out = tokenizer.encode("alpha beta gamma delta", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], ["gamma"])
    for tid in out:
        detok.add_tokens([tid])
        if detok.stopped:
            break
    assert detok.stopped and detok.text.rstrip() == "alpha beta"
