"""How each job went, for whoever watches the worker: a ``RequestRecord`` per engine request
(metrics), and one log line per job (``llm_worker.jobs``), never with the prompt's or the answer's text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llm_worker.engine.requests import Completion, Failed, GenerationRequest
from llm_worker.logs import job_log


@dataclass(frozen=True)
class RequestRecord:
    """How one engine request went, for whoever watches the worker (metrics, logs)."""

    outcome: Literal["finished", "failed", "cancelled"]
    finish_reason: str | None  # eos | stop | length | time_limit, when finished
    prompt_tokens: int
    cached_tokens: int  # of the prompt, found in the prefix cache (known once finished; 0 otherwise)
    completion_tokens: int  # tokens of a finished answer; 0 otherwise
    seconds: float  # from submission to the end
    first_token_seconds: float | None  # to the first text, when there was some


def log_job(requests: Sequence[GenerationRequest], ends: Sequence[Completion | Failed | None], seconds: float, merged: str | None) -> None:
    """One line per job (all its requests: ``n`` answers, several prompts) once it is over: job id,
    adapter, outcome, token counts, seconds and tokens/s. Never the prompt's or the answer's text."""
    first = requests[0]
    adapter = first.adapter or merged or "-"
    prompts: dict[int, int] = {}  # each prompt counts once (n answers share one)
    for request in requests:
        prompts[id(request.prompt_ids)] = len(request.prompt_ids)
    prompt_tokens = sum(prompts.values())
    done = [end for end in ends if isinstance(end, Completion)]
    completion_tokens = sum(end.completion_tokens for end in done)
    failed = next((end for end in ends if isinstance(end, Failed)), None)
    if failed is not None:
        job_log.warning("Job %s failed after %.2f s (adapter %s): %s", first.job_id or "-", seconds, adapter, failed.error)
        return
    if len(done) < len(ends):
        job_log.info(
            "Job %s cancelled after %.2f s (adapter %s, %d prompt tokens, %d of %d answers finished)",
            first.job_id or "-", seconds, adapter, prompt_tokens, len(done), len(ends),
        )
        return
    reasons = ",".join(dict.fromkeys(end.finish_reason for end in done))
    cached = sum({id(request.prompt_ids): end.cached_tokens for request, end in zip(requests, ends)}.values())
    job_log.info(
        "Job %s done: %s, adapter %s, %d prompt tokens%s, %d completion tokens, %.2f s, %.1f tokens/s",
        first.job_id or "-", reasons, adapter, prompt_tokens, f" ({cached} cached)" if cached else "",
        completion_tokens, seconds, completion_tokens / seconds if seconds > 0 else 0.0,
    )
