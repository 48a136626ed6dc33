"""Models that think: DeepSeek-R1's distills, Qwen3, any fine-tune that writes ``<think>`` ... ``</think>``
before its answer. Their thinking comes back apart from the answer (``reasoning_content`` on Chat
Completions, a ``reasoning`` item on Responses, ``thinking`` blocks on Messages), and a constraint
(a schema, tool calls) applies to the answer, after the thinking. A thinking budget (Anthropic's
``budget_tokens``, vLLM's ``thinking_token_budget``) is the engine's: ``engine/thinking.py``.

Whether a request's answer may think is read from its chat template and its rendered prompt
(``detect``): the template writes ``<think>`` (else the model does not think); a prompt that ends
with ``</think>`` has thinking turned off (Qwen3's ``enable_thinking: false`` writes an empty
block); one that ends with ``<think>`` has opened it (the R1 distills): the answer begins inside the
thinking, and its text may hold only the closing tag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Reasoning:
    """How a request's answer thinks: ``opened`` by the prompt, or free to open ``<think>`` itself."""

    opened: bool

    def split(self, text: str) -> tuple[str | None, str]:
        """(the thinking or None, the answer) of a whole answer."""
        splitter = ReasoningSplitter(self.opened)
        pieces = splitter.add(text) + splitter.end()
        thought = "".join(piece for kind, piece in pieces if kind == "reasoning")
        answer = "".join(piece for kind, piece in pieces if kind == "content")
        return (thought if splitter.thought else None), answer  # as streamed: the stream's pieces join to these

    def grammar(self, answer: str) -> str:
        """A Lark grammar (llguidance's) of thinking, then ``answer``: the body of a rule (a
        ``%json`` schema, alternatives, a call grammar's start). The thinking is one lexeme that
        ends at the first ``</think>`` (a lexeme that stops there, rather than a stop string)."""
        thinking = "THINK WS" if self.opened else f'"{OPEN}" THINK WS'
        return "\n".join([
            f"start: {thinking} answer" if self.opened else f"start: thinking? answer\nthinking: {thinking}",
            "THINK: /(?s:.*)<\\/think>/ & ~/(?s:.*<\\/think>.+)/",
            "WS: /[ \\t\\n]*/",
            f"answer: {answer}",
        ])


def detect(template: str | None, prompt: str) -> Reasoning | None:
    """The request's ``Reasoning``, or None where its answer does not think."""
    if not template or OPEN not in template:
        return None
    tail = prompt.rstrip()
    if tail.endswith(CLOSE):
        return None
    return Reasoning(opened=tail.endswith(OPEN))


def thinks(template: str | None) -> str:
    """What the start log says of a chat template (an adapter's own is read when it is used)."""
    if template and OPEN in template:
        return f"thinks ({OPEN} ... {CLOSE}): the thinking comes back apart from the answer (reasoning_content, reasoning items, thinking blocks)"
    return f"does not think (it writes no {OPEN} block): answers are returned whole"


def wrap_lark(lark: str) -> str:
    """A whole Lark grammar as the ``answer`` of a thinking grammar: its start rule renamed."""
    lines = lark.splitlines()
    return "\n".join("answer_start:" + line[len("start:"):] if line.startswith("start:") else line for line in lines)


def choice_body(choices: list[str]) -> str:
    return " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class ReasoningSplitter:
    """An answer's text, as it streams, into ``("reasoning", piece)`` and ``("content", piece)``;
    a piece that may still become a tag is held back until it is known. ``thought``: whether it
    thought at all."""

    def __init__(self, opened: bool) -> None:
        self.state = "thinking" if opened else "start"
        self.thought = opened
        self.buffer = ""

    def add(self, piece: str) -> list[tuple[str, str]]:
        self.buffer += piece
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                head = self.buffer.lstrip()
                if OPEN.startswith(head) and len(head) < len(OPEN):
                    return out  # it may still open
                if head.startswith(OPEN):
                    self.state, self.thought, self.buffer = "thinking", True, head[len(OPEN):]
                    continue
                self.state = "answer"
            if self.state == "thinking":
                at = self.buffer.find(CLOSE)
                if at < 0:
                    keep = _partial(self.buffer, CLOSE)
                    text, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                    return out + ([("reasoning", text)] if text else [])
                if at:
                    out.append(("reasoning", self.buffer[:at]))
                self.state, self.buffer = "after", self.buffer[at + len(CLOSE):]
                continue
            if self.state == "after":  # the whitespace between the thinking and the answer is neither
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    return out
                self.state = "answer"
            text, self.buffer = self.buffer, ""
            return out + ([("content", text)] if text else [])

    def end(self) -> list[tuple[str, str]]:
        """What is held back, once the answer is whole."""
        text, self.buffer = self.buffer, ""
        if not text or self.state == "after":
            return []
        return [("reasoning" if self.state == "thinking" else "content", text)]


def _partial(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` may begin ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
