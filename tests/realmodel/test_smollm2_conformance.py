"""SmolLM2-135M-Instruct through a real server and the official openai client, against transformers.

Greedy output must equal ``generate`` token for token; where it does not, the test reports the
reference's logit margin between the two tokens at the first divergence, and only a tie within
1e-4 (float32 summation order) is accepted.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.realmodel.conftest import MODEL

CHAT_PROMPTS = [
    "What is the capital of France?",
    "What is 2+3?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is the largest planet in the solar system?",
    "Translate 'good morning' into Spanish.",
    "Give me one tip for sleeping better.",
    "Who wrote Romeo and Juliet?",
    "What is 12 times 12?",
    "Explain what a noun is in one sentence.",
    "List the days of the week.",
    "What does a thermometer measure?",
]
COMPLETION_PROMPTS = [
    "The capital of Germany is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n",
    "1, 2, 3, 4, 5,",
    "The three states of matter are",
    "Water boils at a temperature of",
    "import numpy as np\n\n",
    "The quick brown fox",
    "In 1969, the first humans",
    "My favourite fruit is",
]
MAX_TOKENS = 24
EOS_ID = 2
TIE = 1e-4


def _ids(tokens: list[str]) -> list[int]:
    return [int(t.split(":", 1)[1]) for t in tokens]


def _serve_chat(client: openai.OpenAI, question: str) -> list[int]:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS, temperature=0,
        logprobs=True, extra_body={"return_tokens_as_token_ids": True})
    return _ids([c.token for c in out.choices[0].logprobs.content])


def _serve_completion(client: openai.OpenAI, prompt: str) -> list[int]:
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=1,
                                    extra_body={"return_tokens_as_token_ids": True})
    return _ids(out.choices[0].logprobs.tokens)


def _strip_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


def test_greedy_output_equals_transformers_generate_on_22_prompts(sclient: openai.OpenAI, reference, tokenize) -> None:
    """12 chat and 10 completion prompts, sent concurrently (the engine batches them)."""
    with ThreadPoolExecutor(8) as pool:
        chats = list(pool.map(lambda q: _serve_chat(sclient, q), CHAT_PROMPTS))
        completions = list(pool.map(lambda p: _serve_completion(sclient, p), COMPLETION_PROMPTS))
    cases = [(q, reference.chat_ids([{"role": "user", "content": q}]), got) for q, got in zip(CHAT_PROMPTS, chats, strict=True)]
    cases += [(p, tokenize(prompt=p), got) for p, got in zip(COMPLETION_PROMPTS, completions, strict=True)]
    assert tokenize(messages=[{"role": "user", "content": CHAT_PROMPTS[0]}]) == cases[0][1]
    problems = []
    for prompt, ids, got in cases:
        want = _strip_eos(reference.greedy(ids, MAX_TOKENS))
        got = _strip_eos(got)
        if got == want:
            continue
        i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
        if i >= min(len(got), len(want)):
            problems.append(f"{prompt!r}: lengths differ ({len(got)} served vs {len(want)})")
            continue
        logits = reference.logits(ids + want[:i])
        margin = float(logits[want[i]] - logits[got[i]])
        if margin > TIE:
            problems.append(f"{prompt!r}: token {i} is {got[i]}, transformers chose {want[i]} "
                            f"(logit margin {margin:.3g})")
    assert not problems, "\n".join(problems)
    assert sum(len(_strip_eos(c)) for c in chats + completions) > 200  # the prompts produce real text


def test_completion_logprobs_equal_transformers_log_softmax(sclient: openai.OpenAI, reference, tokenize) -> None:
    prompt = "The capital of France is"
    ids = tokenize(prompt=prompt)
    out = sclient.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=5,
                                     extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = out.choices[0].logprobs
    gen = _ids(lp.tokens)
    ref = reference.log_softmax(ids + gen)
    for i, tok in enumerate(gen):
        row = ref[len(ids) - 1 + i]
        assert lp.token_logprobs[i] == pytest.approx(row[tok].item(), abs=1e-4)
        values, top_ids = row.topk(5)
        for v, t in zip(values.tolist(), top_ids.tolist(), strict=True):
            assert lp.top_logprobs[i][f"token_id:{t}"] == pytest.approx(v, abs=1e-4)
    # Prompt scoring (echo, max_tokens 0) too: every prompt token after the first.
    echo = sclient.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1).choices[0]
    for i in range(1, len(ids)):
        assert echo.logprobs.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)


def test_streaming_equals_non_streaming(sclient: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    whole = sclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    parts = [c.choices[0].delta.content or "" for c in sclient.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == whole.choices[0].message.content and len(parts) > 5
    whole = sclient.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=0)
    parts = [c.choices[0].text for c in sclient.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == whole.choices[0].text


def test_chat_stops_at_im_end(sclient: openai.OpenAI, reference) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = sclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=100, temperature=0,
                                          logprobs=True, extra_body={"return_tokens_as_token_ids": True})
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert "<|im_end|>" not in choice.message.content and "<|im_start|>" not in choice.message.content
    assert _ids([c.token for c in choice.logprobs.content])[-1] == EOS_ID
    assert reference.tok.convert_ids_to_tokens(EOS_ID) == "<|im_end|>"
    assert out.usage.completion_tokens < 100


@pytest.mark.parametrize(("question", "answer"), [
    ("What is the capital of France?", "Paris"),
    ("What is 2+3?", "5"),
    ("What is 10 + 10?", "20"),
])
def test_known_answers(sclient: openai.OpenAI, question: str, answer: str) -> None:
    out = sclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          max_tokens=60, temperature=0)
    assert answer in out.choices[0].message.content


def test_json_schema_request_returns_valid_json_with_the_fields(sclient: openai.OpenAI) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["country", "capital"],
              "properties": {"country": {"type": "string", "minLength": 1, "maxLength": 30},
                             "capital": {"type": "string", "minLength": 1, "maxLength": 30}}}
    out = sclient.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give the country France and its capital as JSON."}],
        max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
    data = json.loads(out.choices[0].message.content)
    assert set(data) == {"country", "capital"} and all(isinstance(v, str) and v.strip() for v in data.values())
    assert "Paris" in data["capital"]


def test_tool_choice_required_returns_a_well_formed_call(sclient: openai.OpenAI) -> None:
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                       "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 40}}}}}
    out = sclient.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[weather],
        tool_choice="required", parallel_tool_calls=False, max_tokens=80, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city"} and args["city"].strip()


def test_models_lists_smollm2_with_its_real_size(smollm2_server) -> None:
    [m] = httpx.get(f"{smollm2_server.base_url}/v1/models", timeout=30).json()["data"]
    assert (m["id"], m["state"], m["max_model_len"]) == (MODEL, "loaded", 1024)
    # 134.5 M float32 parameters (tied embeddings stored once) plus the oneDNN-packed projections.
    assert m["bytes"] > 134_500_000 * 4
