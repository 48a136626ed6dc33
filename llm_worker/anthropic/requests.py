"""Anthropic's Messages API request (``POST /v1/messages``), parsed strictly, and the chat request
it means: ``system`` and the messages' blocks into chat messages (``tool_use`` into tool calls,
``tool_result`` into tool messages, a trailing assistant message into a prefill the answer
continues), ``tools`` and ``tool_choice`` into chat tools, ``stop_sequences`` into stop strings.

Refusals are the chat request's, their parameters renamed to this API's (``renamed``), and go out
in Anthropic's error shape (``errors.py``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import Field

from llm_worker.openai.errors import OpenAIError
from llm_worker.openai.errors import renamed as chat_renamed
from llm_worker.openai.requests import _Body, parse_body

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
# a chat request's parameter -> this API's name for it, in refusals
PARAMS = {
    "max_completion_tokens": "max_tokens", "stop": "stop_sequences", "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
    "continue_final_message": "messages", "response_format.json_schema.schema": "output_config.format.schema",
    "response_format": "output_config.format", "thinking_token_budget": "thinking",
}
MEDIA = ("image", "document", "search_result", "container_upload")


class TextBlock(_Body):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # prompt caching is automatic here (the prefix cache)
    citations: list[Any] | None = None


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None


class ThinkingBlock(_Body):
    """An earlier answer's thinking: left out of the prompt, as Anthropic leaves out earlier turns' thinking."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


BLOCKS = {"text": TextBlock, "tool_use": ToolUseBlock, "tool_result": ToolResultBlock, "thinking": ThinkingBlock,
          "redacted_thinking": ThinkingBlock}


class Message(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class Tool(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(_Body):
    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: int | None = Field(None, ge=1)
    display: Literal["summarized", "omitted"] | None = None


class OutputFormat(_Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Body):
    format: OutputFormat | None = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # a label only: one effort here


class Metadata(_Body):
    user_id: str | None = None


class MessagesRequest(_Body):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float = Field(1.0, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None  # its format: structured output, under a JSON schema
    metadata: Metadata | None = None  # a label only
    service_tier: Literal["auto", "standard_only"] | None = None  # a label only: one tier here
    cache_control: dict[str, Any] | None = None  # a label only: prompt caching is automatic here (the prefix cache)


class CountTokensRequest(_Body):
    """``/v1/messages/count_tokens``: a message request's prompt, without its answer's settings."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


def blocks(message: Message, i: int) -> list[Any]:
    """A message's content as parsed blocks (a string is one text block)."""
    if isinstance(message.content, str):
        return [TextBlock(type="text", text=message.content)]
    parsed = []
    for j, raw in enumerate(message.content):
        where = f"messages[{i}].content[{j}]"
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind in MEDIA:
            raise OpenAIError(f"{where}: {kind} blocks are not supported: this worker serves a text-only model; send text blocks", where)
        if kind not in BLOCKS:
            raise OpenAIError(f"{where}.type: a block's type must be one of {', '.join(BLOCKS)}", f"{where}.type")
        parsed.append(parse_body(BLOCKS[kind], raw, prefix=where))
    return parsed


def conversation(request: MessagesRequest | CountTokensRequest) -> tuple[list[dict[str, Any]], bool]:
    """The chat messages a request means, and whether its last (assistant) message is a prefill."""
    messages: list[dict[str, Any]] = []
    if request.system:
        system = request.system if isinstance(request.system, str) else "".join(block.text for block in request.system)
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(request.messages):
        parsed = blocks(message, i)
        text = "".join(block.text for block in parsed if isinstance(block, TextBlock))
        if message.role == "user":
            for block in parsed:
                if isinstance(block, ToolUseBlock | ThinkingBlock):
                    raise OpenAIError(f"messages[{i}]: a user message holds no {block.type} blocks", f"messages[{i}].content")
                if isinstance(block, ToolResultBlock):
                    content = block.content if isinstance(block.content, str) else "".join(b.text for b in block.content or [])
                    messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
            if text or not any(isinstance(block, ToolResultBlock) for block in parsed):
                messages.append({"role": "user", "content": text})
            continue
        if any(isinstance(block, ToolResultBlock) for block in parsed):
            raise OpenAIError(f"messages[{i}]: an assistant message holds no tool_result blocks", f"messages[{i}].content")
        calls = [
            {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}}
            for block in parsed if isinstance(block, ToolUseBlock)
        ]
        messages.append({"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})})
    prefill = request.messages[-1].role == "assistant"
    if prefill and messages[-1].get("tool_calls"):
        raise OpenAIError(
            f"messages[{len(request.messages) - 1}]: the last message is an assistant's tool_use: send its tool_result in a user message",
            "messages",
        )
    return messages, prefill


def tools_body(request: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    """The chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``."""
    body: dict[str, Any] = {}
    choice = request.tool_choice
    if request.tools:
        body["tools"] = [
            {"type": "function", "function": {"name": tool.name, "parameters": tool.input_schema,
                                              **({"description": tool.description} if tool.description else {})}}
            for tool in request.tools
        ]
    if choice is not None:
        if choice.type == "tool" and not choice.name:
            raise OpenAIError("tool_choice.name: needed with type tool", "tool_choice.name")
        if choice.type != "tool" and choice.name is not None:
            raise OpenAIError(f"tool_choice.name: only with type tool, not {choice.type}", "tool_choice.name")
        if not request.tools and choice.type != "none":
            raise OpenAIError(f"tool_choice: {choice.type} needs tools", "tool_choice")
        if request.tools:
            body["tool_choice"] = (
                {"type": "function", "function": {"name": choice.name}} if choice.type == "tool"
                else {"auto": "auto", "any": "required", "none": "none"}[choice.type]
            )
        if choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    return body


def check_thinking(request: MessagesRequest | CountTokensRequest) -> None:
    if request.thinking is not None and request.thinking.type == "enabled" and request.thinking.budget_tokens is None:
        raise OpenAIError("thinking.budget_tokens: needed when thinking is enabled", "thinking.budget_tokens")


def thinking_body(request: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    """``thinking`` as the chat request says it: ``enable_thinking: false`` for the chat template
    (Qwen3's switch) when disabled."""
    check_thinking(request)
    thinking = request.thinking
    if thinking is None or thinking.type == "adaptive":
        return {}
    if thinking.type == "disabled":
        return {"chat_template_kwargs": {"enable_thinking": False}}
    if isinstance(request, MessagesRequest) and thinking.budget_tokens >= request.max_tokens:
        raise OpenAIError(f"thinking.budget_tokens: must be less than max_tokens ({request.max_tokens}), which also bounds the answer",
                          "thinking.budget_tokens")
    return {"thinking_token_budget": thinking.budget_tokens}  # the engine closes the thinking when they are spent


def chat_body(request: MessagesRequest) -> dict[str, Any]:
    """The chat completions request a Messages request means."""
    messages, prefill = conversation(request)
    body: dict[str, Any] = {
        "model": request.model, "messages": messages, "max_completion_tokens": request.max_tokens,
        "temperature": request.temperature, "stream": request.stream, **tools_body(request), **thinking_body(request),
    }
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.top_k is not None and request.top_k > 0:
        body["top_k"] = request.top_k
    if request.stop_sequences:
        body["stop"] = request.stop_sequences
    if prefill:
        body["continue_final_message"] = True
    if request.output_config is not None and request.output_config.format is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": request.output_config.format.schema_}}
    return body


def renamed(err: OpenAIError) -> OpenAIError:
    """A chat request's refusal, naming this API's parameter (a tool's ``input_schema`` too)."""
    def tools(text: str) -> str:
        return re.sub(r"(tools\[\d+\])\.function\.(parameters)?", lambda m: m[1] + (".input_schema" if m[2] else "."), text)

    return chat_renamed(err, PARAMS, tools)
