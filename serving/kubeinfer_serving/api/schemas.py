"""Request and response bodies of the OpenAI-compatible routes (pydantic v2), with OpenAI's field names.

Field names and defaults follow OpenAI's API reference (https://platform.openai.com/docs/api-reference):
``max_tokens`` defaults to 16 for legacy completions; ``temperature`` is in [0, 2]; ``top_p`` in (0, 1].
Extensions with vLLM's names and meanings: ``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``allowed_token_ids``, ``bad_words``,
``include_stop_str_in_output``, ``skip_special_tokens``, ``return_tokens_as_token_ids``, the
``guided_*`` / ``structured_outputs`` constraints, the chat template controls, ``priority``
and ``cache_salt``.

Request bodies keep unknown fields (``extra="allow"``) so that
:func:`kubeinfer_serving.api.fields.check_fields` can refuse those whose loss would change the
output and report the others as ignored (vLLM's policy).

Every field is bounded, so no value can reach the engine that it cannot represent (a ``top_k``
of 2**64 once killed an engine): integers are within int32 (``seed`` within int64), floats are
finite, lists and names have caps. Validation is strict (``"stream": "yes"`` or
``"max_tokens": "4"`` are 400s, as in OpenAI's API), and strings with lone UTF-16 surrogates
(valid JSON, but not text) are 400s. The four ``prompt``/``input`` forms are checked by one
linear pass (:func:`check_prompt_input`) instead of pydantic's union, which cost ~86x the
body's size in memory for a long token-id list.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

#: Largest ``n`` accepted: each choice is a separate engine request.
MAX_N = 16
#: Largest integer accepted in int fields (int32), ``top_k`` and token ids included.
MAX_INT32 = 2**31 - 1
#: ``seed`` range: what ``torch.Generator.manual_seed`` accepts for ``seed + choice`` (int64).
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1 - MAX_N
#: Most ``stop`` strings per request (OpenAI allows 4; vLLM-style clients send a few more) and their length.
MAX_STOP = 16
MAX_STOP_CHARS = 256
#: Most ``stop_token_ids`` per request.
MAX_STOP_TOKEN_IDS = 64
#: Longest ``model`` / ``user`` / ``name`` string (characters): names are never megabytes.
MAX_NAME_CHARS = 256
#: Most ``logit_bias`` entries per request (the routes check keys and the [-100, 100] values).
MAX_LOGIT_BIAS = 4096
#: Most ``bad_words`` per request.
MAX_BAD_WORDS = 1024
#: Most chat ``messages`` per request (OpenAI's limit): rendering the template costs time per message,
#: even per empty one, before any context check can count tokens.
MAX_MESSAGES = 2048
#: Most ``tools`` per request (OpenAI's limit).
MAX_TOOLS = 128
#: Most ``allowed_token_ids`` per request: the largest vocabularies in use (Gemma's, 256k); the
#: model's own vocabulary bound is checked by the engine.
MAX_ALLOWED_TOKEN_IDS = 262_144


def no_lone_surrogates(text: str) -> str:
    """Reject strings holding lone UTF-16 surrogates (``"\\ud800"`` is valid JSON but not text).

    Raises:
        ValueError: the string cannot be encoded as UTF-8.
    """
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the text contains a lone UTF-16 surrogate, which is not valid Unicode") from None
    return text


def no_lone_surrogates_in(value: Any) -> Any:
    """:func:`no_lone_surrogates` over a free-form JSON value: every string in it, keys included.

    Raises:
        ValueError: some string in ``value`` holds a lone UTF-16 surrogate.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            no_lone_surrogates(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


#: A string that is valid Unicode (no lone surrogates).
Text = Annotated[str, AfterValidator(no_lone_surrogates)]
def at_most(n: int) -> BeforeValidator:
    """A before-validator refusing a list longer than ``n`` before its items are validated
    (``Field(max_length=n)`` checks the length only after validating every item: 300,000
    messages cost a second of event loop first)."""

    def check(value: Any) -> Any:
        if isinstance(value, list) and len(value) > n:
            raise ValueError(f"at most {n} items are allowed, got {len(value)}")
        return value

    return BeforeValidator(check)


#: A free-form JSON object (a schema, template variables, a tool) whose strings are valid Unicode.
JSONObject = Annotated[dict[str, Any], AfterValidator(no_lone_surrogates_in)]
#: A short name (``model``, ``user``, message ``name``).
Name = Annotated[Text, Field(max_length=MAX_NAME_CHARS)]
#: A token id field (``allowed_token_ids``, ``/detokenize`` tokens): an int in [0, 2**31); the
#: vocabulary bound is checked later, by the model.
TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]


def check_prompt_input(value: Any) -> Any:
    """Check one of OpenAI's four prompt/input forms in one pass, without copying it.

    Accepted: a string, a list of strings, a list of token ids, a list of token-id lists; token
    ids are ints (not booleans) in [0, 2**31). An empty list passes (the route answers 400
    naming the field). The vocabulary bound is checked later, by the model.

    Raises:
        ValueError: any other shape or element type, or a string with a lone surrogate.
    """
    if isinstance(value, str):
        return no_lone_surrogates(value)
    if not isinstance(value, list):
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists")
    if not value:
        return value
    first = value[0]
    if isinstance(first, str):
        for item in value:
            if not isinstance(item, str):
                raise ValueError("a list of strings must hold only strings")
            no_lone_surrogates(item)
    elif type(first) is int:
        _check_token_ids(value)
    elif isinstance(first, list):
        for item in value:
            if not isinstance(item, list) or not item:
                raise ValueError("a list of token-id lists must hold only non-empty lists of token ids")
            _check_token_ids(item)
    else:
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists")
    return value


def _check_token_ids(ids: list[Any]) -> None:
    if not all(type(t) is int for t in ids):
        raise ValueError("token ids must be integers")
    if min(ids) < 0 or max(ids) > MAX_INT32:
        raise ValueError(f"token ids must be in [0, {MAX_INT32}]")


#: ``prompt`` / ``input``: OpenAI's four forms, validated by :func:`check_prompt_input`.
PromptInput = Annotated[
    Any,
    BeforeValidator(check_prompt_input),
    WithJsonSchema({"anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer", "minimum": 0}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
    ]}),
]

class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


class StreamOptions(_Request):
    """``stream_options``: ``include_usage`` adds a final chunk with empty ``choices`` and the ``usage``;
    with it, vLLM's ``continuous_usage_stats`` also puts the usage so far on every chunk."""

    include_usage: bool = False
    continuous_usage_stats: bool = False

    @property
    def continuous(self) -> bool:
        """Whether every chunk carries the usage so far (vLLM: both flags set)."""
        return self.include_usage and self.continuous_usage_stats


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: Name | None = Field(None, description="Optional when the server serves one generative model.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[Text, Field(max_length=MAX_STOP_CHARS)] | Annotated[
        list[Annotated[Text, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: Annotated[dict[Text, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: Name | None = None
    # Extensions (vLLM's names).
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32,
                              description="Sample among the k most likely tokens; 0 or -1 disables.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT32)]],
                              Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    cache_salt: Annotated[Text, Field(min_length=1, max_length=MAX_NAME_CHARS)] | None = Field(
        None, description="vLLM's cache_salt: prefix-cache blocks are shared only between requests with the "
        "same salt (and tenant).")
    priority: int | None = Field(None, ge=-MAX_INT32 - 1, le=MAX_INT32,
                                 description="vLLM's priority: lower values run first (needs the priority "
                                 "scheduling policy); default: the tenant's priority, else 0.")
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0, le=MAX_INT32)
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    allowed_token_ids: Annotated[list[TokenId], at_most(MAX_ALLOWED_TOKEN_IDS),
                                 AfterValidator(lambda ids: sorted(set(ids)))] | None = Field(
        None, description="Only these tokens may be sampled (de-duplicated; at most 262,144).")
    bad_words: Annotated[list[Annotated[Text, Field(max_length=MAX_STOP_CHARS)]],
                         Field(max_length=MAX_BAD_WORDS)] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    return_tokens_as_token_ids: bool | None = None
    # Structured outputs (vLLM's guided decoding fields and their newer ``structured_outputs`` form).
    response_format: JSONObject | None = None
    guided_json: Text | JSONObject | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    structured_outputs: JSONObject | None = None
    guided_decoding_backend: Name | None = None
    guided_whitespace_pattern: Text | None = None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt`` is a string, a list of strings, a token-id list or a list of those."""

    prompt: PromptInput
    max_tokens: int | None = Field(16, ge=0, le=MAX_INT32,
                                   description="0 only with echo: score the prompt, generate nothing.")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_INT32)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: Text | None = None


class ContentPart(_Request):
    """One part of a multi-part message ``content``; only ``{"type": "text", "text": ...}`` is served."""

    type: Name
    text: Text | None = None


class AssistantFunctionCall(BaseModel):
    """The function of an assistant message's tool call: its name and its arguments (OpenAI: a JSON
    string; an object is accepted too). Unknown keys are dropped."""

    model_config = ConfigDict(strict=True)

    name: Name
    arguments: Text | JSONObject


class AssistantToolCall(BaseModel):
    """One entry of an assistant message's ``tool_calls`` (OpenAI's shape; ``id`` may be left out).
    Unknown keys are dropped."""

    model_config = ConfigDict(strict=True)

    id: Name | None = None
    type: Literal["function"] = "function"
    function: AssistantFunctionCall


class ChatMessage(_Request):
    """One chat message; ``content`` is a string or a list of text parts (joined with no separator)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Name | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: Name | None = None


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``. Without ``max_tokens``/``max_completion_tokens`` the output may fill the context."""

    messages: Annotated[list[ChatMessage], at_most(MAX_MESSAGES)] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_INT32)
    tools: Annotated[list[JSONObject], at_most(MAX_TOOLS)] | None = None
    tool_choice: Text | JSONObject | None = None
    parallel_tool_calls: bool | None = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: JSONObject | None = None


class TokenizeRequest(_Request):
    """``POST /tokenize`` (vLLM): a ``prompt``, or chat ``messages`` rendered with the chat template."""

    model: Name | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], at_most(MAX_MESSAGES)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: JSONObject | None = None
    tools: Annotated[list[JSONObject], at_most(MAX_TOOLS)] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    """``/tokenize`` answer: the token ids, their count and the model's context length."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    """``POST /detokenize`` (vLLM): token ids -> text."""

    model: Name | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    """``/detokenize`` answer."""

    prompt: str


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``. ``encoding_format`` ``base64`` is little-endian float32, as OpenAI's clients expect."""

    model: Name
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=MAX_INT32)
    user: Name | None = None
    normalize: bool | None = Field(None, description="vLLM's: L2-normalise the vectors (default: as the model's "
                                   "pipeline does)")


class PromptTokensDetails(BaseModel):
    """``usage.prompt_tokens_details``: prompt tokens served from the prefix cache."""

    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts of a request: prompts counted once per prompt, completions summed over choices."""

    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """``logprobs`` of a legacy completion choice: per token its text, log-probability, the top
    alternatives (token text -> log-probability) and its character offset in the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ChatTopLogprob(BaseModel):
    """One alternative token of a chat ``logprobs`` entry (``bytes``: its UTF-8 bytes)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(ChatTopLogprob):
    """One output token of a chat ``logprobs.content`` list, with its ``top_logprobs``."""

    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """``choices[i].logprobs`` of a chat completion."""

    content: list[ChatLogprob] | None = None


class CompletionChoice(BaseModel):
    """One generated text of ``/v1/completions``."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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


class FunctionCall(BaseModel):
    """The function a tool call invokes: its name and its arguments as a JSON string."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One tool call of an assistant message (OpenAI's shape)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    """A streamed piece of a function call: the name in the first piece, then argument text."""

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed piece of a tool call; ``index`` says which call it extends."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class AssistantMessage(BaseModel):
    """The generated chat message."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    """One generated message of ``/v1/chat/completions``."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    """One choice in a ``chat.completion.chunk``."""

    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
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
    idle_timeout_seconds: float | None = None
    source: str = ""
    revision: str | None = None
    tier: str = "absent"
    parent: str | None = None


class ModelList(BaseModel):
    """``GET /v1/models`` response."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
