"""How a request in flight moves on and ends: each generated token is accepted (text, stop
strings, grammar, length), what is safe is streamed to the caller, and the request finishes,
fails or is released, its KV blocks going back to the scheduler.

Faults stay with their request: a caller that is gone cancels only its own request, a row
whose logits are not finite fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import torch

from llm_worker.engine.host_time import HostClock, NoClock
from llm_worker.engine.ranks import RankLost
from llm_worker.engine.requests import Completion, Delta, Event, Failed, LoopSink, Sink
from llm_worker.engine.sampler import BAD_ROW
from llm_worker.engine.scheduler import Scheduler
from llm_worker.engine.sequence import Sequence

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0  # how often running requests' progress is logged (debug level)


class Lifecycle:
    """The requests' side of the engine thread: tokens in, events out to each caller."""

    def __init__(self, scheduler: Scheduler[Sequence], eos_ids: list[int], device: torch.device, max_job_seconds: float) -> None:
        self.scheduler = scheduler
        self.eos_ids = eos_ids
        self.device = device
        self.max_job_seconds = max_job_seconds
        self._last_progress = time.monotonic()
        self.clock: HostClock = NoClock()
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Sink, Event]]] = {}  # until ``flush``

    def in_flight(self) -> list[Sequence]:
        s = self.scheduler
        return [*s.waiting, *s.prefilling, *s.running]

    def accept(self, seq: Sequence, token: int) -> None:
        """Take one generated token: update text, stream what is safe, finish if it is time."""
        if token == BAD_ROW:
            self.fail([seq], "generation failed: the model produced non-finite logits (NaN or infinity) for this request")
            return
        seq.generated.append(token)
        if token in self.eos_ids:
            self.finish(seq, "eos")
            return
        if token in seq.request.config.stop_token_ids:  # ends the answer, as a stop string does, and is not part of its text
            self.finish(seq, "stop")
            return
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            self.fail([seq], f"generation failed: the answer left its grammar ({seq.matcher.get_error().splitlines()[0]})")
            return
        self.clock.lap("accept")
        seq.text.add(token)
        if seq.budget is not None and seq.budget.live:
            seq.budget.add(seq.text.text)
        if seq.text.stopped:
            self.finish(seq, "stop")
        elif len(seq.generated) >= seq.slot.max_new_tokens:
            self.finish(seq, "length")
        else:
            delta = seq.text.delta()
            if delta:
                self.send(seq, self._delta(seq, delta))
        self.clock.lap("text")

    def finish(self, seq: Sequence, reason: str) -> None:
        rest = seq.text.delta(final=True)
        self.release(seq, reason)
        if rest:
            self.send(seq, self._delta(seq, rest))
        self.send(
            seq,
            Completion(
                text=seq.text.answer,
                finish_reason=reason,
                prompt_tokens=seq.slot.prompt_len,
                completion_tokens=len(seq.generated),
                token_ids=list(seq.generated),
                logprobs=list(seq.logprobs) if seq.request.logprobs is not None else None,
                cached_tokens=seq.slot.cached,
                prompt_logprobs=seq.prompt_logprobs if seq.request.prompt_logprobs is not None else None,
                stop=seq.text.stop if reason == "stop" else None,
            ),
        )

    def fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in list(seqs):
            if seq.finish_reason is None:
                self.release(seq, "error")
                self.send(seq, Failed(message))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def guarded(self, seqs: list[Sequence], work: Callable[[list[Sequence]], None]) -> None:
        """Run engine work; if it raises, fail exactly the requests it was for and keep serving."""
        try:
            work(seqs)
        except RankLost:  # not the requests' fault: the engine stops (``loop.py``)
            raise
        except Exception as err:
            log.exception("generation failed for %d request(s)", len(seqs))
            self.fail(seqs, f"generation failed: {type(err).__name__}: {err}")

    def release(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.scheduler.release(seq)

    def send(self, seq: Sequence, event: Event) -> None:
        """Hand an event to the caller (a caller on an event loop: at the next ``flush``); a caller
        that is gone cancels its request, nothing more."""
        sink = seq.sink
        if isinstance(sink, LoopSink):
            self._outbox.setdefault(sink.loop, []).append((seq, sink.put, event))
            return
        try:
            sink(event)
        except Exception as err:
            self._gone(seq, err)

    def flush(self) -> None:
        """Hand the events gathered for callers on event loops over: one call to each loop."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, [(put, event) for _, put, event in items])
            except Exception as err:  # the loop is closed: every caller on it is gone
                for seq in dict.fromkeys(seq for seq, _, _ in items):
                    self._gone(seq, err)

    def _gone(self, seq: Sequence, err: Exception) -> None:
        log.warning("%s: its caller is gone (%s); dropping it", seq.label, type(err).__name__)
        seq.handle.cancel()
        self.release(seq, "cancelled")

    @staticmethod
    def _delta(seq: Sequence, text: str) -> Delta:
        fresh = tuple(seq.logprobs[seq.unsent_logprobs :])
        seq.unsent_logprobs = len(seq.logprobs)
        return Delta(text, fresh)

    def drop_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        for seq in self.in_flight():
            if seq.handle.cancelled.is_set():
                self.release(seq, "cancelled")  # its caller is gone: nobody to tell
            elif self.max_job_seconds and now - seq.submitted > self.max_job_seconds:
                self.finish(seq, "time_limit")

    def log_progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_SECONDS or not log.isEnabledFor(logging.DEBUG):
            return
        self._last_progress = now
        for seq in self.scheduler.running:
            elapsed = now - seq.submitted
            log.debug(
                "%s: %d of %d tokens after %.0f s (%.1f tokens/s)",
                seq.label, len(seq.generated), seq.slot.max_new_tokens, elapsed, len(seq.generated) / elapsed,
            )


def _deliver(items: list[tuple[Sink, Event]]) -> None:
    """On a caller's event loop: a step's events, in order."""
    for put, event in items:
        put(event)
