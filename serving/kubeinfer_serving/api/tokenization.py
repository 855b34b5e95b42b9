"""vLLM's small endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` and ``GET /version``."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

from fastapi import APIRouter, Request

from kubeinfer_serving import __version__
from kubeinfer_serving.api.errors import APIError
from kubeinfer_serving.api.fields import check_fields
from kubeinfer_serving.api.limits import OffLoopJSONRoute
from kubeinfer_serving.api.prompts import chat_prompt, check_template_flags, max_token_chars, tokenizer_lock
from kubeinfer_serving.api.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from kubeinfer_serving.api.serving import acquire, resolve_model_name
from kubeinfer_serving.engine.validation import check_text_fits, outside_vocabulary
from kubeinfer_serving.registry.protocol import ModelKind

router = APIRouter(route_class=OffLoopJSONRoute)


def _encode(tokenizer: Any, text: str, add_special_tokens: bool, max_model_len: int) -> list[int]:
    """Token ids of ``text`` under the tokenizer's lock (blocking: called in a worker thread).

    Raises:
        ContextLengthError: 400 ``context_length_exceeded`` for a text no context of
            ``max_model_len`` can hold (checked before tokenizing, as for generation).
    """
    check_text_fits(max_model_len, len(text), max_token_chars(tokenizer))
    with tokenizer_lock(tokenizer):
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _token_strs(tokenizer: Any, ids: list[int]) -> list[str]:
    """The vocabulary strings of ``ids`` (blocking: called in a worker thread)."""
    with tokenizer_lock(tokenizer):
        return list(tokenizer.convert_ids_to_tokens(ids))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of ``prompt`` (with special tokens unless ``add_special_tokens`` is false), or of
    ``messages`` as the chat route renders them (same template, tools and flags).

    Errors: 400 when neither or both of ``prompt`` and ``messages`` are given; 400
    ``context_length_exceeded`` for a text longer than the model's context can hold (the
    generation routes' check, made before tokenizing); 404 unknown model.
    """
    check_fields(request, body)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt", code="invalid_value")
    async with AsyncExitStack() as stack:
        served = await acquire(request, stack, resolve_model_name(request, body.model, ModelKind.GENERATE),
                               ModelKind.GENERATE)
        tok = served.tokenizer
        if body.messages is not None:
            check_template_flags(body.add_generation_prompt, body.continue_final_message)
            ids = await asyncio.to_thread(
                chat_prompt, tok, body.messages, served.max_model_len,
                parse_special_tokens=request.app.state.settings.parse_special_tokens_in_chat, tools=body.tools,
                add_generation_prompt=body.add_generation_prompt, continue_final_message=body.continue_final_message,
                chat_template_kwargs=body.chat_template_kwargs)
        else:
            ids = await asyncio.to_thread(_encode, tok, body.prompt, body.add_special_tokens, served.max_model_len)
        strs = await asyncio.to_thread(_token_strs, tok, ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=served.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of ``tokens``. Errors: 400 for a token id outside the vocabulary; 404 unknown model."""
    check_fields(request, body)
    async with AsyncExitStack() as stack:
        served = await acquire(request, stack, resolve_model_name(request, body.model, ModelKind.GENERATE),
                               ModelKind.GENERATE)
        vocab = len(served.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, outside_vocabulary(bad[0], vocab), param="tokens", code="invalid_value")
        return DetokenizeResponse(prompt=await asyncio.to_thread(served.tokenizer.decode, body.tokens))


#: ``init_kwargs`` entries never returned by ``/tokenizer_info``: local paths and loading switches.
_PRIVATE_KEYS = frozenset({"name_or_path", "is_local", "local_files_only", "backend", "cache_dir", "token"})


def _json_value(value: Any) -> Any:
    """A tokenizer-config value as JSON: added tokens as their text (dicts and lists recursively),
    other objects as their ``str``."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    content = getattr(value, "content", None)  # tokenizers.AddedToken
    return content if isinstance(content, str) else str(value)


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """vLLM's ``/tokenizer_info`` body: the tokenizer's configuration as ``tokenizer_config.json``
    holds it (``init_kwargs``), with ``tokenizer_class``, the special tokens' text (``bos_token``,
    ``eos_token``, ``pad_token``, ``unk_token``) and the ``chat_template``. Local paths
    (``name_or_path``, ``*_file``) and loading switches are left out. Blocking: the lock is held
    while reading the tokenizer (vllm/entrypoints/openai/serving_tokenization.py, ``TokenizerInfo``).
    """
    with tokenizer_lock(tokenizer):
        config = {k: v for k, v in dict(getattr(tokenizer, "init_kwargs", {}) or {}).items()
                  if k not in _PRIVATE_KEYS and not k.endswith("_file")}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            config[name] = getattr(tokenizer, name, None)
        template = getattr(tokenizer, "chat_template", None)
        if template:
            config["chat_template"] = template
        info = _json_value(config)
    info["tokenizer_class"] = type(tokenizer).__name__
    return info


@router.get("/tokenizer_info")
async def get_tokenizer_info(request: Request, model: str | None = None) -> dict[str, Any]:
    """The tokenizer configuration of ``model`` (a query parameter; optional when the server serves
    one generative model), as vLLM's ``/tokenizer_info`` answers it: lm-eval's remote tokenizer
    reads ``eos_token``, ``bos_token`` and ``chat_template`` from it. Errors: 400 without a model
    to pick, 404 unknown model, 503 model unavailable.
    """
    async with AsyncExitStack() as stack:
        served = await acquire(request, stack, resolve_model_name(request, model, ModelKind.GENERATE),
                               ModelKind.GENERATE)
        return await asyncio.to_thread(tokenizer_info, served.tokenizer)


@router.get("/version")
async def version() -> dict[str, str]:
    """The server's version (``{"version": ...}``, as vLLM's)."""
    return {"version": __version__}
