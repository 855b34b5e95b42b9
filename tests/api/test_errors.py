"""Bad input gets OpenAI's error body and the right status, and the server keeps serving afterwards."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.conftest import MAX_MODEL_LEN, MODEL


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    """The response has ``status`` and exactly OpenAI's error object; returns ``error``."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert err.value.status_code == 404
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", "many"),
        ("temperature", -0.5),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("n", 0),
        ("stop", 5),
        ("logprobs", 21),
        ("logit_bias", {"not-a-token": 1}),
        ("use_beam_search", True),  # unknown fields are ignored (test_request_fields.py); this one is refused
        ("presence_penalty", 2.5),
        ("prompt", []),
    ],
)
def test_invalid_completion_fields_are_400_naming_the_field(client: openai.OpenAI, field: str, value) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", extra_body={field: value})
    assert err.value.status_code == 400
    assert err.value.body["param"] == field, err.value.body
    assert err.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": "hello"},
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
        {"messages": [{"role": "user", "content": "hi"}]},
    ],
)
def test_invalid_chat_bodies_are_400(server, body: dict) -> None:
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    err = assert_openai_error(resp, 400)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"model": "tiny-llama", "prompt": "x",}'])
def test_malformed_json_is_400(server, raw: bytes) -> None:
    resp = httpx.post(f"{server.base_url}/v1/completions", content=raw,
                      headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(resp, 400)


def test_prompt_plus_max_tokens_beyond_context_is_400_with_both_numbers(client: openai.OpenAI) -> None:
    prompt_ids = [100] * 40
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=MAX_MODEL_LEN)
    assert err.value.code == "context_length_exceeded"
    message = err.value.body["message"]
    assert str(MAX_MODEL_LEN) in message and str(40 + MAX_MODEL_LEN) in message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 1500}])
    assert err.value.code == "context_length_exceeded" and err.value.body["param"] == "messages"
    assert str(MAX_MODEL_LEN) in err.value.body["message"]


def test_out_of_vocabulary_token_ids_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[1, 2, 10**9], max_tokens=2)
    assert err.value.body["param"] == "prompt"


def test_unknown_route_and_wrong_method_keep_the_openai_body(server) -> None:
    assert_openai_error(httpx.get(f"{server.base_url}/v1/nothing-here", timeout=10), 404)
    assert_openai_error(httpx.get(f"{server.base_url}/v1/completions", timeout=10), 405)


def test_server_still_serves_after_the_errors(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="still alive", max_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 3
