"""Beam search (``num_beams > 1``): transformers' ``generate``, outside the KV pool.

It runs on the engine thread, one request at a time, with the model's own kernels and masks (the
pool's attention implementation materialises them for ``generate``'s cache); while it runs, the
other requests wait. It stops early when its request is cancelled or runs past its deadline.
"""

from __future__ import annotations

import threading
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from llm_worker.engine.adapter_rows import adapter_state
from llm_worker.engine.lifecycle import Lifecycle
from llm_worker.engine.sampler import MIN_TEMPERATURE, SamplingParams
from llm_worker.engine.sequence import Sequence
from llm_worker.schema import GenerationConfig


def answer_with_beams(seq: Sequence, model, life: Lifecycle, eos_ids: list[int], pad_id: int) -> None:
    """A beam-search request from its admission to its end, counted as running meanwhile; the
    best beam's tokens are accepted as a decoded answer's would be (stop strings, length)."""
    scheduler = life.scheduler
    scheduler.prefilling.remove(seq)
    scheduler.running.append(seq)
    deadline = seq.submitted + life.max_job_seconds if life.max_job_seconds else None
    request = seq.request
    tokens = beam_search(
        model, request.prompt_ids, request.config, seq.params, request.adapter,
        eos_ids, pad_id, seq.handle.cancelled, deadline,
    )
    if seq.handle.cancelled.is_set():
        life.release(seq, "cancelled")
        return
    for token in tokens:
        life.accept(seq, token)
        if seq.finish_reason is not None:
            return
    life.finish(seq, "time_limit" if deadline and time.monotonic() > deadline else "length")


def beam_search(
    model,
    prompt_ids: list[int],
    config: GenerationConfig,
    params: SamplingParams,
    adapter: str | None,
    eos_ids: list[int],
    pad_id: int,
    cancelled: threading.Event,
    deadline: float | None,
) -> list[int]:
    """The best beam's new tokens (fewer when cancelled or past ``deadline``)."""
    sampling = {}
    if config.sampling:
        sampling = {
            "do_sample": True,
            "temperature": max(params.temperature, MIN_TEMPERATURE),
            "top_k": params.top_k,
            "top_p": params.top_p,
        }
        torch.manual_seed(params.seed)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    context, kwargs, _ = adapter_state(model, [adapter])
    with context():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            num_beams=config.num_beams,
            max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.min_new_tokens,
            repetition_penalty=config.repetition_penalty,
            no_repeat_ngram_size=config.no_repeat_ngram_size,
            early_stopping=True,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([_StopWhen(cancelled, deadline)]),
            **sampling,
            **kwargs,
        )
    return output[0, input_ids.shape[1] :].tolist()


class _StopWhen(StoppingCriteria):
    """Ends ``generate`` when the request is cancelled or past its deadline."""

    def __init__(self, cancelled: threading.Event, deadline: float | None) -> None:
        self.cancelled = cancelled
        self.deadline = deadline

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        stop = self.cancelled.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
