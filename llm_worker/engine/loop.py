"""The generation engine: one background thread owns the model and runs it step by step.

Each step: take new requests, admit what fits, prefill a budget of prompt tokens, decode one
token for every running request, turn the tokens into events for the callers. Each step has one
transfer from the device: the sampled token ids. The parts live beside this module, with plain
data passed between them:

- ``scheduler.py``: which requests run, under the KV budget and the batch size; chunked prefill
  under a per-step token budget, interleaved with decoding.
- ``runner.py`` (``forward.py``, ``graphs.py``, ``adapter_rows.py``): the KV pool and one forward
  pass over fixed-shape inputs; CUDA graphs on CUDA; ``startup.py`` sizes and starts it.
- ``step_sampling.py`` over ``sampler.py``: logits to token ids for all rows at once, each row with
  its own settings.
- ``lifecycle.py`` over ``text.py``: each token accepted, text streamed, requests finished.

Faults stay with their request: a failed prefill is retried one request at a time, a decoding
step out of memory drops the newest request, a row whose logits are not finite fails alone, a
caller that is gone is dropped, and no error stops the thread. ``close()`` ends every request in
flight with an error. Beam search (``beam_search.py``) runs through transformers' ``generate``
on this thread, outside the KV pool.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

import torch

from llm_worker.engine.beam_search import answer_with_beams
from llm_worker.engine.kv_cache import BlockAllocator
from llm_worker.engine.lifecycle import Lifecycle
from llm_worker.engine.memory import return_freed_memory
from llm_worker.engine.prompt_scoring import score_chunks, wants_scores
from llm_worker.engine.requests import (
    Completion,
    Delta,
    EngineConfig,
    EngineError,
    EngineStats,
    Event,
    Failed,
    GenerationRequest,
    RequestHandle,
    Sink,
)
from llm_worker.engine.scheduler import PrefillChunk, Scheduler, group_by_width
from llm_worker.engine.sequence import Sequence, decode_inputs, prefill_inputs
from llm_worker.engine.startup import capture_when_idle, start_runner
from llm_worker.engine.step_sampling import StepSampler
from llm_worker.model.adapters import AdapterError, AdapterManager, AdapterSlotsBusy

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        config: EngineConfig = EngineConfig(),
        *,
        dtype: torch.dtype | None = None,
        adapters: AdapterManager | None = None,
    ) -> None:
        self.model, self.tokenizer, self.config, self.adapters = model, tokenizer, config, adapters
        self.device = next(model.parameters()).device
        self.eos_ids = sorted(_eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.vocab = model.get_output_embeddings().weight.shape[0]

        self.runner = start_runner(model, config, self.device, dtype, self.vocab)
        self.pool = self.runner.pool
        self.max_seq_len = min(config.max_seq_len, self.pool.capacity_tokens)
        blocks = self.pool.blocks
        self.scheduler: Scheduler[Sequence] = Scheduler(BlockAllocator(blocks), config.max_batch_size, config.max_prefill_tokens)
        self.sampler = StepSampler(self.vocab, self.eos_ids, self.device)
        self.life = Lifecycle(self.scheduler, self.eos_ids, self.device, config.max_job_seconds)
        self.prefix_caching = config.prefix_caching  # read at each submission (a benchmark turns it off and on)
        self._ids = itertools.count(1)
        self._inbox: queue.Queue[Sequence | None] = queue.Queue()
        self._closed = False
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="generation-engine", daemon=True)
        self._thread.start()

    @property
    def capacity_tokens(self) -> int:
        return self.pool.capacity_tokens

    @property
    def running(self) -> int:
        """Requests holding KV now (decoding, or their prompt being prefilled)."""
        return len(self.scheduler.running) + len(self.scheduler.prefilling)

    def stats(self) -> EngineStats:
        """Read from any thread: counts the engine thread may change a moment later."""
        allocator = self.scheduler.allocator
        return EngineStats(
            running=self.running,
            waiting=len(self.scheduler.waiting) + self._inbox.qsize(),
            kv_blocks_used=allocator.total - allocator.free,
            kv_blocks_total=allocator.total,
            kv_blocks_cached=allocator.cached,
        )

    # ----------------------------------------------------------------- callers' side
    def submit(self, request: GenerationRequest, sink: Sink) -> RequestHandle:
        footprint = len(request.prompt_ids) + request.config.max_new_tokens
        if footprint > self.max_seq_len:
            raise EngineError(
                f"the prompt ({len(request.prompt_ids)} tokens) plus max_new_tokens "
                f"({request.config.max_new_tokens}) is {footprint} tokens; this worker holds at most "
                f"{self.max_seq_len} for one request (KV cache {self.capacity_tokens} tokens)"
            )
        seq = Sequence.start(next(self._ids), request, sink, self.tokenizer, self.prefix_caching)
        with self._submit_lock:
            if self._closed or not self._thread.is_alive():
                raise EngineError("the generation engine has stopped")
            self._inbox.put(seq)
        return seq.handle

    def generate(self, request: GenerationRequest) -> Completion:
        """Blocking: the whole answer (for notebooks, benchmarks and tests)."""
        events: queue.Queue[Event] = queue.Queue()
        self.submit(request, events.put)
        while True:
            event = events.get()
            if isinstance(event, Failed):
                raise EngineError(event.error)
            if isinstance(event, Completion):
                return event

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Async: deltas as they are decoded, then the completion. Cancelling the consuming task
        cancels the request, which frees its batch row and KV blocks at the next step."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        handle = self.submit(request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            while True:
                event = await events.get()
                yield event
                if not isinstance(event, Delta):
                    return
        finally:
            handle.cancel()

    def close(self) -> None:
        """Stop the engine; every request still in flight gets an error."""
        with self._submit_lock:
            self._closed = True
            self._inbox.put(None)
        self._thread.join()
        self.sampler.close()

    # ----------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        with torch.inference_mode():
            while self._take_inbox(block=not (self.scheduler.busy or self.runner.pending)):
                if not self.scheduler.busy and self.runner.pending:  # idle: one planned graph, then the inbox again
                    capture_when_idle(self.runner)
                    continue
                try:
                    self._step()
                except Exception as err:  # a bug must cost the requests it touched, never the engine
                    log.exception("engine iteration failed")
                    self.life.fail(self.life.in_flight(), f"engine error: {type(err).__name__}: {err}")
                if not self.scheduler.busy:
                    return_freed_memory(self.device)
            leftovers = self.life.in_flight()
            while not self._inbox.empty():
                item = self._inbox.get_nowait()
                if item is not None:
                    leftovers.append(item)
            self.life.fail(leftovers, "the worker is shutting down: this request was not finished; retry it")

    def _take_inbox(self, block: bool) -> bool:
        """Move new requests to the waiting line; False when the engine is asked to stop."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    return False
                self.scheduler.waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _step(self) -> None:
        self.life.drop_cancelled_and_expired()
        for seq in self.scheduler.admit(self._adapter_ready):
            self.sampler.admit(seq)
            if seq.request.config.num_beams > 1:
                self._guarded([seq], lambda seqs: answer_with_beams(seqs[0], self.model, self.life, self.eos_ids, self.pad_id))
        for group in group_by_width(self.scheduler.plan_prefill()):
            self._prefill(group)
        if self.scheduler.running:
            self._guarded(list(self.scheduler.running), self._decode)
        self.life.log_progress()

    def _adapter_ready(self, seq: Sequence) -> bool | None:
        """Admission check for a request's adapter: load it if needed (True), wait while every
        adapter slot is busy (False), or fail the request (None)."""
        name = seq.request.adapter
        if name is None:
            return True
        in_use = {s.request.adapter for s in [*self.scheduler.running, *self.scheduler.prefilling]}
        generation = self.adapters.generation
        try:
            model = self.adapters.activate(self.model, name, in_use, self.tokenizer)
        except AdapterSlotsBusy:
            return False
        except Exception as err:
            message = str(err) if isinstance(err, AdapterError) else f"adapter {name!r}: {err}"
            self.life.fail([seq], message)
            return None
        if self.adapters.generation != generation:  # loaded, unloaded or evicted an adapter
            self.model = model
            self.runner.set_model(model)
        return True

    def _guarded(self, seqs: list[Sequence], work: Callable[[list[Sequence]], None]) -> None:
        """Run engine work; if it raises, fail exactly the requests it was for and keep serving."""
        try:
            work(seqs)
        except Exception as err:
            log.exception("generation failed for %d request(s)", len(seqs))
            self.life.fail(seqs, f"generation failed: {type(err).__name__}: {err}")

    def _prefill(self, group: list[PrefillChunk[Sequence]]) -> None:
        """One forward over prompt chunks of similar widths; if it fails, each chunk alone."""
        try:
            self._prefill_forward(group)
        except Exception as err:
            if len(group) == 1:
                log.exception("prefill failed for %s", group[0].seq.label)
                self.life.fail([group[0].seq], f"generation failed: {type(err).__name__}: {err}")
                return
            log.warning("prefill of %d prompts failed (%s); retrying them one by one", len(group), type(err).__name__)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            for chunk in group:
                self._prefill([chunk])

    def _prefill_forward(self, group: list[PrefillChunk[Sequence]]) -> None:
        finishing = [i for i, c in enumerate(group) if c.last]
        seqs = [group[i].seq for i in finishing]
        sampling = self.sampler.prepare(seqs, fresh=True) if seqs else None
        scoring = wants_scores(group)
        logits = self.runner.run(prefill_inputs(group, self.pad_id), [c.seq.request.adapter for c in group], scoring)
        if scoring:
            score_chunks(group, logits, self.life.send)
            logits = logits[:, -1]
        for chunk in group:
            self.scheduler.prefilled(chunk)
        if seqs:
            self._accept(seqs, self.sampler.sample(seqs, logits[finishing], sampling))

    def _decode(self, seqs: list[Sequence]) -> None:
        """One decoding step for every running request. Out of memory, the newest request is
        dropped (with an error) and the step retried for the rest: the writes of a failed step
        sit at positions the retry overwrites."""
        while True:
            sampling = self.sampler.prepare(seqs)  # host-to-device copies go out before the forward
            try:
                logits = self.runner.run(decode_inputs(seqs), [s.request.adapter for s in seqs])
                break
            except torch.OutOfMemoryError:
                if len(seqs) == 1:
                    raise
                newest = max(seqs, key=lambda s: s.submitted)
                log.warning("out of memory in a step of %d requests: dropping the newest", len(seqs))
                self.life.fail([newest], "out of memory: the batch could not hold this request; retry it")
                seqs = [s for s in seqs if s is not newest]
        self._accept(seqs, self.sampler.sample(seqs, logits, sampling))

    def _accept(self, seqs: list[Sequence], sampled: list) -> None:
        for seq, (token, logprob) in zip(seqs, sampled):
            if seq.finish_reason is None:  # a row failed or released earlier in this step
                if logprob is not None:
                    seq.logprobs.append(logprob)
                self.life.accept(seq, token)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    configured = model.generation_config.eos_token_id
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
