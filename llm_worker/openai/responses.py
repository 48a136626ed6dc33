"""Engine events into OpenAI's objects: the whole response, or the stream's server-sent events
(text deltas, tool-call deltas, logprobs, usage)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from llm_worker.engine import Completion, Delta, EngineError, TokenLogprob
from llm_worker.openai.errors import server_error
from llm_worker.openai.prepare import Echo, Prepared, model_names
from llm_worker.openai.requests import CHAT
from llm_worker.model.reasoning import ReasoningSplitter
from llm_worker.openai.tool_calls import CallSplitter, parse_calls

if TYPE_CHECKING:
    from llm_worker.service import Worker

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "time_limit": "length"}


class Response:
    """Turns engine events into OpenAI objects and stream chunks for one prepared request."""

    def __init__(self, worker: Worker, route: str, prepared: Prepared, response_id: str) -> None:
        self.worker = worker
        self.chat = route == CHAT
        self.prepared = prepared
        self.id = response_id
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self.with_logprobs = prepared.requests[0].logprobs is not None
        self.written = [0] * len(prepared.requests)  # characters of text streamed per choice (text_offset)

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object + (".chunk" if self.chat and self.prepared.body.stream else ""),
            "created": self.created,
            "model": self.prepared.model,
            "system_fingerprint": fingerprint(self.worker),
            "choices": choices,
            **extra,
        }

    def usage(self, completions: list[Completion]) -> dict[str, Any]:
        n = self.prepared.body.n
        prompt = sum(done.prompt_tokens for done in completions[::n])  # each prompt counts once
        cached = sum(done.cached_tokens for done in completions[::n])
        generated = sum(done.completion_tokens for done in completions)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": generated,
            "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def logprobs(self, items: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if not self.with_logprobs:
            return None
        text = self.worker.token_text
        if self.chat:
            return {
                "content": [
                    {
                        **_token(text(item.token_id)),
                        "logprob": item.logprob,
                        "top_logprobs": [{**_token(text(token)), "logprob": logprob} for token, logprob in item.top],
                    }
                    for item in items
                ]
            }
        return self.text_logprobs([(item.token_id, item.logprob, item.top) for item in items])

    def text_logprobs(self, items: Sequence[tuple[int, float | None, Any]], offset: int = 0) -> dict[str, Any]:
        """A completion's logprobs from (token, logprob, top) triples; a prompt's first token has
        None for both (nothing before it to score it). ``offset``: where the first token's text starts
        in the choice's text."""
        text = self.worker.token_text
        tokens = [text(token) for token, _, _ in items]
        offsets = [offset + sum(len(token) for token in tokens[:i]) for i in range(len(tokens))]
        return {
            "tokens": tokens,
            "token_logprobs": [logprob for _, logprob, _ in items],
            "top_logprobs": [None if top is None else {text(token): value for token, value in top} for _, _, top in items],
            "text_offset": offsets,
        }

    def echo_logprobs(self, echo: Echo, scored: Sequence[TokenLogprob], answer: Sequence[TokenLogprob]) -> dict[str, Any]:
        """The logprobs of an echoed prompt's tokens, then of its answer's."""
        first = [(echo.ids[0], None, None)]
        return self.text_logprobs(first + [(item.token_id, item.logprob, item.top) for item in [*scored, *answer]])

    def whole(self, completions: list[Completion]) -> dict[str, Any]:
        if self.prepared.prompt_only:
            completions = [prompt_only(done) for done in completions]
        choices = []
        reasoning = self.prepared.reasoning
        for index, done in enumerate(completions):
            choice: dict[str, Any] = {"index": index}
            finish_reason = FINISH_REASONS[done.finish_reason]
            thought, text = reasoning.split(done.text) if reasoning else (None, done.text)
            calls = parse_calls(text, self.prepared.tool_format) if self.prepared.tool_calls and finish_reason == "stop" else None
            if calls:
                tool_calls = [self.tool_call(index, k, name, arguments) for k, (name, arguments) in enumerate(calls)]
                choice["message"], finish_reason = {"role": "assistant", "content": None, "tool_calls": tool_calls}, "tool_calls"
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            elif self.prepared.echo:
                echo = self.echo(index)
                choice["text"] = echo.text + done.text
                scored = done.prompt_logprobs or []
                choice["logprobs"] = self.echo_logprobs(echo, scored, done.logprobs or []) if self.with_logprobs else None
            else:
                choice["text"] = done.text
            if reasoning:  # vLLM's field: the thinking, apart from the answer
                choice["message"]["reasoning_content"] = thought
            choice.setdefault("logprobs", self.logprobs(done.logprobs or []))
            choice["finish_reason"] = finish_reason
            choices.append(choice)
        return self.envelope(choices, usage=self.usage(completions))

    def echo(self, index: int) -> Echo:
        """The prompt choice ``index`` answers (``n`` choices per prompt)."""
        return self.prepared.echo[index // self.prepared.body.n]

    def tool_call(self, index: int, k: int, name: str, arguments: Any = None, streamed: bool = False) -> dict[str, Any]:
        """Call ``k`` of choice ``index``; its id is the same in the stream and in the whole answer."""
        call: dict[str, Any] = {"index": k} if streamed else {}
        call.update(id=f"call_{self.id.split('-')[-1][:16]}_{index}_{k}", type="function")
        call["function"] = {"name": name, "arguments": "" if arguments is None else json.dumps(arguments, ensure_ascii=False)}
        return call

    def call_chunk(self, index: int, k: int, name: str | None, arguments: str) -> str:
        """A streamed piece of choice ``index``'s call ``k``: its first names the function, as OpenAI's."""
        if name is not None:
            call = self.tool_call(index, k, name, streamed=True)
        else:
            call = {"index": k, "function": {"arguments": arguments}}
        choice = {"index": index, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
        extra = {"usage": None} if self.include_usage else {}
        return sse(self.envelope([choice], **extra))

    def reasoning_chunk(self, index: int, text: str) -> str:
        choice = {"index": index, "delta": {"reasoning_content": text}, "logprobs": None, "finish_reason": None}
        return sse(self.envelope([choice], **({"usage": None} if self.include_usage else {})))

    def split_chunk(self, index: int, piece: tuple) -> str:
        """A ``CallSplitter`` event of choice ``index``: a text delta, or a piece of a call."""
        return self.chunk(index, piece[1], ()) if piece[0] == "text" else self.call_chunk(index, *piece[1:])

    def chunk(
        self, index: int, text: str | None, logprobs: Sequence[TokenLogprob] | dict[str, Any], finish_reason: str | None = None,
        first: bool = False,
    ) -> str:
        """One stream chunk; ``text`` None: the choice's closing chunk; ``first``: the chat chunk that
        names the role. A completion's ``logprobs`` may come shaped (an echoed prompt's)."""
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {} if text is None else {"content": text}
            choice["logprobs"] = None if first else self.logprobs(logprobs)
        else:
            choice["text"] = text or ""
            if isinstance(logprobs, dict) or not self.with_logprobs:
                choice["logprobs"] = logprobs or None
            else:
                choice["logprobs"] = self.text_logprobs([(i.token_id, i.logprob, i.top) for i in logprobs], self.written[index])
            self.written[index] += len(choice["text"])
        choice["finish_reason"] = finish_reason and FINISH_REASONS.get(finish_reason, finish_reason)
        extra = {"usage": None} if self.include_usage else {}
        return sse(self.envelope([choice], **extra))

    @property
    def include_usage(self) -> bool:
        options = self.prepared.body.stream_options
        return bool(options and options.include_usage)

    @property
    def streaming(self) -> bool:
        return self.prepared.body.stream

    async def whole_answer(self) -> dict[str, Any]:
        """The response object; raises ``EngineError`` when the engine fails the request."""
        completions: dict[int, Completion] = {}
        async for index, event in self.worker.events(self.prepared.requests):
            if isinstance(event, Completion):
                completions[index] = event
        return self.whole([completions[index] for index in range(len(completions))])

    async def sse(self) -> AsyncIterator[str]:
        """The stream's server-sent events, ``data: [DONE]`` last; a failure in the engine is one
        more event, OpenAI's error object, before it."""
        try:
            async for line in self.stream():
                yield line
        except EngineError as err:
            yield sse(server_error(err).body)
        yield sse("[DONE]")

    async def stream(self) -> AsyncIterator[str]:
        requests = self.prepared.requests
        sent = [0] * len(requests)  # logprobs already streamed, per choice
        finished: dict[int, Completion] = {}
        fmt = self.prepared.tool_format
        calls = [CallSplitter(text=self.prepared.tool_calls == "auto", fmt=fmt) for _ in requests] if self.prepared.tool_calls else None
        reasoning = self.prepared.reasoning
        thinking = [ReasoningSplitter(reasoning.opened) for _ in requests] if reasoning else None
        if self.chat:  # OpenAI's first chunk of each choice names the role
            for index in range(len(requests)):
                yield self.chunk(index, "", (), first=True)
        elif self.prepared.echo and not self.with_logprobs:  # the prompt first; with logprobs, once they are scored
            for index in range(len(requests)):
                yield self.chunk(index, self.echo(index).text, ())
        async for index, event in self.worker.events(requests):
            if isinstance(event, Delta):
                if event.prompt_logprobs and self.prepared.echo:
                    echo = self.echo(index)
                    yield self.chunk(index, echo.text, self.echo_logprobs(echo, event.prompt_logprobs, ()))
                elif self.prepared.prompt_only:
                    pass
                elif thinking is not None:
                    for line in self.thought_and_answer(index, thinking[index].add(event.text), calls, event.logprobs, sent):
                        yield line
                elif calls is not None:
                    for piece in calls[index].add(event.text):
                        yield self.split_chunk(index, piece)
                elif event.text or event.logprobs:
                    sent[index] += len(event.logprobs)
                    yield self.chunk(index, event.text, event.logprobs)
                continue
            if thinking is not None:
                for line in self.thought_and_answer(index, thinking[index].end(), calls, (), sent):
                    yield line
            if self.prepared.prompt_only:
                event = prompt_only(event)
            finished[index] = event
            if calls is not None:
                complete = FINISH_REASONS[event.finish_reason] == "stop"
                for piece in calls[index].end(complete):
                    yield self.split_chunk(index, piece)
                called = complete and calls[index].calls
                yield self.chunk(index, None, (), "tool_calls" if called else event.finish_reason)
                continue
            yield self.chunk(index, None, (event.logprobs or [])[sent[index] :], event.finish_reason)
        if self.include_usage:
            completions = [finished[index] for index in range(len(requests))]
            yield sse(self.envelope([], usage=self.usage(completions)))


    def thought_and_answer(self, index: int, pieces: list[tuple[str, str]], calls, logprobs, sent: list[int]) -> list[str]:
        """A thinking answer's pieces as chunks: its thinking as ``reasoning_content``, its answer as
        content or tool calls (the delta's logprobs with the answer's text)."""
        out = []
        for kind, piece in pieces:
            if kind == "reasoning":
                out.append(self.reasoning_chunk(index, piece))
            elif calls is not None:
                out += [self.split_chunk(index, event) for event in calls[index].add(piece)]
            else:
                sent[index] += len(logprobs)
                out.append(self.chunk(index, piece, logprobs))
                logprobs = ()
        return out


def prompt_only(done: Completion) -> Completion:
    """An answer to ``max_tokens`` 0: the one token the engine computed is not part of it."""
    return replace(done, text="", finish_reason="length", completion_tokens=0, token_ids=[], logprobs=[] if done.logprobs is not None else None)


def _token(text: str) -> dict[str, Any]:
    """OpenAI's token and its UTF-8 bytes; a token that is part of a character has no whole text, so no bytes."""
    return {"token": text, "bytes": None if "\ufffd" in text else list(text.encode("utf-8"))}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def fingerprint(worker: Worker) -> str:
    """Changes when the weights' source, dtype or device does (what can change an answer for a seed)."""
    loaded = worker.loaded
    identity = f"{loaded.name}|{loaded.dtype}|{loaded.device}|{worker.settings.lora_weights}|{loaded.merged_adapter}"
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]


def models(worker: Worker) -> dict[str, Any]:
    created = int(time.time())
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "llm-worker"} for name in model_names(worker)],
    }
