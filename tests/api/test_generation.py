"""Completions, chat completions and streaming through a real server, driven by the openai client."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.api.conftest import MODEL, metric_value

PROMPT = "The river ran past the old mill and"


@pytest.fixture(scope="module")
def hf(model_dir: Path):
    """Hugging Face's own model and tokenizer for the same directory: the reference for greedy output."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # ignore_eos: exactly max_new_tokens tokens
    return tok, model


def hf_greedy(hf, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation by ``transformers`` ``generate``, decoded without special tokens."""
    tok, model = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, len(prompt_ids):].tolist(), skip_special_tokens=True)


def test_models_list_names_the_builtin_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert MODEL in ids
    card = next(m for m in models.data if m.id == MODEL)
    assert card.object == "model" and card.owned_by == "kubeinfer"
    assert card.model_extra["state"] == "loaded" and card.model_extra["kind"] == "generate"
    assert client.models.retrieve(MODEL).id == MODEL


def test_greedy_completion_matches_hf_generate(client: openai.OpenAI, hf) -> None:
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    prompt_ids = hf[0].encode(PROMPT)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].text == hf_greedy(hf, prompt_ids, 24)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == 24
    assert resp.usage.total_tokens == len(prompt_ids) + 24


def test_greedy_chat_matches_hf_generate_on_the_chat_template(client: openai.OpenAI, hf) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me of the mill."}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20, temperature=0,
                                          extra_body={"ignore_eos": True})
    prompt_ids = hf[0].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == hf_greedy(hf, prompt_ids, 20)
    assert resp.usage.prompt_tokens == len(prompt_ids) and resp.usage.completion_tokens == 20


def test_several_prompts_and_token_ids_give_one_choice_each(client: openai.OpenAI, hf) -> None:
    other = "Once upon a time"
    single = client.completions.create(model=MODEL, prompt=other, max_tokens=8, temperature=0)
    multi = client.completions.create(model=MODEL, prompt=[PROMPT, other], max_tokens=8, temperature=0)
    assert [c.index for c in multi.choices] == [0, 1]
    assert multi.choices[1].text == single.choices[0].text
    ids = client.completions.create(model=MODEL, prompt=hf[0].encode(other), max_tokens=8, temperature=0)
    assert ids.choices[0].text == single.choices[0].text
    assert multi.usage.prompt_tokens == len(hf[0].encode(PROMPT)) + len(hf[0].encode(other))


def test_n_choices_with_a_seed_are_reproducible(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, n=2, seed=7,
                  extra_body={"ignore_eos": True})
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 24


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:][:3]
    assert stop.strip(), "need a visible stop string"
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == full[: full.index(stop)]


def test_streamed_completion_equals_the_plain_one_and_ends_with_usage(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == plain.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_streamed_chat_starts_with_the_role_and_matches_the_plain_reply(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Sing of the river."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_sse_wire_format_ends_with_done(server) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_tokens_arrive_while_the_request_is_still_running(server) -> None:
    """The first chunk reaches the client while the server still generates the rest."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text"' in first
        assert metric_value(server.base_url, "kubeinfer_num_requests_running", model_name=MODEL) >= 1
        received = 1
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                received += 1
                if received >= 10:
                    break
        # Still mid-generation after ten chunks: the stream is incremental, not one buffered body.
        assert metric_value(server.base_url, "kubeinfer_num_requests_running", model_name=MODEL) == 1
