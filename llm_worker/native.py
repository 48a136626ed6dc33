"""The native event's outputs (the seed's shape, extended): one result ``{"output", "finish_reason",
"usage", "model", "adapter"}``, or with ``stream`` the deltas, the last one carrying the ending;
``n`` > 1 as ``choices``; ``logprobs`` on every result and chunk that asked for them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from llm_worker.engine import Completion, Delta, GenerationRequest, TokenLogprob
from llm_worker.schema import JobInput


class Worker(Protocol):
    """What the native outputs read of ``service.Worker`` (which imports this module)."""

    loaded: Any
    adapters: Any

    def choices(self, request: GenerationRequest) -> list[GenerationRequest]: ...

    def events(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Any]]: ...

    def token_text(self, token_id: int) -> str: ...


async def answers(worker: Worker, job: JobInput, request: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
    """A generation job's native outputs. With ``n`` > 1 the result is ``{"choices": [{"index",
    "output", "finish_reason"}, ...], "usage", "model", "adapter"}`` and stream chunks carry an
    ``index``, each choice's last one its ``finish_reason``, and a closing chunk the rest; with
    ``logprobs`` every result and chunk carries the ``logprobs`` of its tokens."""
    requests = worker.choices(request)
    n, with_logprobs = len(requests), request.logprobs is not None
    pending = [Delta("") for _ in requests]  # each choice's newest text waits: its last chunk carries text and ending
    sent = [0] * n  # logprobs already streamed, per choice
    finished: dict[int, Completion] = {}

    def chunk(index: int, text: str, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
        out: dict[str, Any] = {"index": index} if n > 1 else {}
        out["delta"] = text
        if with_logprobs:
            out["logprobs"] = logprob_entries(worker, logprobs)
        sent[index] += len(logprobs)
        return out

    async for index, event in worker.events(requests):
        if isinstance(event, Delta):
            if job.stream:
                if pending[index].text:
                    yield chunk(index, pending[index].text, pending[index].logprobs)
                    pending[index] = Delta("")
                pending[index] = Delta(pending[index].text + event.text, pending[index].logprobs + event.logprobs)
            continue
        finished[index] = event
        if job.stream:
            last = chunk(index, pending[index].text, (event.logprobs or [])[sent[index] :])
            if n == 1:
                ending = result(worker, event, request.adapter)
                del ending["output"]
            else:
                ending = {"finish_reason": event.finish_reason}
            yield {**last, **ending}
    ordered = [finished[index] for index in range(n)]
    if job.stream and n == 1:
        return
    summary = {
        "usage": usage(
            ordered[0].prompt_tokens, sum(done.completion_tokens for done in ordered), ordered[0].cached_tokens
        ),
        "model": worker.loaded.name,
        "adapter": request.adapter or worker.adapters.merged,
    }
    if job.stream:
        yield summary
        return
    answers = []
    for index, done in enumerate(ordered):
        answer = {"index": index, "output": done.text, "finish_reason": done.finish_reason}
        if with_logprobs:
            answer["logprobs"] = logprob_entries(worker, done.logprobs or [])
        answers.append(answer)
    if n == 1:
        (answer,) = answers
        del answer["index"]
        yield {**answer, **summary}
    else:
        yield {"choices": answers, **summary}


def result(worker: Worker, completion: Completion, adapter: str | None) -> dict[str, Any]:
    """The job's output; ``adapter`` is the one that answered (the merged one, if any)."""
    return {
        "output": completion.text,
        "finish_reason": completion.finish_reason,
        "usage": usage(completion.prompt_tokens, completion.completion_tokens, completion.cached_tokens),
        "model": worker.loaded.name,
        "adapter": adapter or worker.adapters.merged,
    }

def logprob_entries(worker: Worker, items: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """Native logprobs: one entry per generated token, with its alternatives."""
    return [
        {
            "token": worker.token_text(item.token_id),
            "token_id": item.token_id,
            "logprob": item.logprob,
            "top_logprobs": [
                {"token": worker.token_text(token_id), "token_id": token_id, "logprob": logprob} for token_id, logprob in item.top
            ],
        }
        for item in items
    ]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, int]:
    """Native usage; ``cached_tokens`` (prompt tokens the prefix cache held) only when there were some."""
    counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    if cached_tokens:
        counts["cached_tokens"] = cached_tokens
    return counts
