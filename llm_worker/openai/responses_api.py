"""OpenAI's Responses API (``POST /v1/responses``), stateless: what the OpenAI Agents SDK and newer
clients send by default. A request is turned into the chat request it means (``instructions`` and
``input`` into messages, function calls and their outputs into tool calls and tool messages,
``text.format`` into ``response_format``, ``max_output_tokens``), prepared and run as one, and its
answer shaped as a response object: ``message`` and ``function_call`` output items. A stream sends
the typed events (``response.created``, ``response.output_text.delta``, ...,
``response.completed``), each with its ``sequence_number``.

Nothing is stored: ``previous_response_id`` is refused (send the whole conversation), ``store`` is
accepted and does nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from llm_worker.engine import Completion, Delta, EngineError
from llm_worker.openai.errors import OpenAIError, renamed
from llm_worker.openai.prepare import prepare
from llm_worker.openai.requests import CHAT, Function, _Body, parse_body, text_parts_only
from llm_worker.openai.responses import FINISH_REASONS
from llm_worker.openai.streams import AnswerStream
from llm_worker.openai.tool_calls import parse_calls

if TYPE_CHECKING:
    from llm_worker.service import Worker

RESPONSES = "/v1/responses"
# a chat request's parameter -> the Responses API's name for it, in refusals
PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format"}


class InputText(_Body):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None  # an earlier answer's, sent back as it came


class _Item(_Body):
    id: str | None = None  # as an earlier response named the item; not needed
    status: str | None = None


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        return text_parts_only(content, ("input_text", "output_text"))


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str
    output: str


ITEMS = {"message": MessageItem, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem}


class FunctionTool(Function):
    """The Responses API's tool: a chat request's function, flat, with its type."""

    type: Literal["function"]


class NamedTool(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextOptions(_Body):
    format: TextFormat | None = None


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    stream: bool = False
    previous_response_id: str | None = None
    truncation: Literal["disabled"] | None = None
    include: list[str] | None = None  # extra output fields: none are served (the Agents SDK sends an empty list)
    # labels only: accepted, no effect (nothing is stored)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


def chat_body(request: ResponsesRequest) -> dict[str, Any]:
    """The chat completions request a Responses request means."""
    if request.include:
        raise OpenAIError(f"include: {request.include[0]!r} is not served here; send an empty list or leave it out", "include")
    if request.previous_response_id is not None:
        raise OpenAIError(
            "previous_response_id: this worker stores no responses; send the whole conversation in input", "previous_response_id"
        )
    messages: list[dict[str, Any]] = [{"role": "system", "content": request.instructions}] if request.instructions else []
    items = [{"role": "user", "content": request.input}] if isinstance(request.input, str) else request.input
    for i, raw in enumerate(items):
        kind = raw.get("type", "message") if isinstance(raw, dict) else None
        if kind not in ITEMS:
            raise OpenAIError(f"input[{i}]: an item's type must be one of {', '.join(ITEMS)}", f"input[{i}]")
        item = parse_body(ITEMS[kind], raw, prefix=f"input[{i}]")
        if isinstance(item, MessageItem):
            text = item.content if isinstance(item.content, str) else "".join(part.text for part in item.content)
            messages.append({"role": item.role, "content": text})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") is not None:
                messages[-1]["tool_calls"].append(call)  # calls made in one answer
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    body: dict[str, Any] = {"messages": messages, "temperature": request.temperature, "top_p": request.top_p, "stream": request.stream}
    for name, value in (("model", request.model), ("max_completion_tokens", request.max_output_tokens),
                        ("parallel_tool_calls", request.parallel_tool_calls)):
        if value is not None:
            body[name] = value
    if request.tools:
        body["tools"] = [{"type": "function", "function": tool.model_dump(exclude_none=True, exclude={"type"})} for tool in request.tools]
    if isinstance(request.tool_choice, NamedTool):
        body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.name}}
    elif request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice
    format_ = request.text.format if request.text else None
    if format_ is not None and format_.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif format_ is not None and format_.type == "json_schema":
        schema = {"name": format_.name or "answer", "schema": format_.schema_ or {"type": "object"}, "strict": format_.strict}
        body["response_format"] = {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}
    return body


class ResponsesAnswer:
    """One Responses request, prepared: its response object, or its stream of typed events."""

    def __init__(self, worker: Worker, body: Any, job_id: str | None = None) -> None:
        self.request = parse_body(ResponsesRequest, body)
        try:
            self.prepared = prepare(worker, CHAT, chat_body(self.request), job_id)
        except OpenAIError as err:
            raise renamed(err, PARAMS) from None
        self.worker = worker
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = 0

    @property
    def streaming(self) -> bool:
        return self.request.stream

    def response(self, status: str, output: list[dict[str, Any]], done: Completion | None = None) -> dict[str, Any]:
        request = self.request
        usage = None
        if done is not None:
            usage = {
                "input_tokens": done.prompt_tokens,
                "input_tokens_details": {"cached_tokens": done.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": done.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": done.prompt_tokens + done.completion_tokens,
            }
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
            "incomplete_details": incomplete, "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "model": self.prepared.model, "output": output, "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": None, "temperature": request.temperature, "top_p": request.top_p,
            "tool_choice": request.tool_choice.model_dump() if isinstance(request.tool_choice, NamedTool) else request.tool_choice or "auto",
            "tools": [tool.model_dump(exclude_none=True, by_alias=True) for tool in request.tools or []],
            "text": {"format": request.text.format.model_dump(exclude_none=True, by_alias=True)} if request.text and request.text.format
            else {"format": {"type": "text"}},
            "truncation": "disabled", "metadata": request.metadata or {}, "user": request.user, "usage": usage,
        }

    def message_item(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
        return {"type": "message", "id": f"msg_{self.id[5:]}", "status": status, "role": "assistant", "content": content}

    def call_item(self, k: int, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
        return {"type": "function_call", "id": f"fc_{self.id[5:]}_{k}", "call_id": f"call_{self.id[5:21]}_{k}",
                "name": name, "arguments": arguments, "status": status}

    def reasoning_item(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
        return {"type": "reasoning", "id": f"rs_{self.id[5:]}", "summary": [], "content": content, "status": status}

    def output(self, done: Completion) -> tuple[str, list[dict[str, Any]]]:
        finished = FINISH_REASONS[done.finish_reason] == "stop"
        reasoning = self.prepared.reasoning
        thought, text = reasoning.split(done.text) if reasoning else (None, done.text)
        items = [self.reasoning_item(thought)] if thought is not None else []
        calls = parse_calls(text, self.prepared.tool_format) if self.prepared.tool_calls and finished else None
        if calls:
            return "completed", items + [self.call_item(k, name, json.dumps(arguments, ensure_ascii=False)) for k, (name, arguments) in enumerate(calls)]
        return "completed" if finished else "incomplete", items + ([self.message_item(text)] if text or not items else [])

    async def whole_answer(self) -> dict[str, Any]:
        """The response object; raises ``EngineError`` when the engine fails the request."""
        async for _, event in self.worker.events(self.prepared.requests):
            if isinstance(event, Completion):
                status, output = self.output(event)
                return self.response(status, output, event)
        raise EngineError("the request ended without an answer")

    def event(self, type_: str, **fields: Any) -> str:
        data = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {type_}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def sse(self) -> AsyncIterator[str]:
        """The typed events; a failure in the engine ends the stream with ``response.failed``."""
        yield self.event("response.created", response=self.response("in_progress", []))
        yield self.event("response.in_progress", response=self.response("in_progress", []))
        stream = ItemStream(self)
        try:
            async for _, event in self.worker.events(self.prepared.requests):
                if isinstance(event, Delta):
                    for line in stream.add(event.text):
                        yield line
                    continue
                finished = FINISH_REASONS[event.finish_reason] == "stop"
                for line in stream.end(finished):
                    yield line
                status = "completed" if finished else "incomplete"
                yield self.event(f"response.{status}", response=self.response(status, stream.items, event))
        except EngineError as err:
            failed = self.response("failed", stream.items) | {"error": {"code": "server_error", "message": str(err)}}
            yield self.event("response.failed", response=failed)


class ItemStream(AnswerStream):
    """An answer's text as it streams into output items and their events: a reasoning item, then a
    message's text deltas or function calls' argument deltas."""

    def __init__(self, answer: ResponsesAnswer) -> None:
        super().__init__(answer.prepared)
        self.answer = answer
        self.thought: str | None = None  # the open reasoning item's text
        self.items: list[dict[str, Any]] = []  # finished items
        self.text: str | None = None  # the open message's text
        self.call: dict[str, Any] | None = None  # the open call

    def _thought(self, piece: str) -> list[str]:
        answer, out = self.answer, []
        if self.thought is None:
            self.thought = ""
            out.append(answer.event("response.output_item.added", output_index=len(self.items), item=answer.reasoning_item("", "in_progress")))
        self.thought += piece
        out.append(answer.event("response.reasoning_text.delta", item_id=f"rs_{answer.id[5:]}", output_index=len(self.items),
                                content_index=0, delta=piece))
        return out

    def _finish(self) -> list[str]:
        out = self._text("") if self.text is None and self.call is None and self.thought is None and not self.items else []
        return out + self._close()  # an empty answer is an empty message

    def _text(self, piece: str) -> list[str]:
        answer, out = self.answer, self._close() if self.thought is not None else []  # the thinking ends where the answer begins
        if self.text is None:
            self.text = ""
            item = answer.message_item("", "in_progress")
            out.append(answer.event("response.output_item.added", output_index=len(self.items), item=item))
            out.append(answer.event("response.content_part.added", item_id=item["id"], output_index=len(self.items), content_index=0,
                                    part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        if piece:
            self.text += piece
            out.append(answer.event("response.output_text.delta", item_id=f"msg_{answer.id[5:]}", output_index=len(self.items),
                                    content_index=0, delta=piece, logprobs=[]))
        return out

    def _call(self, k: int, name: str | None, arguments: str) -> list[str]:
        answer, out = self.answer, []
        if name is not None:
            out += self._close()
            self.call = answer.call_item(k, name, "", "in_progress")
            out.append(answer.event("response.output_item.added", output_index=len(self.items), item=self.call))
        if arguments:
            self.call["arguments"] += arguments
            out.append(answer.event("response.function_call_arguments.delta", item_id=self.call["id"],
                                    output_index=len(self.items), delta=arguments))
        return out

    def _close(self) -> list[str]:
        """Finish the open item, if any."""
        answer, index, out = self.answer, len(self.items), []
        if self.thought is not None:
            item = answer.reasoning_item(self.thought)
            out.append(answer.event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                                    text=self.thought))
            self.thought = None
        elif self.text is not None:
            item = answer.message_item(self.text)
            part = item["content"][0]
            out.append(answer.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                                    text=self.text, logprobs=[]))
            out.append(answer.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part))
            self.text = None
        elif self.call is not None:
            item = {**self.call, "status": "completed"}
            out.append(answer.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                    arguments=item["arguments"]))
            self.call = None
        else:
            return []
        out.append(answer.event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        return out
