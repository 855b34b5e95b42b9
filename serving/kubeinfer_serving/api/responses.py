"""``POST /v1/responses``: the stateless part of OpenAI's Responses API, on the chat route's generation path.

vLLM's shape: the route hands the request to one serving class (:class:`ResponsesServing`, a
:class:`~kubeinfer_serving.api.chat.ChatServing`), which turns it into the chat request it means
(:mod:`.responses_input`), prepares it as the chat route does (template, tools, grammar,
sampling) and answers with its full generator (one ``response`` object) or its streaming
generator (the typed events, each with its ``sequence_number``, as OpenAI sends them):

``response.created``, ``response.in_progress``; for text: ``response.output_item.added`` (a
``message``), ``response.content_part.added`` (``output_text``), ``response.output_text.delta``
per piece, ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``; per function call: ``response.output_item.added``
(``function_call``, as soon as its name is known), ``response.function_call_arguments.delta``
per piece of its arguments as the model writes them, ``response.function_call_arguments.done``, ``response.output_item.done``; last
``response.completed``, or ``response.incomplete`` when ``max_output_tokens`` cut the output.

Nothing is stored: ``store: true`` is accepted and reported as ignored (as vLLM does without its
store), and what needs a stored response is refused (:func:`.responses_input.check_stateless`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kubeinfer_serving.api import chat
from kubeinfer_serving.api.fields import check_fields, record_ignored
from kubeinfer_serving.api.generation import GenerationRun
from kubeinfer_serving.api.limits import OffLoopJSONRoute
from kubeinfer_serving.api.responses_input import to_chat_request
from kubeinfer_serving.api.responses_protocol import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from kubeinfer_serving.api.schemas import ToolCall, Usage
from kubeinfer_serving.api.serving import ChoiceResult, UsageCounter, http_response
from kubeinfer_serving.api.tools import ToolCallStream, parse_tool_calls

router = APIRouter(route_class=OffLoopJSONRoute)


def _id(prefix: str) -> str:
    """An id like OpenAI's Responses ids (``resp_``, ``msg_``, ``fc_`` + 32 hex digits)."""
    return f"{prefix}_{uuid.uuid4().hex}"


def response_usage(usage: Usage) -> ResponseUsage:
    """Chat ``usage`` in the Responses API's names."""
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ResponseUsage(input_tokens=usage.prompt_tokens, input_tokens_details=InputTokensDetails(cached_tokens=cached),
                         output_tokens=usage.completion_tokens, total_tokens=usage.total_tokens)


def _sse(kind: str, sequence: int, **fields: Any) -> str:
    """One typed stream event: ``event: <type>`` and its JSON ``data`` (with ``type`` and ``sequence_number``)."""
    data = {"type": kind, "sequence_number": sequence}
    for key, value in fields.items():
        data[key] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class ResponsesServing(chat.ChatServing):
    """One ``/v1/responses`` request: converted into the chat request it means, prepared as the chat
    route prepares it, then answered by :meth:`full_response` or :meth:`stream_events`.

    Not result-cached; its stream ends with its own ``response.completed`` event (no ``[DONE]``).

    Args:
        request: the HTTP request.
        body: the parsed request body.
    """

    cache_route = None
    done_event = None
    context_param = "input"

    def __init__(self, request: Request, body: ResponsesRequest) -> None:
        super().__init__(request, body)
        self.response_id = _id("resp")  # the Responses API's id format: resp_<32 hex>
        self.responses_body = body

    def check(self) -> None:
        """Fields policy, the stateless refusals and the chat route's checks of the converted request.

        Raises:
            APIError: 400 naming the field for what cannot be served (see :mod:`.responses_input`).
        """
        check_fields(self.request, self.body)
        if self.body.store:
            record_ignored(self.request, ["store"])
        if self.body.include:
            record_ignored(self.request, ["include"])
        self.chat_body = to_chat_request(self.body)
        super().check()

    def _response(self, status: str, output: list[OutputMessage | FunctionCallItem], usage: Usage | None = None,
                  finish_reason: str | None = None) -> ResponseObject:
        body = self.responses_body
        if finish_reason == "length":
            status = "incomplete"
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none")
        return ResponseObject(
            id=self.response_id, created_at=self.created, status=status, model=self.model, output=output,
            usage=response_usage(usage) if usage is not None else None,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=body.instructions, max_output_tokens=body.max_output_tokens, metadata=body.metadata,
            parallel_tool_calls=body.parallel_tool_calls is not False, temperature=body.temperature,
            top_p=body.top_p, tool_choice=choice, tools=body.tools or [],
            text=body.text or {"format": {"type": "text"}}, user=body.user)

    def _split(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return parse_tool_calls(text, self.plan, self.parser)

    @staticmethod
    def _call_item(call: ToolCall) -> FunctionCallItem:
        return FunctionCallItem(id=_id("fc"), call_id=call.id, name=call.function.name,
                                arguments=call.function.arguments, status="completed")

    def full_response(self, results: list[ChoiceResult], usage: Usage) -> ResponseObject:
        """The whole ``response`` object from the finished output (a message and/or function calls)."""
        result = results[0]
        content, calls = self._split(result.text)
        item_status = "incomplete" if result.finish_reason == "length" else "completed"
        output: list[OutputMessage | FunctionCallItem] = []
        if content is not None:
            output.append(OutputMessage(id=_id("msg"), status=item_status, content=[OutputText(text=content)]))
        output += [self._call_item(c) for c in calls]
        return self._response("completed", output, usage, result.finish_reason)

    async def stream_events(self, run: GenerationRun, usage: UsageCounter) -> AsyncIterator[str]:
        """The typed events of the response, from ``response.created`` to ``response.completed``
        (or ``response.incomplete``). Text streams as it is generated; a function call opens its
        item as soon as its name is known and streams its ``arguments`` as the model writes them
        (:meth:`~.tools.ToolCallStream.call_deltas`), so the deltas of each call concatenate to its
        final arguments. Items are sent one after the other: a message item closes before the first
        call's item opens. A call cut off by ``max_output_tokens`` closes ``incomplete`` and the
        reply's text follows as a message, as the unstreamed response has it."""
        seq = 0

        def event(kind: str, **fields: Any) -> str:
            nonlocal seq
            seq += 1
            return _sse(kind, seq - 1, **fields)

        yield event("response.created", response=self._response("in_progress", []))
        yield event("response.in_progress", response=self._response("in_progress", []))
        stream = _ItemStream(event)
        tool_stream = ToolCallStream(self.plan, self.parser)
        reason = None
        async for job, out in run.outputs():
            usage.update(job, out)
            piece = tool_stream.feed(out.new_text)
            if out.finished:
                rest, calls = tool_stream.finish()
                piece += rest
                deltas = tool_stream.finish_deltas(calls)
                reason = out.finish_reason
                if not calls:  # the call begun is not in the finished reply (cut by max_output_tokens)
                    for line in stream.cut_call():
                        yield line
            else:
                deltas = tool_stream.call_deltas()
            for line in stream.text(piece):
                yield line
            for delta in deltas:
                for line in stream.call_delta(delta.index, delta.id, delta.function.name, delta.function.arguments):
                    yield line
        for line in stream.close(reason):
            yield line
        final = self._response("completed", stream.output, usage.usage(), reason)
        yield event("response.incomplete" if final.status == "incomplete" else "response.completed", response=final)


class _ItemStream:
    """The output items of one streamed response and the events that open, fill and close them.

    One item is open at a time (a message or a function call), as OpenAI streams them; a call's
    item is keyed by the call's index in the tool-call stream. :attr:`output` holds the closed items.
    """

    def __init__(self, event: Callable[..., str]) -> None:
        self.event = event
        self.output: list[OutputMessage | FunctionCallItem] = []
        self._message: OutputMessage | None = None  # the open message item
        self._text = ""
        self._call: tuple[int, FunctionCallItem] | None = None  # (call index, its open item)
        self._args = ""

    def _ids(self, item_id: str) -> dict[str, Any]:
        return {"item_id": item_id, "output_index": len(self.output)}

    def text(self, piece: str) -> list[str]:
        """Events for generated text: a message item opened when none is, then the text delta."""
        if not piece:
            return []
        lines = self._close_call("completed") + self._open_message()
        self._text += piece
        lines.append(self.event("response.output_text.delta", **self._ids(self._message.id), content_index=0,
                                delta=piece, logprobs=[]))
        return lines

    def _open_message(self) -> list[str]:
        if self._message is not None:
            return []
        self._message, self._text = OutputMessage(id=_id("msg"), status="in_progress", content=[]), ""
        return [self.event("response.output_item.added", output_index=len(self.output), item=self._message),
                self.event("response.content_part.added", **self._ids(self._message.id), content_index=0,
                           part=OutputText(text=""))]

    def call_delta(self, index: int, call_id: str | None, name: str | None, arguments: str | None) -> list[str]:
        """Events for one tool-call delta: a new call (``call_id`` set) closes the open item and opens
        its own; an ``arguments`` fragment becomes a ``function_call_arguments.delta``."""
        lines: list[str] = []
        if call_id is not None:
            lines += self._close_message("completed") + self._close_call("completed")
            item = FunctionCallItem(id=_id("fc"), call_id=call_id, name=name or "", arguments="", status="in_progress")
            self._call, self._args = (index, item), ""
            lines.append(self.event("response.output_item.added", output_index=len(self.output), item=item))
        if arguments and self._call is not None and self._call[0] == index:
            self._args += arguments
            lines.append(self.event("response.function_call_arguments.delta", **self._ids(self._call[1].id),
                                    delta=arguments))
        return lines

    def cut_call(self) -> list[str]:
        """Close the open call item as ``incomplete``: the finished reply does not hold it (its JSON
        was cut by ``max_output_tokens``), so its ``arguments`` are what was sent, not a call to run."""
        return self._close_call("incomplete")

    def close(self, finish_reason: str | None) -> list[str]:
        """Close the open item (a reply cut by ``max_output_tokens`` leaves it ``incomplete``); an
        empty reply still gets its (empty) message item."""
        status = "incomplete" if finish_reason == "length" else "completed"
        if not self.output and self._call is None:
            return self._open_message() + self._close_message(status)
        return self._close_message(status) + self._close_call(status)

    def _close_message(self, status: str) -> list[str]:
        if self._message is None:
            return []
        ids, part = self._ids(self._message.id), OutputText(text=self._text)
        done = self._message.model_copy(update={"status": status, "content": [part]})
        self._message = None
        lines = [self.event("response.output_text.done", **ids, content_index=0, text=self._text, logprobs=[]),
                 self.event("response.content_part.done", **ids, content_index=0, part=part),
                 self.event("response.output_item.done", output_index=len(self.output), item=done)]
        self.output.append(done)
        return lines

    def _close_call(self, status: str) -> list[str]:
        if self._call is None:
            return []
        item = self._call[1].model_copy(update={"status": status, "arguments": self._args})
        self._call = None
        lines = [self.event("response.function_call_arguments.done", **self._ids(item.id), arguments=item.arguments),
                 self.event("response.output_item.done", output_index=len(self.output), item=item)]
        self.output.append(item)
        return lines


@router.post("/v1/responses", response_model=None)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    """Generate a model response (OpenAI's Responses API, stateless).

    Returns a ``response`` object, or with ``stream: true`` its typed SSE events. Errors (OpenAI
    body): 400 for what cannot be served, naming the field (``previous_response_id`` and other
    stored state, non-function tools, non-text input parts, context overflow naming ``input``);
    404 unknown model; 429 queue full; 503 model unavailable.
    """
    return http_response(await ResponsesServing(request, body).create())
