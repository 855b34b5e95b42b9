"""The request-field policy (vLLM's): implemented, refused because ignoring would change the output, or ignored.

OpenAI's field lists come from the installed ``openai`` package's request types; vLLM's are
its ``CompletionRequest`` / ``ChatCompletionRequest`` fields (vllm/entrypoints/openai/protocol.py),
written out here since vLLM is not a dependency. Each field is sent with a value that asks
for something; the answer must match this file's classification: 200 for implemented fields
(each has a behaviour test elsewhere), 400 with ``param`` = the field for fields whose loss
would change the output, and 200 naming the field in ``x-kubeinfer-ignored-fields`` (and
counting it in ``kubeinfer_ignored_request_fields_total``) for the others. guidellm's streamed
requests (``stream_options.continuous_usage_stats``) are reproduced as guidellm sends them.
"""

from __future__ import annotations

import json
import logging
import uuid

import httpx
import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from tests.api.conftest import EMBED_MODEL, MODEL, metric_value

VLLM_COMPLETION = [
    "model", "prompt", "prompt_embeds", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
    "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature",
    "top_p", "user", "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "allowed_token_ids", "prompt_logprobs", "add_special_tokens", "response_format",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "priority", "request_id", "logits_processors", "return_tokens_as_token_ids",
    "cache_salt", "kv_transfer_params", "vllm_xargs", "structured_outputs",
]
VLLM_CHAT = [
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
    "max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop", "stream", "stream_options",
    "temperature", "top_p", "tools", "tool_choice", "reasoning_effort", "include_reasoning", "parallel_tool_calls",
    "user", "best_of", "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "prompt_logprobs", "allowed_token_ids", "bad_words", "echo", "add_generation_prompt",
    "continue_final_message", "add_special_tokens", "documents", "chat_template", "chat_template_kwargs",
    "mm_processor_kwargs", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structural_tag",
    "guided_decoding_backend", "guided_whitespace_pattern", "priority", "request_id", "logits_processors",
    "return_tokens_as_token_ids", "cache_salt", "kv_transfer_params", "vllm_xargs", "structured_outputs",
]
OPENAI_COMPLETION = sorted(set(completion_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"})
OPENAI_CHAT = sorted(set(chat_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"})

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

#: A value asking for something, per field.
SAMPLES = {
    "audio": {"voice": "alloy", "format": "mp3"}, "function_call": "auto", "functions": [TOOL["function"]],
    "metadata": {"k": "v"}, "modalities": ["text", "audio"], "moderation": {"model": "x"},
    "prediction": {"type": "content", "content": "x"}, "prompt_cache_key": "k", "prompt_cache_options": {"x": 1},
    "prompt_cache_retention": "24h", "reasoning_effort": "low", "safety_identifier": "s", "service_tier": "flex",
    "store": True, "verbosity": "low", "web_search_options": {"search_context_size": "low"},
    "prompt_embeds": "AAAA", "best_of": 2, "echo": True, "frequency_penalty": 0.5, "logit_bias": {"7": 1.0},
    "max_tokens": 3, "max_completion_tokens": 3, "n": 2, "presence_penalty": 0.5, "seed": 1, "stop": ["zz"],
    "stream": True, "stream_options": {"include_usage": True}, "suffix": "x", "temperature": 0.5, "top_p": 0.9,
    "user": "u", "use_beam_search": True, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2,
    "length_penalty": 0.5, "stop_token_ids": [7], "include_stop_str_in_output": True, "ignore_eos": True,
    "min_tokens": 1, "skip_special_tokens": False, "spaces_between_special_tokens": False,
    "truncate_prompt_tokens": 2, "allowed_token_ids": [7, 8, 9], "prompt_logprobs": 1,
    "response_format": {"type": "json_object"}, "guided_json": {"type": "object"}, "guided_regex": "[a-z]+",
    "guided_choice": ["a", "b"], "guided_grammar": 'start: "a"', "guided_decoding_backend": "llguidance",
    "guided_whitespace_pattern": " ", "priority": 1, "request_id": "r", "logits_processors": ["m.P"],
    "return_tokens_as_token_ids": True, "cache_salt": "salt", "kv_transfer_params": {"x": 1},
    "vllm_xargs": {"x": 1}, "structured_outputs": {"choice": ["a", "b"]}, "tools": [TOOL], "tool_choice": "none",
    "include_reasoning": False, "parallel_tool_calls": False, "top_logprobs": 2, "bad_words": ["the"],
    "add_generation_prompt": False, "continue_final_message": True, "documents": [{"title": "t", "text": "x"}],
    "chat_template": "{{ messages }}", "chat_template_kwargs": {"flag": True}, "mm_processor_kwargs": {"x": 1},
    "structural_tag": "{}", "add_special_tokens": "flip",
}
#: Fields that only make sense with another one.
COMPANIONS = {
    "top_logprobs": {"logprobs": True}, "stream_options": {"stream": True},
    "continue_final_message": {"add_generation_prompt": False}, "best_of": {"n": 1},
}
BASE = {"completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
        "chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
ADD_SPECIAL_DEFAULT = {"completions": True, "chat/completions": False}

IMPLEMENTED = {
    "completions": {
        "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty", "seed", "stop",
        "stream", "stream_options", "temperature", "top_p", "user", "top_k", "min_p", "repetition_penalty",
        "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
        "allowed_token_ids", "bad_words", "response_format", "guided_json", "guided_regex", "guided_choice",
        "guided_grammar", "guided_decoding_backend", "return_tokens_as_token_ids", "structured_outputs", "cache_salt",
    },
    "chat/completions": {
        "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens", "max_completion_tokens", "n",
        "presence_penalty", "response_format", "seed", "stop", "stream", "stream_options", "temperature", "top_p",
        "tools", "tool_choice", "parallel_tool_calls", "user", "top_k", "min_p", "repetition_penalty",
        "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
        "allowed_token_ids", "bad_words", "echo", "add_generation_prompt", "continue_final_message",
        "chat_template_kwargs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
        "guided_decoding_backend", "return_tokens_as_token_ids", "structured_outputs", "cache_salt",
    },
}
#: Known, not implemented, and harmless to ignore: the output is what it would be with them honoured
#: (bookkeeping, caching and routing hints, hints a model without reasoning has no use for).
IGNORED = {
    "metadata", "moderation", "prediction", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    "reasoning_effort", "safety_identifier", "service_tier", "store", "verbosity", "request_id",
    "kv_transfer_params", "include_reasoning",
}
#: Implemented, but the test server schedules fcfs: a non-zero value is then 400 naming the field
#: (as vLLM answers); tests/api/test_tenants.py covers it under the priority policy.
REFUSED_BY_POLICY = {"priority"}
IGNORED_METRIC = "kubeinfer_ignored_request_fields_total"


def _cases():
    for route, names in (("completions", OPENAI_COMPLETION + VLLM_COMPLETION), ("chat/completions",
                                                                                  OPENAI_CHAT + VLLM_CHAT)):
        for name in sorted(set(names) - set(BASE[route])):
            yield route, name


def _ignored(resp: httpx.Response) -> list[str]:
    value = resp.headers.get("x-kubeinfer-ignored-fields")
    return value.split(",") if value else []


@pytest.mark.parametrize(("route", "field"), list(_cases()))
def test_every_field_is_implemented_refused_or_ignored_visibly(server, route: str, field: str) -> None:
    if field == "add_special_tokens":
        value = not ADD_SPECIAL_DEFAULT[route]
    elif field == "logprobs":
        value = 2 if route == "completions" else True
    else:
        value = SAMPLES[field]
    body = {**BASE[route], **COMPANIONS.get(field, {}), field: value}
    before = metric_value(server.base_url, IGNORED_METRIC, field=field)
    resp = httpx.post(f"{server.base_url}/v1/{route}", json=body, timeout=60)
    if field in IMPLEMENTED[route] and field not in REFUSED_BY_POLICY:
        assert resp.status_code == 200, resp.text
        assert _ignored(resp) == []
    elif field in IGNORED:
        assert resp.status_code == 200, resp.text
        assert _ignored(resp) == [field]
        assert metric_value(server.base_url, IGNORED_METRIC, field=field) == before + 1
    else:
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == field and field in err["message"], err


def test_unknown_fields_anywhere_are_ignored_named_counted_and_logged_once(server, caplog) -> None:
    name = f"future_field_{uuid.uuid4().hex[:8]}"
    body = {**BASE["chat/completions"], name: {"x": 1},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}],
                          "mood": "happy"}]}
    with caplog.at_level(logging.WARNING, logger="kubeinfer_serving.api.fields"):
        for _ in range(2):
            resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
            assert resp.status_code == 200, resp.text
            assert sorted(_ignored(resp)) == sorted([name, "messages.content.cache_control", "messages.mood"])
    assert metric_value(server.base_url, IGNORED_METRIC, field=name) == 2
    assert sum(name in r.getMessage() for r in caplog.records) == 1
    resp = httpx.post(f"{server.base_url}/v1/completions", timeout=30,
                      json={**BASE["completions"], "stream": True, "stream_options": {"include_usage": True,
                                                                                       "sparkle": 1}})
    assert resp.status_code == 200 and _ignored(resp) == ["stream_options.sparkle"]
    resp = httpx.post(f"{server.base_url}/v1/embeddings", timeout=30,
                      json={"model": EMBED_MODEL, "input": "hi", "encoding_format": "float", "sparkle": 1})
    assert resp.status_code == 200 and _ignored(resp) == ["sparkle"]
    # The official client's extra_body reaches the server the same way.
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={"sparkle": True})
    assert raw.headers["x-kubeinfer-ignored-fields"] == "sparkle"
    assert raw.parse().choices[0].finish_reason in ("stop", "length")


def test_ignored_field_names_are_bounded(cli_server: str) -> None:
    """Names that do not look like field names are ``other``; a response's header names at most 32
    fields; the metric labels at most 64 names per process (on the subprocess server, so the cap
    it fills is its own), the rest count as ``other``."""
    junk = {f"z{uuid.uuid4().hex}_{i}": 1 for i in range(80)}
    resp = httpx.post(f"{cli_server}/v1/completions", json={**BASE["completions"], **junk, "not a name!": 1},
                      timeout=30)
    assert resp.status_code == 200, resp.text
    names = _ignored(resp)
    assert len(names) == 33 and names[-1] == "other" and len(set(names)) == 33
    assert set(names[:-1]) <= set(junk)
    text = httpx.get(f"{cli_server}/metrics", timeout=10).text
    labels = [line for line in text.splitlines() if line.startswith(IGNORED_METRIC + "{")]
    assert len(labels) <= 65 and metric_value(cli_server, IGNORED_METRIC, field="other") >= 81 - 64
    # A later name is still named in its response's header, even though the metric counts it as other.
    resp = httpx.post(f"{cli_server}/v1/completions", json={**BASE["completions"], "late_field": 1}, timeout=30)
    assert _ignored(resp) == ["late_field"]


def test_refused_fields_and_their_off_values(server) -> None:
    for field, value in (("truncate_prompt_tokens", 8),):
        resp = httpx.post(f"{server.base_url}/v1/embeddings", timeout=30,
                          json={"model": EMBED_MODEL, "input": "hi", field: value})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == field, resp.text
    # The value that means "off" is accepted, and not reported, for fields whose use is refused.
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=30,
                      json={**BASE["chat/completions"], "use_beam_search": False, "priority": 0, "length_penalty": 1.0})
    assert resp.status_code == 200, resp.text
    assert _ignored(resp) == []


def _sse(resp: httpx.Response) -> list[dict]:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data:") and line != "data: [DONE]":
            events.append(json.loads(line[len("data:"):]))
    return events


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_guidellm_streamed_request(server, route: str) -> None:
    """guidellm's request body (src/guidellm/backends/openai/request_handlers.py): usage on every chunk."""
    body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "stop": None, "ignore_eos": True}
    if route == "completions":
        body |= {"max_tokens": 12, "prompt": "the quick brown fox"}
    else:
        body |= {"max_completion_tokens": 12,
                 "messages": [{"role": "user", "content": [{"type": "text", "text": "the quick brown fox"}]}]}
    with httpx.stream("POST", f"{server.base_url}/v1/{route}", json=body, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        assert _ignored(resp) == []
        events = _sse(resp)
    assert events and all(e.get("usage") for e in events), events
    completions = [e["usage"]["completion_tokens"] for e in events]
    assert completions == sorted(completions) and completions[-1] == 12
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == events[-1]["usage"][
        "prompt_tokens"] + 12
    assert all(e["usage"]["prompt_tokens"] == events[0]["usage"]["prompt_tokens"] > 0 for e in events)


def test_continuous_usage_with_the_official_client(client) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=6, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].usage.completion_tokens == 6
    # Without include_usage, continuous_usage_stats adds nothing (vLLM: both flags are needed).
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3, stream=True,
        stream_options={"continuous_usage_stats": True})
    assert all(c.usage is None for c in stream)
