"""Request and response bodies of ``POST /v1/responses`` (the stateless part of OpenAI's Responses API).

Field names and shapes follow OpenAI's API reference (https://platform.openai.com/docs/api-reference/responses)
as the ``openai`` package types them (``openai/types/responses/``). The request keeps the chat
route's sampling fields (:class:`~kubeinfer_serving.api.schemas._SamplingFields`: ``temperature``,
``top_p``, ``seed``, vLLM's ``top_k`` and friends, with their bounds); ``input`` items, ``tools``,
``tool_choice`` and ``text`` are free-form JSON checked by :mod:`kubeinfer_serving.api.responses_input`,
which names the offending field in its errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from kubeinfer_serving.api.schemas import (
    MAX_INT32,
    MAX_MESSAGES,
    MAX_TOOLS,
    JSONObject,
    Name,
    Text,
    _SamplingFields,
    at_most,
)


class ResponsesRequest(_SamplingFields):
    """``POST /v1/responses``: ``input`` is a string (one user message) or a list of input items.

    ``store: true`` is accepted and has no effect (nothing is kept; vLLM does the same without its
    store); ``include`` is accepted, and reported as ignored when it asks for anything (the Agents
    SDK sends ``include: []`` on every request); ``previous_response_id``, ``conversation``, ``prompt`` and ``background: true`` need
    server-side state and are refused with 400.
    """

    input: Text | Annotated[list[JSONObject], at_most(MAX_MESSAGES)]
    instructions: Text | None = None
    tools: Annotated[list[JSONObject], at_most(MAX_TOOLS)] | None = None
    tool_choice: Text | JSONObject | None = None
    parallel_tool_calls: bool | None = None
    text: JSONObject | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_INT32)
    store: bool | None = None
    include: Annotated[list[Name], Field(max_length=16)] | None = None
    previous_response_id: Name | None = None
    conversation: Text | JSONObject | None = None
    prompt: JSONObject | None = None
    background: bool | None = None
    metadata: Annotated[dict[Name, Text], Field(max_length=16)] | None = None


class OutputText(BaseModel):
    """A text part of an output message."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    """An ``output`` item holding the assistant's text."""

    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    """An ``output`` item calling a function: ``arguments`` is a JSON string; ``call_id`` pairs it
    with the ``function_call_output`` input item the client sends back."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    """Prompt tokens served from the prefix cache."""

    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    """Reasoning tokens (none: this server does not separate reasoning)."""

    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    """Token counts of a response."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    """Why a response is ``incomplete``."""

    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    """The ``response`` object: the whole answer, and the payload of the lifecycle stream events."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputMessage | FunctionCallItem]
    usage: ResponseUsage | None = None
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["auto", "disabled"] = "disabled"
    user: str | None = None
    store: bool = False
