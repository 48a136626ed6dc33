"""The RunPod job door: a job's input is a native event, or an OpenAI request that RunPod's
gateway forwards as ``{"openai_route": ..., "openai_input": ...}``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from llm_worker import anthropic, openai
from llm_worker.engine import EngineError
from llm_worker.service import Worker, blocking, collect


async def handle(worker: Worker, raw: Any, job_id: str | None = None) -> AsyncIterator[dict[str, Any] | str]:
    """A job's outputs, as the handler yields them: native dicts, or the OpenAI door's objects
    and server-sent-event lines. ``job_id`` (RunPod's) names the job in the logs."""
    if isinstance(raw, dict) and raw.get("openai_route") in (anthropic.MESSAGES, anthropic.COUNT_TOKENS):
        chunks = anthropic_job(worker, raw, job_id)
    elif isinstance(raw, dict) and "openai_route" in raw:
        chunks = openai_job(worker, raw, job_id)
    else:
        chunks = worker.handle(raw, job_id)
    async for chunk in chunks:
        yield chunk


def complete(worker: Worker, raw: Any, job_id: str | None = None) -> dict[str, Any] | str:
    """Blocking: a job's folded output, as the RunPod SDK's aggregated stream would return it."""
    return blocking(lambda: collect(handle(worker, raw, job_id)))


async def openai_job(worker: Worker, job: dict[str, Any], job_id: str | None = None) -> AsyncIterator[dict[str, Any] | str]:
    """A gateway job's outputs: the response object, or the stream's SSE lines; errors in
    OpenAI's error shape (an error after a stream began is one more ``data:`` line)."""
    route = job.get("openai_route")
    try:
        if worker.load_error:
            raise openai.unavailable(worker.load_error)
        if not isinstance(route, str):  # a list or a dict cannot even be looked up among the routes
            raise openai.OpenAIError(
                f"openai_route: must be a string such as {openai.CHAT!r}, got {type(route).__name__}",
                "openai_route", "invalid_type", status=400,
            )
        if route in openai.PLAIN_ROUTES:
            yield openai.plain_answer(worker, route, job.get("openai_input"))
            return
        if route in (openai.LOAD_ADAPTER, openai.UNLOAD_ADAPTER):
            raise openai.OpenAIError(
                f"openai_route: {route} is not served to jobs: each worker of a serverless endpoint is a process of its own, "
                "so a load would reach one worker, and the next job may land on another. Put the adapter folder into "
                "ADAPTER_DIR on the endpoint's network volume instead: every worker serves it from its next request on",
                "openai_route",
                "unsupported_route",
                status=400,
            )
        if route not in (openai.CHAT, openai.COMPLETIONS, openai.RESPONSES):
            raise openai.OpenAIError(
                f"openai_route: unknown route {route!r}; this worker serves {openai.CHAT}, {openai.COMPLETIONS}, {openai.RESPONSES}, "
                f"{', '.join(openai.PLAIN_ROUTES)}, {anthropic.MESSAGES}, {anthropic.COUNT_TOKENS}",
                "openai_route",
                "unknown_route",
                status=404,
            )
        response = openai.open_request(worker, route, job.get("openai_input"), job_id)
    except openai.OpenAIError as err:
        yield err.body
        return
    async for output in answered(response, lambda err: err.body):
        yield output


async def answered(answer, shaped: Callable[[openai.OpenAIError], dict[str, Any]]) -> AsyncIterator[dict[str, Any] | str]:
    """An opened answer's outputs: its stream's lines, or its whole object (an engine failure in
    the API's error shape, by ``shaped``)."""
    if answer.streaming:
        async for line in answer.sse():
            yield line
        return
    try:
        yield await answer.whole_answer()
    except EngineError as err:
        yield shaped(openai.server_error(err))


async def anthropic_job(worker: Worker, job: dict[str, Any], job_id: str | None = None) -> AsyncIterator[dict[str, Any] | str]:
    """A gateway job for Anthropic's Messages API: the message object (or token count), or the
    stream's event lines; errors in Anthropic's shape."""
    try:
        if job["openai_route"] == anthropic.COUNT_TOKENS:
            yield anthropic.count_tokens(worker, job.get("openai_input"))
            return
        answer = anthropic.open_messages(worker, job.get("openai_input"), job_id)
    except openai.OpenAIError as err:
        yield anthropic.error_body(err)
        return
    async for output in answered(answer, anthropic.error_body):
        yield output
