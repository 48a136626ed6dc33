"""Tool calls, decided by a grammar rather than parsed after the fact.

An answer to a request with ``tools`` is constrained (llguidance, a Lark grammar) to the format
the model's chat template teaches, the arguments valid against that tool's parameters. With
``tool_choice`` ``"auto"`` the grammar also offers free text that can never be read as a call, so
the model decides, and a call it starts is always whole, valid JSON for its tool; ``"required"``
or a named function offers calls only; ``parallel_tool_calls: false`` allows one.

Formats (``tool_format``, read from how the template writes an earlier call):
- ``hermes``: Hermes/Qwen's ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one
  block per call;
- ``llama3_json``: Llama 3.1-3.3's ``{"name": ..., "parameters": {...}}`` as the whole answer, one
  call (its templates take one call per turn); text is anything that does not begin with ``{``;
- ``generic``: a template that ignores ``tools`` (SmolLM2's, most base models') gets Hermes' tags,
  with the tools described in the system message and earlier calls and results written as text.
Any other template's format (Mistral's ``[TOOL_CALLS]``, ...) is refused, naming ``tool_choice``.

``CallSplitter`` turns such an answer, as it streams, into text deltas or tool-call deltas,
never the tags themselves.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from llm_worker.engine.constraints import JSON_LAYOUT, MAX_DEPTH, closed_objects, json_depth
from llm_worker.openai.errors import OpenAIError
from llm_worker.openai.requests import ChatRequest, Message, Tool

OPEN, CLOSE, BETWEEN = "<tool_call>\n", "\n</tool_call>", "\n"  # Hermes' tags
CALL_PREFIX = '{"name": '  # a call's JSON: {"name": "...", "arguments": {...}} (Llama 3's: "parameters")
PROVEN = (
    "Hermes/Qwen <tool_call> tags, Llama 3.1-3.3's JSON, and templates without tools "
    "(the generic format, tools described in the system message)"
)
GENERIC_PROMPT = (
    "You can call functions to answer. Their signatures, one JSON object per line:\n<tools>\n{tools}\n</tools>\n"
    "To call one, answer only with\n<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n"
    "</tool_call>\n(one such block per call). Otherwise, answer in plain text."
)


@dataclass(frozen=True)
class ToolFormat:
    name: str  # hermes: the template's own tags; generic: the same tags, tools described by this worker; llama3_json
    describe: bool  # the tools, earlier calls and results are written into the messages by this worker
    open: str = OPEN  # before each call ("": the call is the answer, known by its first character)
    close: str = CLOSE  # after each call
    key: str = "arguments"  # the call's JSON: {"name": ..., key: {...}}
    parallel: bool = True  # several calls in one answer

    @property
    def arguments(self) -> str:
        return f', "{self.key}": '


HERMES = ToolFormat("hermes", describe=False)
GENERIC = ToolFormat("generic", describe=True)
LLAMA3_JSON = ToolFormat("llama3_json", describe=False, open="", close="", key="parameters", parallel=False)
PROBE_CALL = {"id": "call_probe7f3", "type": "function", "function": {"name": "probe_tool_7f3", "arguments": {"city": "Oslo"}}}


@functools.lru_cache(maxsize=8)
def tool_format(tokenizer, template: str | None) -> ToolFormat:
    """How the chat template (``CHAT_TEMPLATE``, else the model's) writes tool calls: read from how
    it writes an earlier call, and whether it writes the tools at all."""
    source = template if template is not None else getattr(tokenizer, "chat_template", None) or ""
    probe = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "probe_tool_7f3", "parameters": {"type": "object", "properties": {}}}}

    def render(messages, tools):
        return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False)

    if render(probe, [tool]) == render(probe, None):
        return GENERIC
    try:
        history = [*probe, {"role": "assistant", "content": "", "tool_calls": [PROBE_CALL]}]
        written = render([*history, {"role": "tool", "tool_call_id": PROBE_CALL["id"], "content": "sunny"}], [tool])
    except Exception:  # a template with its own rules for calls (ids, roles): read its source alone
        written = ""
    if "<tool_call>" in written or "<tool_call>" in source:
        return HERMES
    if re.search(r'\{"name": "probe_tool_7f3", "parameters": \{"city": "Oslo"\}\}', written):
        return LLAMA3_JSON
    raise OpenAIError(
        f"tool_choice: this model's chat template writes tool calls in a format this worker does not read; proven: {PROVEN}. "
        "Set CHAT_TEMPLATE to a template in one of them, or send no tools",
        "tool_choice",
    )


def describe_tools(messages: list[Message], tools: list[Tool] | None) -> list[dict[str, Any]]:
    """The conversation as a template without tools takes it (the generic format): the tools in
    the system message, earlier calls as the assistant's tagged text, results as user messages."""
    conversation = []
    for message in messages:
        turn = message.for_template()
        if message.tool_calls:
            calls = [OPEN + json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]}) + CLOSE
                     for call in turn.pop("tool_calls")]
            turn["content"] = "\n".join(([turn["content"]] if turn["content"] else []) + calls)
        if message.role == "tool":
            turn = {"role": "user", "content": f"<tool_response>\n{message.text}\n</tool_response>"}
        conversation.append(turn)
    if tools:
        signatures = "\n".join(json.dumps(tool.function.model_dump(exclude_none=True)) for tool in tools)
        prompt = GENERIC_PROMPT.format(tools=signatures)
        if conversation and conversation[0]["role"] == "system":
            conversation[0] = {**conversation[0], "content": f"{conversation[0]['content']}\n\n{prompt}"}
        else:
            conversation.insert(0, {"role": "system", "content": prompt})
    return conversation


def offered_tools(request: ChatRequest) -> tuple[list[Tool], bool]:
    """The tools an answer may call, and whether it may be text instead: all and text with
    ``"auto"`` (the default when tools are given), all with ``"required"``, the named one, none
    with ``"none"``."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none"):
            shown = repr(choice) if isinstance(choice, str) else f"the function {choice.function.name!r}"
            raise OpenAIError(f"tool_choice: {shown} needs tools, and this request has none; send tools, or leave tool_choice out",
                              "tool_choice")
        return [], True
    if choice is None or choice == "auto":
        return request.tools, True
    if choice == "none":
        return [], True
    if choice == "required":
        return request.tools, False
    named = [tool for tool in request.tools if tool.function.name == choice.function.name]
    if not named:
        raise OpenAIError(f"tool_choice: no tool is named {choice.function.name!r}", "tool_choice")
    return named, False


def call_grammar(tools: list[Tool], text: bool, parallel: bool, fmt: ToolFormat = HERMES) -> str:
    """The Lark grammar (llguidance's, with ``%json``) of an answer that calls ``tools`` (or, with
    ``text``, is free text that cannot be read as a call), one call or several, in ``fmt``."""
    for i, tool in enumerate(tools):
        if json_depth(tool.function.parameters) > MAX_DEPTH:
            raise OpenAIError(f"tools[{i}].function.parameters: nested more than {MAX_DEPTH} levels deep", f"tools[{i}].function.parameters")
    definitions: dict[str, Any] = {}
    calls = []
    for i, tool in enumerate(tools):
        parameters = hoisted(tool.function.parameters or {"type": "object", "properties": {}}, f"tool{i}_", definitions)
        calls.append({
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, fmt.key: closed_objects(parameters)},
            "required": ["name", fmt.key],
            "additionalProperties": False,
        })
    strict = any(tool.function.strict for tool in tools)  # else what cannot be enforced is left out (and logged)
    schema = {"x-guidance": {**JSON_LAYOUT, "lenient": not strict}, "anyOf": calls}
    if definitions:  # closed as the parameters are: a nested model's object takes no made-up keys either
        schema["$defs"] = {name: closed_objects(sub) for name, sub in definitions.items()}
    lines = [
        "start: TEXT | calls" if text else "start: calls",
        f"calls: call ({json.dumps(BETWEEN)} call)*" if parallel and fmt.parallel else "calls: call",
        f"call: {json.dumps(fmt.open)} call_json {json.dumps(fmt.close)}" if fmt.open else "call: call_json",
        f"call_json: %json {json.dumps(schema)}",
    ]
    if text:  # text never holds a call's tag; without tags, it never begins as a call's JSON does
        lines.append(f"TEXT: /(?s:.+)/ & ~/(?s:.*{fmt.open.strip()}.*)/" if fmt.open else "TEXT: /(?s:.+)/ & ~/(?s:\\s*\\{.*)/")
    return "\n".join(lines) + "\n"


def hoisted(schema: dict[str, Any], prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters placed inside the calls' schema: its ``$defs`` (and ``definitions``)
    moved to that schema's root under ``prefix``, and its ``#/$defs/...`` references made to point
    there (pydantic writes nested models and enums as such references: instructor's tools)."""
    local = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    if not local:
        return schema

    def moved(value: Any) -> Any:
        if isinstance(value, dict):
            out = {key: moved(item) for key, item in value.items() if key not in ("$defs", "definitions")}
            ref = out.get("$ref")
            if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
                out["$ref"] = "#/$defs/" + prefix + ref.rsplit("/", 1)[1]
            return out
        return [moved(item) for item in value] if isinstance(value, list) else value

    definitions.update({prefix + name: moved(value) for name, value in local.items()})
    return moved(schema)


def parse_calls(text: str, fmt: ToolFormat = HERMES) -> list[tuple[str, Any]] | None:
    """A whole answer's calls as (name, arguments), or None when it is text."""
    if not fmt.open:
        if not text.startswith("{"):
            return None
        call = json.loads(text)
        return [(call["name"], call[fmt.key])]
    if not text.startswith(fmt.open):
        return None
    calls = []
    for block in text.split(fmt.close):
        block = block.strip("\n")
        if block:
            call = json.loads(block.removeprefix(fmt.open.strip()))
            calls.append((call["name"], call[fmt.key]))
    return calls


class CallStream:
    """One call's JSON as it streams: the name once it is whole, then the arguments' JSON piece by
    piece (its last character, the call's closing brace, is held back until the end)."""

    def __init__(self, arguments: str) -> None:
        self.text = ""
        self.name: str | None = None
        self.sent = 0  # characters of the arguments already sent
        self.separator = arguments  # between the name and the arguments: ', "arguments": '

    def add(self, piece: str) -> list[tuple[str | None, str]]:
        self.text += piece
        out = []
        if self.name is None:
            head, found, _ = self.text.partition(self.separator)
            if not found:
                return []
            self.name = json.loads(head.removeprefix(CALL_PREFIX))
            out.append((self.name, ""))
        start = self.text.index(self.separator) + len(self.separator)
        arguments = self.text[start:-1]  # the last character may be the call's closing brace
        if len(arguments) > self.sent:
            out.append((None, arguments[self.sent :]))
            self.sent = len(arguments)
        return out

    def end(self, complete: bool) -> list[tuple[str | None, str]]:
        """The rest: a complete call still holds back its closing brace, a cut one sends what it has."""
        if self.name is None or complete:
            return []
        rest = self.text[self.text.index(self.separator) + len(self.separator) + self.sent :]
        return [(None, rest)] if rest else []


class CallSplitter:
    """An answer's text, as it streams, into ``("text", piece)`` and ``("call", k, name, arguments)``
    events (call ``k`` of the answer: its name first, then its arguments' JSON in pieces). Text
    that may still become a call's tag is held back until it is known."""

    def __init__(self, text: bool, fmt: ToolFormat = HERMES) -> None:
        self.mode = "undecided" if text else "calls"
        self.fmt = fmt
        self.opening = fmt.open or "{"  # what begins an answer that calls
        self.buffer = ""
        self.calls: list[CallStream] = []
        self.fed = 0  # characters of the current call's block fed to its CallStream

    def add(self, piece: str) -> list[tuple]:
        if self.mode == "text":
            return [("text", piece)] if piece else []
        self.buffer += piece
        if self.mode == "undecided":
            if self.opening.startswith(self.buffer):
                return []
            if not self.buffer.startswith(self.opening):
                self.mode = "text"
                return [("text", self.buffer)]
            self.mode = "calls"
        if not self.fmt.open:  # the answer is one call's JSON
            if not self.calls:
                self.calls.append(CallStream(self.fmt.arguments))
            events, self.buffer = self.calls[0].add(self.buffer), ""
            return [("call", 0, *event) for event in events]
        return self._calls(final=False)

    def end(self, complete: bool) -> list[tuple]:
        if self.mode == "undecided":  # a text that began like a tag
            self.mode = "text"
            return [("text", self.buffer)] if self.buffer else []
        if self.mode == "text":
            return []
        out = self._calls(final=True)
        if self.calls and not complete:
            out += [("call", len(self.calls) - 1, *event) for event in self.calls[-1].end(False)]
        return out

    def _calls(self, final: bool) -> list[tuple]:
        out = []
        if not self.fmt.open:  # fed as it came (add)
            return out
        opening, closing = self.fmt.open, self.fmt.close
        while True:
            start = self.buffer.find(opening)
            if start < 0:
                return out
            if not self.calls or self.fed < 0:
                self.calls.append(CallStream(self.fmt.arguments))
                self.fed = 0
            body_start = start + len(opening)
            close = self.buffer.find(closing, body_start)
            body = self.buffer[body_start : close if close >= 0 else None]
            if close < 0 and not final:
                body = body[: max(0, len(body) - len(closing))]  # the closing tag may be arriving
            k = len(self.calls) - 1
            out += [("call", k, *event) for event in self.calls[-1].add(body[self.fed :])]
            self.fed = len(body)
            if close < 0:
                return out
            self.buffer = self.buffer[close + len(closing) :]
            self.fed = -1  # the next tag starts a new call
