"""Tool calls without a parser: an answer that must call a tool is constrained to the JSON
``{"name": ..., "arguments": {...}}`` of one of the tools (a grammar from their schemas), and
``CallStream`` turns that text, as it streams, into OpenAI's tool-call deltas."""

from __future__ import annotations

import json
from typing import Any

from llm_worker.openai.errors import OpenAIError
from llm_worker.openai.requests import ChatRequest, Tool

CALL_PREFIX = '{"name": '  # how a tool-call answer begins: {"name": "...", "arguments": {...}}
ARGUMENTS = ', "arguments": '


def tool_call_schema(tools: list[Tool]) -> dict[str, Any]:
    """An answer that is a call of one of ``tools``: ``{"name": ..., "arguments": {...}}``, the
    arguments valid against that tool's parameters."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                "arguments": tool.function.parameters or {"type": "object", "properties": {}},
            },
            "required": ["name", "arguments"],
        }
        for tool in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def called_tools(request: ChatRequest) -> list[Tool]:
    """The tools an answer must call: all with tool_choice "required", the named one, none with "none"."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none"):
            raise OpenAIError("tool_choice: needs tools", "tool_choice")
        return []
    if choice is None or choice == "auto":
        raise OpenAIError(
            'tool_choice: "auto" (the default when tools are given) is not supported, because this worker '
            'cannot tell a call from text for every chat template: set tool_choice to "required", to '
            '{"type": "function", "function": {"name": ...}}, or to "none"',
            "tool_choice",
        )
    if choice == "none":
        return []
    if choice == "required":
        return request.tools
    named = [tool for tool in request.tools if tool.function.name == choice.function.name]
    if not named:
        raise OpenAIError(f"tool_choice: no tool is named {choice.function.name!r}", "tool_choice")
    return named


class CallStream:
    """Turns a tool-call answer's text, as it streams, into OpenAI's tool-call deltas: the name once
    it is whole, then the arguments' JSON piece by piece (the answer's last character, the call's
    closing brace, is held back until the end)."""

    def __init__(self) -> None:
        self.text = ""
        self.name: str | None = None
        self.sent = 0  # characters of the arguments already sent

    def add(self, piece: str) -> list[tuple[str | None, str]]:
        self.text += piece
        out = []
        if self.name is None:
            head, found, _ = self.text.partition(ARGUMENTS)
            if not found:
                return []
            self.name = json.loads(head.removeprefix(CALL_PREFIX))
            out.append((self.name, ""))
        start = self.text.index(ARGUMENTS) + len(ARGUMENTS)
        arguments = self.text[start:-1]  # the last character may be the call's closing brace
        if len(arguments) > self.sent:
            out.append((None, arguments[self.sent :]))
            self.sent = len(arguments)
        return out

    def end(self, complete: bool) -> list[tuple[str | None, str]]:
        """The rest, once the answer is over: a complete call still holds back its closing brace,
        a cut one sends what it has."""
        if self.name is None or complete:
            return []
        rest = self.text[self.text.index(ARGUMENTS) + len(ARGUMENTS) + self.sent :]
        return [(None, rest)] if rest else []
