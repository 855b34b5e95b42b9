"""Request and response bodies of the OpenAI-compatible routes (pydantic v2), with OpenAI's field names.

Field names and defaults follow OpenAI's API reference (https://platform.openai.com/docs/api-reference):
``max_tokens`` defaults to 16 for legacy completions; ``temperature`` is in [0, 2]; ``top_p`` in (0, 1].
Extensions in the style of vLLM's API: ``top_k``, ``ignore_eos``, ``stop_token_ids``.
Unknown fields are ignored (as vLLM does); known OpenAI fields this server cannot honour
(``logprobs``, penalties, ``logit_bias``, ``suffix``, tools) are rejected by the routes with 400,
never silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Largest ``n`` accepted: each choice is a separate engine request.
MAX_N = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    """``stream_options``: ``include_usage`` adds a final chunk with empty ``choices`` and the ``usage``."""

    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM's names).
    top_k: int | None = Field(None, ge=-1, description="Sample among the k most likely tokens; 0 or -1 disables.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    stop_token_ids: list[int] | None = None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt`` is a string, a list of strings, a token-id list or a list of those."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class ContentPart(_Request):
    """One part of a multi-part message ``content``; only ``{"type": "text", "text": ...}`` is served."""

    type: str
    text: str | None = None


class ChatMessage(_Request):
    """One chat message; ``content`` is a string or a list of text parts (joined with no separator)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``. Without ``max_tokens``/``max_completion_tokens`` the output may fill the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``. ``encoding_format`` ``base64`` is little-endian float32, as OpenAI's clients expect."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class PromptTokensDetails(BaseModel):
    """``usage.prompt_tokens_details``: prompt tokens served from the prefix cache."""

    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts of a request: prompts counted once per prompt, completions summed over choices."""

    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(BaseModel):
    """One generated text of ``/v1/completions``."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """``/v1/completions`` response (``object: text_completion``); also each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    """The generated chat message."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One generated message of ``/v1/chat/completions``."""

    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    """``/v1/chat/completions`` response (``object: chat.completion``)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    """The increment of a streamed chat message: ``role`` in the first chunk, then ``content`` pieces."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """One choice in a ``chat.completion.chunk``."""

    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """A streamed chunk (``object: chat.completion.chunk``); the usage chunk has empty ``choices``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class EmbeddingData(BaseModel):
    """One embedding: a float list, or a base64 string of little-endian float32 values."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    """``/v1/embeddings`` response (``object: list``)."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    """An entry of ``GET /v1/models``: OpenAI's fields plus the catalogue state (extra fields clients ignore)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kubeinfer"
    kind: str
    state: str
    bytes: int
    preload: bool
    max_model_len: int | None = None
    message: str = ""
    source: str = ""
    revision: str | None = None


class ModelList(BaseModel):
    """``GET /v1/models`` response."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
