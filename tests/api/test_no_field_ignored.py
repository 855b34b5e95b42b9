"""Every request field of OpenAI's and vLLM's schemas is either implemented or refused with a 400 naming it.

OpenAI's field lists come from the installed ``openai`` package's request types; vLLM's are
its ``CompletionRequest`` / ``ChatCompletionRequest`` fields (vllm/entrypoints/openai/protocol.py),
written out here since vLLM is not a dependency. Each field is sent with a value that asks
for something; the answer must match this file's classification: 200 for implemented fields
(each has a behaviour test elsewhere), 400 with ``param`` = the field for refused ones.
"""

from __future__ import annotations

import httpx
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from tests.api.conftest import MODEL

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
#: Implemented, but the test server schedules fcfs: a non-zero value is then 400 naming the field
#: (as vLLM answers); tests/api/test_tenants.py covers it under the priority policy.
REFUSED_BY_POLICY = {"priority"}


def _cases():
    for route, names in (("completions", OPENAI_COMPLETION + VLLM_COMPLETION), ("chat/completions",
                                                                                  OPENAI_CHAT + VLLM_CHAT)):
        for name in sorted(set(names) - set(BASE[route])):
            yield route, name


@pytest.mark.parametrize(("route", "field"), list(_cases()))
def test_every_field_is_implemented_or_refused_naming_it(server, route: str, field: str) -> None:
    if field == "add_special_tokens":
        value = not ADD_SPECIAL_DEFAULT[route]
    elif field == "logprobs":
        value = 2 if route == "completions" else True
    else:
        value = SAMPLES[field]
    body = {**BASE[route], **COMPANIONS.get(field, {}), field: value}
    resp = httpx.post(f"{server.base_url}/v1/{route}", json=body, timeout=60)
    if field in IMPLEMENTED[route] and field not in REFUSED_BY_POLICY:
        assert resp.status_code == 200, resp.text
    else:
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == field and field in err["message"], err


def test_unknown_fields_and_unknown_message_fields_are_refused(server) -> None:
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=30, json={
        **BASE["chat/completions"], "messages": [{"role": "user", "content": "hi", "mood": "happy"}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages[0].mood"
    resp = httpx.post(f"{server.base_url}/v1/completions", timeout=30,
                      json={**BASE["completions"], "stream": True, "stream_options": {"include_usage": True,
                                                                                       "sparkle": 1}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "stream_options.sparkle"
    from tests.api.conftest import EMBED_MODEL

    for field, value in (("truncate_prompt_tokens", 8), ("normalize", False)):
        resp = httpx.post(f"{server.base_url}/v1/embeddings", timeout=30,
                          json={"model": EMBED_MODEL, "input": "hi", field: value})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == field, resp.text
    # The value that means "off" is accepted for fields this server does not implement.
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=30,
                      json={**BASE["chat/completions"], "store": False, "use_beam_search": False, "priority": 0})
    assert resp.status_code == 200, resp.text
