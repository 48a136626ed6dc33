"""The RunPod job door: a job's input is a native event, or an OpenAI request that RunPod's
gateway forwards as ``{"openai_route": ..., "openai_input": ...}``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from llm_worker import openai_api
from llm_worker.service import Worker, blocking, collect


async def handle(worker: Worker, raw: Any, job_id: str | None = None) -> AsyncIterator[dict[str, Any] | str]:
    """A job's outputs, as the handler yields them: native dicts, or the OpenAI door's objects
    and server-sent-event lines. ``job_id`` (RunPod's) names the job in the logs."""
    if isinstance(raw, dict) and "openai_route" in raw:
        chunks = openai_api.handle(worker, raw, job_id)
    else:
        chunks = worker.handle(raw, job_id)
    async for chunk in chunks:
        yield chunk


def complete(worker: Worker, raw: Any, job_id: str | None = None) -> dict[str, Any] | str:
    """Blocking: a job's folded output, as the RunPod SDK's aggregated stream would return it."""
    return blocking(lambda: collect(handle(worker, raw, job_id)))
