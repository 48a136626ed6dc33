"""The generation engine: one background thread owns the model and runs it step by step.

Each step: take new requests, admit what fits, prefill a budget of prompt tokens, decode one
token for every running request, turn the tokens into events for the callers. Each launch has one
transfer from the device: the sampled token ids. With ``OVERLAP_STEPS`` the engine launches a
step before it reads the previous one's tokens back (``inflight.py``), so the device never waits
for the host between steps; a step with a row whose next input needs its token on the host first
(a grammar's mask, n-gram bans) reads everything back before it launches. The parts live beside
this module, with plain data passed between them:

- ``scheduler.py``: which requests run, under the KV budget and the batch size; chunked prefill
  under a per-step token budget, interleaved with decoding.
- ``runner.py`` (``forward.py``, ``graphs.py``, ``adapter_rows.py``): the KV pool and one forward
  pass over fixed-shape inputs; CUDA graphs on CUDA; ``startup.py`` sizes and starts it.
- ``step_sampling.py`` over ``sampler.py``: logits to token ids for all rows at once, each row with
  its own settings.
- ``lifecycle.py`` over ``text.py``: each token accepted, text streamed, requests finished.
- ``device.py``: the device's queue as the engine thread sees it (tokens read back, busy time);
  ``host_time.py``: where the engine thread's time goes, for benchmarks.

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
from collections.abc import AsyncIterator

import torch

from llm_worker.engine.beam_search import answer_with_beams
from llm_worker.engine.constraints import grammar_vocab
from llm_worker.engine.device import Device, device_for
from llm_worker.engine.host_time import HostClock, NoClock
from llm_worker.engine.launcher import StepLauncher
from llm_worker.engine.kv_cache import BlockAllocator
from llm_worker.engine.lifecycle import Lifecycle
from llm_worker.engine.memory import return_freed_memory
from llm_worker.engine.ranks import KEEP_ALIVE_SECONDS, RankLost, Ranks
from llm_worker.engine.requests import (
    Completion,
    Delta,
    EngineConfig,
    EngineError,
    EngineStats,
    Event,
    Failed,
    GenerationRequest,
    LoopSink,
    RequestHandle,
    Sink,
)
from llm_worker.engine.scheduler import Scheduler, group_by_width
from llm_worker.engine.sequence import Sequence
from llm_worker.engine.startup import capture_when_idle, start_runner
from llm_worker.engine.step_sampling import StepSampler
from llm_worker.model.adapters import AdapterError, AdapterManager, AdapterSlotsBusy

log = logging.getLogger(__name__)
LOST = object()  # put in the inbox when a tensor-parallel rank ends


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        config: EngineConfig = EngineConfig(),
        *,
        dtype: torch.dtype | None = None,
        adapters: AdapterManager | None = None,
        device: Device | None = None,
        ranks: Ranks | None = None,
    ) -> None:
        """``ranks``: under tensor parallel, this rank 0's group (the other ranks follow its steps)."""
        self.model, self.tokenizer, self.config, self.adapters = model, tokenizer, config, adapters
        self.ranks = ranks
        self.device = next(model.parameters()).device
        self.target = device or device_for(self.device)  # the device's queue: readbacks, busy time
        self.eos_ids = sorted(_eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.vocab = model.get_output_embeddings().weight.shape[0]

        self.runner = start_runner(model, config, self.device, dtype, self.target, ranks)
        self.pool = self.runner.pool
        self.max_seq_len = min(config.max_seq_len, self.pool.capacity_tokens)
        blocks = self.pool.blocks
        self.scheduler: Scheduler[Sequence] = Scheduler(BlockAllocator(blocks), config.max_batch_size, config.max_prefill_tokens)
        self.sampler = StepSampler(self.vocab, self.eos_ids, self.device, grammar_vocab(self.vocab, tokenizer))
        self.life = Lifecycle(self.scheduler, self.eos_ids, self.device, config.max_job_seconds)
        self.prefix_caching = config.prefix_caching  # read at each submission (a benchmark turns it off and on)
        self.overlap = config.overlap_steps  # read at each step
        self.launcher = StepLauncher(self.runner, self.sampler, self.life, self.target, self.pad_id)
        self.clock: HostClock = NoClock()
        self._ids = itertools.count(1)
        self._inbox: queue.Queue[Sequence | None] = queue.Queue()
        self._closed = False
        self._submit_lock = threading.Lock()
        if ranks is not None:  # a rank that ended wakes the engine, which fails what is in flight and stops
            ranks.on_lost.append(lambda reason: self._inbox.put(LOST))
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
        handle = self.submit(request, LoopSink(loop, events.put_nowait))
        try:
            while True:
                event = await events.get()
                yield event
                if not isinstance(event, Delta):
                    return
        finally:
            handle.cancel()

    def measure_host(self, clock: HostClock | None) -> None:
        """Time the engine thread's parts of each step into ``clock`` (None: stop)."""
        self.clock = self.life.clock = self.launcher.clock = self.launcher.inflight.clock = clock or NoClock()

    def wait_stopped(self, timeout: float) -> bool:
        """Wait until the engine thread has ended (closed, or stopped by a lost rank)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

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
            try:
                self._serve()
            except RankLost as err:  # the ranks are out of step: nothing more can run
                log.error("the engine stops: %s", err)
                reason = f"the worker lost a tensor-parallel rank ({err}) and stops; retry on another worker"
                self._end_all(reason)
                return
        self._end_all("the worker is shutting down: this request was not finished; retry it")

    def _serve(self) -> None:
        while self._take_inbox(block=not (self.scheduler.busy or self.runner.pending or self.launcher.inflight)):
            try:
                if self.scheduler.busy:
                    self._step()
                elif self.launcher.inflight:  # tokens of requests that ended meanwhile: read back, dropped
                    self.launcher.drain()
                else:  # idle: one planned graph, then the inbox again
                    capture_when_idle(self.runner)
                    continue
            except RankLost:
                raise
            except Exception as err:  # a bug must cost the requests it touched, never the engine
                log.exception("engine iteration failed")
                self.life.fail(self.life.in_flight(), f"engine error: {type(err).__name__}: {err}")
            if self.ranks is not None and self.ranks.lost:
                raise RankLost(self.ranks.lost)
            self.life.flush()
            self.clock.lap("text")
            if not self.scheduler.busy:
                return_freed_memory(self.device)

    def _end_all(self, reason: str) -> None:
        """Fail every request in flight or waiting with ``reason``."""
        with self._submit_lock:
            self._closed = True
        leftovers = self.life.in_flight()
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if isinstance(item, Sequence):
                leftovers.append(item)
        self.life.fail(leftovers, reason)
        self.life.flush()

    def _take_inbox(self, block: bool) -> bool:
        """Move new requests to the waiting line; False when the engine is asked to stop. Under
        tensor parallel, waiting idle tells the other ranks rank 0 is there now and then."""
        try:
            item = self._next(block)
            while True:
                if item is None:
                    return False
                if item is LOST:
                    raise RankLost(self.ranks.lost)
                self.scheduler.waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _next(self, block: bool):
        if not block or self.ranks is None:
            return self._inbox.get(block=block)
        while True:
            try:
                return self._inbox.get(timeout=KEEP_ALIVE_SECONDS)
            except queue.Empty:
                self.ranks.tell("ping")

    def _step(self) -> None:
        """Launch this step's prefill chunks and decoding rows, then read back what earlier steps
        launched (overlapping), or each launch as soon as it is made."""
        self.clock.start()
        self.life.drop_cancelled_and_expired()
        launcher = self.launcher
        for seq in self.scheduler.admit(self._adapter_ready):
            self.sampler.admit(seq)
            if seq.request.config.num_beams > 1:
                launcher.drain()
                self.life.guarded([seq], lambda seqs: answer_with_beams(seqs[0], self.model, self.life, self.eos_ids, self.pad_id))
        groups = group_by_width(self.scheduler.plan_prefill())
        overlap = self.overlap and not any(seq.host_bound for seq in (*self.scheduler.running, *self.scheduler.prefilling))
        earlier = len(launcher.inflight) if overlap else 0
        self.clock.lap("schedule")
        if not overlap:
            launcher.drain()
        for group in groups:
            launcher.prefill(group)
            if not overlap:
                launcher.drain()
        decoding = [seq for seq in self.scheduler.running if seq.wants_token]
        self.clock.lap("schedule")
        if decoding:
            self.life.guarded(decoding, launcher.decode)
        launcher.resolve(earlier)
        if not overlap:
            launcher.drain()
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
            self.launcher.drain()  # steps in flight may still replay the graphs about to be dropped
            if self.ranks is not None:
                self.ranks.tell("adapters", self.adapters.loaded_folders())
            self.model = model
            self.runner.set_model(model)
        return True

def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    configured = model.generation_config.eos_token_id
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
