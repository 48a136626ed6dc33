"""A Messages request, prepared and answered: the message object (``text`` or ``tool_use`` content
blocks, ``stop_reason``, ``usage``), or Anthropic's stream of events (``message_start``, then per
block ``content_block_start`` / ``content_block_delta`` / ``content_block_stop``, then
``message_delta`` and ``message_stop``; ``ping`` while the answer is awaited)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from llm_worker.anthropic.errors import error_body
from llm_worker.anthropic.requests import MessagesRequest, chat_body, renamed
from llm_worker.engine import Completion, Delta, EngineError
from llm_worker.openai.errors import OpenAIError
from llm_worker.openai.prepare import prepare
from llm_worker.openai.requests import CHAT, parse_body
from llm_worker.openai.streams import AnswerStream
from llm_worker.openai.tool_calls import parse_calls

if TYPE_CHECKING:
    from llm_worker.service import Worker

PING_SECONDS = 10.0  # a stream that has had nothing to send for this long sends a ping


class MessagesAnswer:
    """One Messages request, prepared: its message object, or its stream of events."""

    def __init__(self, worker: Worker, body: Any, job_id: str | None = None) -> None:
        self.request: MessagesRequest = parse_body(MessagesRequest, body)
        try:
            self.prepared = prepare(worker, CHAT, chat_body(self.request), job_id)
        except OpenAIError as err:
            raise renamed(err) from None
        self.worker = worker
        self.id = f"msg_{uuid.uuid4().hex[:24]}"

    @property
    def streaming(self) -> bool:
        return self.request.stream

    def stop_reason(self, done: Completion, called: bool) -> tuple[str, str | None]:
        """(``stop_reason``, ``stop_sequence``) of a finished answer."""
        if called:
            return "tool_use", None
        if done.finish_reason in ("length", "time_limit"):
            return "max_tokens", None
        if done.stop is not None and done.stop in (self.request.stop_sequences or []):
            return "stop_sequence", done.stop
        return "end_turn", None

    def usage(self, done: Completion | None) -> dict[str, int]:
        prompt = done.prompt_tokens if done else len(self.prepared.requests[0].prompt_ids)
        cached = done.cached_tokens if done else 0
        return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
                "output_tokens": done.completion_tokens if done else 0}

    def message(self, content: list[dict[str, Any]], done: Completion | None, reason: tuple[str | None, str | None]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.prepared.model, "content": content,
                "stop_reason": reason[0], "stop_sequence": reason[1], "usage": self.usage(done)}

    def tool_id(self, k: int) -> str:
        return f"toolu_{self.id[4:]}{k:02d}"

    def content(self, done: Completion) -> tuple[list[dict[str, Any]], bool]:
        """The answer's content blocks (its thinking first), and whether they end in tool calls."""
        finished = done.finish_reason in ("eos", "stop")
        reasoning = self.prepared.reasoning
        thought, text = reasoning.split(done.text) if reasoning else (None, done.text)
        blocks = [{"type": "thinking", "thinking": thought, "signature": ""}] if thought is not None else []
        calls = parse_calls(text, self.prepared.tool_format) if self.prepared.tool_calls and finished else None
        if calls:
            return blocks + [{"type": "tool_use", "id": self.tool_id(k), "name": name, "input": arguments} for k, (name, arguments) in enumerate(calls)], True
        return blocks + ([{"type": "text", "text": text}] if text else []), False

    async def whole_answer(self) -> dict[str, Any]:
        """The message object; raises ``EngineError`` when the engine fails the request."""
        async for _, event in self.worker.events(self.prepared.requests):
            if isinstance(event, Completion):
                content, called = self.content(event)
                return self.message(content, event, self.stop_reason(event, called))
        raise EngineError("the request ended without an answer")

    async def sse(self) -> AsyncIterator[str]:
        """Anthropic's stream; a failure in the engine ends it with an ``error`` event."""
        yield event("message_start", message=self.message([], None, (None, None)))
        yield event("ping")
        blocks = BlockStream(self)
        try:
            async for item in with_pings(self.worker.events(self.prepared.requests)):
                if item is None:
                    yield event("ping")
                    continue
                _, update = item
                if isinstance(update, Delta):
                    for line in blocks.add(update.text):
                        yield line
                    continue
                for line in blocks.end(update.finish_reason in ("eos", "stop")):
                    yield line
                reason = self.stop_reason(update, blocks.called)
                yield event("message_delta", delta={"stop_reason": reason[0], "stop_sequence": reason[1]},
                            usage={"output_tokens": update.completion_tokens})
                yield event("message_stop")
        except EngineError as err:
            body = error_body(OpenAIError(str(err), type="server_error", status=500))
            yield f"event: error\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"


def event(kind: str, **fields: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"


async def with_pings(events: AsyncIterator[Any], every: float = PING_SECONDS) -> AsyncIterator[Any]:
    """``events``' items, and None each time ``every`` seconds pass without one."""
    iterator = aiter(events)
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


class BlockStream(AnswerStream):
    """An answer's text, as it streams, into content blocks and their events: a thinking block, then
    one text block or ``tool_use`` blocks whose input JSON comes as ``input_json_delta`` pieces."""

    def __init__(self, answer: MessagesAnswer) -> None:
        super().__init__(answer.prepared)
        self.answer = answer
        self.index = -1  # the open block's
        self.open: str | None = None  # its type
        self.called = False

    def _thought(self, piece: str) -> list[str]:
        out = []
        if self.open != "thinking":
            out += self._close()
            self.index, self.open = self.index + 1, "thinking"
            out.append(event("content_block_start", index=self.index, content_block={"type": "thinking", "thinking": "", "signature": ""}))
        out.append(event("content_block_delta", index=self.index, delta={"type": "thinking_delta", "thinking": piece}))
        return out

    def _text(self, piece: str) -> list[str]:
        out = []
        if self.open != "text":
            out += self._close()
            self.index, self.open = self.index + 1, "text"
            out.append(event("content_block_start", index=self.index, content_block={"type": "text", "text": ""}))
        if piece:
            out.append(event("content_block_delta", index=self.index, delta={"type": "text_delta", "text": piece}))
        return out

    def _call(self, k: int, name: str | None, arguments: str) -> list[str]:
        out = []
        if name is not None:
            out += self._close()
            self.index, self.open, self.called = self.index + 1, "tool_use", True
            block = {"type": "tool_use", "id": self.answer.tool_id(k), "name": name, "input": {}}
            out.append(event("content_block_start", index=self.index, content_block=block))
        if arguments:
            out.append(event("content_block_delta", index=self.index, delta={"type": "input_json_delta", "partial_json": arguments}))
        return out

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", index=self.index)]
