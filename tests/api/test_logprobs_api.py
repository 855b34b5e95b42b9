"""Logprobs through the official client and real uvicorn, against Hugging Face's log_softmax."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.api.conftest import MODEL


@pytest.fixture(scope="module")
def hf(model_dir):
    """Function token ids -> [len, V] float32 log_softmax of Hugging Face's logits at each position."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return run


def _tokenize(server, **body) -> list[int]:
    resp = httpx.post(f"{server.base_url}/tokenize", json={"model": MODEL, **body}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["tokens"]


def test_completion_logprobs_match_hf_and_have_openai_shape(client: openai.OpenAI, server, hf) -> None:
    prompt = "The quick brown fox"
    ids = _tokenize(server, prompt=prompt)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = out.choices[0].logprobs
    gen = [int(t.split(":")[1]) for t in lp.tokens]
    assert len(gen) == 6 and out.usage.completion_tokens == 6
    ref = hf(ids + gen)
    for i, tok in enumerate(gen):
        row = ref[len(ids) - 1 + i]
        assert lp.token_logprobs[i] == pytest.approx(row[tok].item(), abs=1e-3)
        top = lp.top_logprobs[i]
        assert f"token_id:{tok}" in top and len(top) <= 4
        want_top = {f"token_id:{t}": v for v, t in zip(*row.topk(3), strict=True)}
        for key, value in want_top.items():
            assert top[key] == pytest.approx(value.item(), abs=1e-3)
        assert max(top, key=top.get) == f"token_id:{tok}"  # greedy: the pick is the most likely
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_with_max_tokens_0_scores_the_prompt_like_lm_eval(client: openai.OpenAI, server, hf) -> None:
    """lm-eval's loglikelihood request: token-id prompt, echo, max_tokens 0, logprobs 1."""
    ids = _tokenize(server, prompt="Paris is the capital of France")
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = hf(ids)
    want = [ref[p - 1][ids[p]].item() for p in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-3)
    assert choice.text == httpx.post(f"{server.base_url}/detokenize", json={"model": MODEL, "tokens": ids},
                                     timeout=30).json()["prompt"]
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    assert choice.finish_reason == "length"
    # Echo with generation: prompt entries first, then the generated ones, offsets running over both.
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, echo=True, logprobs=0, temperature=0,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-3)
    assert lp.text_offset == sorted(lp.text_offset)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=ids, max_tokens=0)
    assert err.value.body["param"] == "max_tokens"


def test_streamed_completion_logprobs_equal_the_non_streamed(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2, echo=True,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].logprobs
    tokens, values, offsets = [], [], []
    for ch in client.completions.create(stream=True, **kwargs):
        for c in ch.choices:
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset
    assert values[0] is None and values[1:] == pytest.approx(whole.token_logprobs[1:], abs=1e-5)


def test_chat_logprobs_match_hf_streamed_and_not(client: openai.OpenAI, server, hf) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = _tokenize(server, messages=messages)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True,
                                                                     "return_tokens_as_token_ids": True})
    content = out.choices[0].logprobs.content
    gen = [int(e.token.split(":")[1]) for e in content]
    ref = hf(ids + gen)
    for i, e in enumerate(content):
        row = ref[len(ids) - 1 + i]
        assert e.logprob == pytest.approx(row[gen[i]].item(), abs=1e-3)
        assert [int(t.token.split(":")[1]) for t in e.top_logprobs] == row.topk(2).indices.tolist()
        assert e.bytes == list(e.token.encode())
    streamed = []
    for ch in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                             logprobs=True, top_logprobs=2, stream=True,
                                             extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}):
        for c in ch.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed += c.logprobs.content
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None
