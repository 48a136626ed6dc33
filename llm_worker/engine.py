"""The generation engine: one background thread owns the model and runs it step by step.

Four parts, each in its own module, with plain data passed between them:

- ``scheduler.py``: which requests run, under the KV budget and the batch size; chunked prefill
  under a per-step token budget, interleaved with decoding.
- ``runner.py``: the KV pool and one forward pass over fixed-shape inputs; CUDA graphs on CUDA.
- ``sampling.py``: logits to token ids for all rows at once, each row with its own settings.
- ``text.py``: token ids to text incrementally, stop strings, what may be streamed.

This module ties them together on one thread: take new requests, admit what fits, prefill a
budget of prompt tokens, decode one token for every running request, turn the tokens into
events for the callers. Each step has one transfer from the device: the sampled token ids.

Faults stay with their request: a failed prefill is retried one request at a time, a decoding
step out of memory drops the newest request, a row whose logits are not finite fails alone, a
caller that is gone is dropped, and no error stops the thread. ``close()`` ends every request in
flight with an error.

Beam search (``num_beams > 1``, ``beam_search.py``) runs through transformers' ``generate`` on
this thread, outside the KV pool: while it runs, the other requests wait. It stops early when its
job is cancelled or runs past ``MAX_JOB_SECONDS``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import itertools
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from llguidance import LLMatcher

from llm_worker.adapters import AdapterError, AdapterManager, AdapterSlotsBusy
from llm_worker.attention import check_model
from llm_worker.beam_search import beam_search
from llm_worker.constraints import Grammar, MaskComputer
from llm_worker.kv_cache import (
    BLOCK_SIZE,
    SCRATCH_BLOCK,
    BlockAllocator,
    prefix_hashes,
    KVPool,
    KVShape,
    blocks_for,
    kv_budget_blocks,
)
from llm_worker.runner import StepInputs, StepRunner, forward_step
from llm_worker.sampling import (
    BAD_ROW,
    BatchParams,
    SamplingParams,
    banned_ngram_tokens,
    sample,
    sample_with_logprobs,
)
from llm_worker.scheduler import PrefillChunk, Scheduler, Slot
from llm_worker.schema import GenerationConfig
from llm_worker.text import AnswerText

log = logging.getLogger(__name__)

MAX_PADDING_RATIO = 1.25  # a prefill forward computes at most this many padded tokens per real one
PROGRESS_SECONDS = 10.0  # how often running requests' progress is logged (debug level)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    config: GenerationConfig
    stop: tuple[str, ...] = ()
    adapter: str | None = None
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely alternatives
    grammar: Grammar | None = None  # the answer must follow it (a compiled json_schema, regex or choice)
    strip: bool = True  # answer without leading and trailing whitespace; False: exactly as generated
    job_id: str | None = None  # the job it answers, as the door names it (RunPod's job id): for the logs


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, with the most likely alternatives at that step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # eos | length | stop | time_limit
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens decoded since the previous delta


@dataclass(frozen=True)
class Failed:
    error: str


Event = Delta | Completion | Failed
Sink = Callable[[Event], None]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for metrics."""

    running: int  # holding KV: decoding, or their prompt being prefilled
    waiting: int  # submitted, not yet admitted
    kv_blocks_used: int  # referenced by a request
    kv_blocks_total: int
    kv_blocks_cached: int  # holding a cached prefix nobody uses now (free room too)


class EngineError(RuntimeError):
    """A request could not be served by the engine."""


class RequestHandle:
    """The caller's side of a submitted request: lets it cancel."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class Sequence:
    """One request while the engine works on it."""

    id: int
    request: GenerationRequest
    sink: Sink
    handle: RequestHandle
    submitted: float
    slot: Slot
    params: SamplingParams
    text: AnswerText
    generated: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None  # bool [vocab]: tokens seen, for the repetition penalty
    logprobs: list[TokenLogprob] = field(default_factory=list)
    unsent_logprobs: int = 0  # how many of ``logprobs`` no delta has carried yet
    finish_reason: str | None = None
    matcher: LLMatcher | None = None  # where the answer stands in its grammar, when it has one

    @property
    def label(self) -> str:
        """How the logs name it: its job's id (the door's, RunPod's job id), else the engine's number."""
        return f"job {self.request.job_id}" if self.request.job_id else f"request {self.id}"

    @property
    def position(self) -> int:
        """Position of the newest token, the one the next decoding step feeds."""
        return self.slot.prompt_len + len(self.generated) - 1


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step
    max_job_seconds: float = 0.0
    max_seq_len: int = 4096  # longest prompt + max_new_tokens a request may have
    kv_cache_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    cuda_graphs: bool = True
    prefix_caching: bool = True  # share the KV of prompt blocks already computed


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
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.adapters = adapters
        self.device = next(model.parameters()).device
        self.eos_ids = sorted(_eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        vocab = model.get_output_embeddings().weight.shape[0]
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.eos_mask[[i for i in self.eos_ids if i < vocab]] = True
        self.vocab = vocab

        check_model(model)
        shape = KVShape.of(model, dtype or _activation_dtype(model))
        max_blocks = blocks_for(config.max_seq_len)
        reserved = self._profile_peak(shape, max_blocks) if self.device.type == "cuda" else 0
        blocks = kv_budget_blocks(
            shape,
            self.device,
            kv_cache_tokens=config.kv_cache_tokens,
            gpu_memory_utilization=config.gpu_memory_utilization,
            reserved_bytes=reserved,
        )
        self.pool = KVPool(shape, blocks, self.device)
        self.max_seq_len = min(config.max_seq_len, self.pool.capacity_tokens)
        self.runner = StepRunner(model, self.pool, self.device, config.max_batch_size, max_blocks, config.cuda_graphs)
        self.runner.capture_at_start()
        log.info(
            "KV cache: %d tokens (%.2f GiB, %d blocks of %d), %d full-length sequences of %d tokens; batch up to %d; "
            "prefix caching %s",
            self.pool.capacity_tokens, self.pool.nbytes / 2**30, blocks - 1, BLOCK_SIZE,
            self.pool.capacity_tokens // config.max_seq_len, config.max_seq_len, config.max_batch_size,
            "on" if config.prefix_caching else "off (ENABLE_PREFIX_CACHE=0)",
        )
        self.scheduler: Scheduler[Sequence] = Scheduler(BlockAllocator(blocks), config.max_batch_size, config.max_prefill_tokens)
        self.masks = MaskComputer(vocab, self.device)
        self.prefix_caching = config.prefix_caching  # read at each submission (a benchmark turns it off and on)
        self._params_cache: dict[tuple[int, ...], BatchParams] = {}
        self._ids = itertools.count(1)
        self._last_progress = time.monotonic()
        self._inbox: queue.Queue[Sequence | None] = queue.Queue()
        self._closed = False
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="generation-engine", daemon=True)
        self._thread.start()

    def _profile_peak(self, shape: KVShape, max_blocks: int) -> int:
        """Activation memory of the worst steps (the widest decoding gather, the largest prefill
        chunk), measured on a two-block pool before the real one is sized, as vLLM's profile run."""
        probe = KVPool(shape, 2, self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        rows, width = self.config.max_batch_size, self.config.max_prefill_tokens

        def zeros(*size: int) -> torch.Tensor:
            return torch.zeros(size, dtype=torch.long, device=self.device)

        with torch.inference_mode():
            forward_step(self.model, probe, zeros(rows, 1), zeros(rows, 1), zeros(rows), zeros(rows, max_blocks))
            forward_step(self.model, probe, zeros(1, width), zeros(1, width), zeros(width), zeros(1, blocks_for(width)))
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del probe
        torch.cuda.empty_cache()  # else the cached activations count as used, and again as reserved
        sampling = rows * self.vocab * 48  # sort, probabilities, noise, order: a few [rows, vocab] tensors
        log.info("Profiled a worst-case step: %.2f GiB of activations", peak / 2**30)
        return int(peak * 1.2) + sampling

    @property
    def capacity_tokens(self) -> int:
        return self.pool.capacity_tokens

    @property
    def running(self) -> int:
        """Requests holding KV now (decoding, or their prompt being prefilled)."""
        return len(self.scheduler.running) + len(self.scheduler.prefilling)

    def stats(self) -> EngineStats:
        """Read from any thread: counts the engine thread may change a moment later."""
        scheduler = self.scheduler
        total = scheduler.allocator.total
        return EngineStats(
            running=self.running,
            waiting=len(scheduler.waiting) + self._inbox.qsize(),
            kv_blocks_used=total - scheduler.allocator.free,
            kv_blocks_total=total,
            kv_blocks_cached=scheduler.allocator.cached,
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
        handle = RequestHandle()
        config = request.config
        params = SamplingParams(
            sample=config.sampling,
            temperature=config.temperature or 1.0,
            top_k=config.top_k or 0,
            top_p=config.top_p if config.top_p is not None else 1.0,
            repetition_penalty=config.repetition_penalty,
            no_repeat_ngram_size=config.no_repeat_ngram_size,
            min_new_tokens=config.min_new_tokens,
            seed=config.seed if config.seed is not None else SamplingParams.random_seed(),
        )
        slot = Slot(prompt_len=len(request.prompt_ids), max_new_tokens=config.max_new_tokens)
        if self.prefix_caching and config.num_beams == 1:  # beam search computes outside the pool
            slot.prefix = prefix_hashes(request.prompt_ids, request.adapter or "")
        grammar = request.grammar
        text = AnswerText(self.tokenizer, request.stop, may_stop=grammar.accepts if grammar else None, strip=request.strip)
        seq = Sequence(next(self._ids), request, sink, handle, time.monotonic(), slot, params, text)
        seq.matcher = grammar.start() if grammar else None
        with self._submit_lock:
            if self._closed or not self._thread.is_alive():
                raise EngineError("the generation engine has stopped")
            self._inbox.put(seq)
        return handle

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
        self.masks.close()

    # ----------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        with torch.inference_mode():
            while self._take_inbox(block=not self.scheduler.busy):
                try:
                    self._iteration()
                except Exception as err:  # a bug must cost the requests it touched, never the engine
                    log.exception("engine iteration failed")
                    self._fail(self._in_flight(), f"engine error: {type(err).__name__}: {err}")
                if not self.scheduler.busy:
                    _return_freed_memory(self.device)
            leftovers = self._in_flight()
            while not self._inbox.empty():
                item = self._inbox.get_nowait()
                if item is not None:
                    leftovers.append(item)
            self._fail(leftovers, "the worker is shutting down: this request was not finished; retry it")

    def _in_flight(self) -> list[Sequence]:
        s = self.scheduler
        return [*s.waiting, *s.prefilling, *s.running]

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

    def _iteration(self) -> None:
        self._drop_cancelled_and_expired()
        for seq in self.scheduler.admit(self._ready):
            if seq.params.repetition_penalty != 1.0:
                seq.seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
                seq.seen[[t for t in seq.request.prompt_ids if t < self.vocab]] = True
            if seq.request.config.num_beams > 1:
                self._guarded([seq], self._run_beam_search)
        chunks = self.scheduler.plan_prefill()
        if chunks:
            self._prefill(chunks)
        if self.scheduler.running:
            self._guarded(list(self.scheduler.running), self._decode)
        self._log_progress()

    def _ready(self, seq: Sequence) -> bool | None:
        """Admission check for a request's adapter: load it if needed (True), wait while every
        adapter slot is busy (False), or fail the request (None)."""
        name = seq.request.adapter
        if name is None:
            return True
        in_use = {s.request.adapter for s in [*self.scheduler.running, *self.scheduler.prefilling]}
        loading = not self.adapters.is_loaded(name)
        try:
            model = self.adapters.activate(self.model, name, in_use, self.tokenizer)
        except AdapterSlotsBusy:
            return False
        except Exception as err:
            message = str(err) if isinstance(err, AdapterError) else f"adapter {name!r}: {err}"
            self._fail([seq], message)
            return None
        if loading:
            self.model = model
            self.runner.set_model(model)
        return True

    def _guarded(self, seqs: list[Sequence], work: Callable[[list[Sequence]], None]) -> None:
        """Run engine work; if it raises, fail exactly the requests it was for and keep serving."""
        try:
            work(seqs)
        except Exception as err:
            log.exception("generation failed for %d request(s)", len(seqs))
            self._fail(seqs, f"generation failed: {type(err).__name__}: {err}")

    def _send(self, seq: Sequence, event: Event) -> None:
        """Hand an event to the caller; a caller that is gone cancels its request, nothing more."""
        try:
            seq.sink(event)
        except Exception as err:
            log.warning("%s: its caller is gone (%s); dropping it", seq.label, type(err).__name__)
            seq.handle.cancel()
            self._release(seq, "cancelled")

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in list(seqs):
            if seq.finish_reason is None:
                self._release(seq, "error")
                self._send(seq, Failed(message))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _release(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.scheduler.release(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        rest = seq.text.delta(final=True)
        self._release(seq, reason)
        if rest:
            self._send(seq, self._delta(seq, rest))
        self._send(
            seq,
            Completion(
                text=seq.text.answer,
                finish_reason=reason,
                prompt_tokens=seq.slot.prompt_len,
                completion_tokens=len(seq.generated),
                token_ids=list(seq.generated),
                logprobs=list(seq.logprobs) if seq.request.logprobs is not None else None,
                cached_tokens=seq.slot.cached,
            ),
        )

    @staticmethod
    def _delta(seq: Sequence, text: str) -> Delta:
        fresh = tuple(seq.logprobs[seq.unsent_logprobs :])
        seq.unsent_logprobs = len(seq.logprobs)
        return Delta(text, fresh)

    def _drop_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        for seq in self._in_flight():
            if seq.handle.cancelled.is_set():
                self._release(seq, "cancelled")  # its caller is gone: nobody to tell
            elif self.config.max_job_seconds and now - seq.submitted > self.config.max_job_seconds:
                self._finish(seq, "time_limit")

    # ----------------------------------------------------------------- prefill
    def _prefill(self, chunks: list[PrefillChunk[Sequence]]) -> None:
        """Run this step's prompt chunks, a few forward passes of similar widths (little padding)."""
        chunks = sorted(chunks, key=lambda c: c.length)
        group: list[PrefillChunk[Sequence]] = []
        real = 0
        for chunk in chunks:
            padded = chunk.length * (len(group) + 1)
            if group and padded > MAX_PADDING_RATIO * (real + chunk.length):
                self._prefill_group(group)
                group, real = [], 0
            group.append(chunk)
            real += chunk.length
        if group:
            self._prefill_group(group)

    def _prefill_group(self, group: list[PrefillChunk[Sequence]]) -> None:
        try:
            self._prefill_forward(group)
        except Exception as err:
            if len(group) == 1:
                log.exception("prefill failed for %s", group[0].seq.label)
                self._fail([group[0].seq], f"generation failed: {type(err).__name__}: {err}")
                return
            log.warning("prefill of %d prompts failed (%s); retrying them one by one", len(group), type(err).__name__)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            for chunk in group:
                self._prefill_group([chunk])

    def _prefill_forward(self, group: list[PrefillChunk[Sequence]]) -> None:
        width = max(c.length for c in group)
        inputs = StepInputs([], [], [], [])
        for chunk in group:
            seq, pad = chunk.seq, width - chunk.length
            positions = range(chunk.start, chunk.start + chunk.length)
            inputs.input_ids.append([self.pad_id] * pad + seq.request.prompt_ids[chunk.start : chunk.start + chunk.length])
            inputs.positions.append([0] * pad + list(positions))
            inputs.write_index += [SCRATCH_BLOCK * BLOCK_SIZE] * pad + [_pool_index(seq, p) for p in positions]
            inputs.block_table.append(seq.slot.blocks)
        finishing = [i for i, c in enumerate(group) if c.last]
        seqs = [group[i].seq for i in finishing]
        sampling = self._sampling_inputs(seqs, fresh=True) if seqs else None
        logits = self.runner.run(inputs, [c.seq.request.adapter for c in group])
        for chunk in group:
            self.scheduler.prefilled(chunk)
        if seqs:
            self._sample_and_accept(seqs, logits[finishing], sampling)

    # ----------------------------------------------------------------- decode
    def _decode(self, seqs: list[Sequence]) -> None:
        """One decoding step for every running request. Out of memory, the newest request is
        dropped (with an error) and the step retried for the rest: the writes of a failed step
        sit at positions the retry overwrites."""
        while True:
            inputs = StepInputs(
                input_ids=[[s.generated[-1]] for s in seqs],
                positions=[[s.position] for s in seqs],
                write_index=[_pool_index(s, s.position) for s in seqs],
                block_table=[s.slot.blocks for s in seqs],
            )
            sampling = self._sampling_inputs(seqs)  # host-to-device copies go out before the forward
            try:
                logits = self.runner.run(inputs, [s.request.adapter for s in seqs])
                break
            except torch.OutOfMemoryError:
                if len(seqs) == 1:
                    raise
                newest = max(seqs, key=lambda s: s.submitted)
                log.warning("out of memory in a step of %d requests: dropping the newest", len(seqs))
                self._fail([newest], "out of memory: the batch could not hold this request; retry it")
                seqs = [s for s in seqs if s is not newest]
        self._sample_and_accept(seqs, logits, sampling)

    def _sampling_inputs(self, seqs: list[Sequence], fresh: bool = False) -> tuple:
        """What the sampler needs besides the logits, started before the forward: the host-to-device
        copies go out, and the grammar masks of constrained rows are computed meanwhile."""
        params = self._params_for(seqs, fresh)
        generated = torch.tensor([len(s.generated) for s in seqs], dtype=torch.long).to(self.device, non_blocking=True)
        return params, generated, self._bans(seqs), self.masks.start([s.matcher for s in seqs])

    def _sample_and_accept(self, seqs: list[Sequence], logits: torch.Tensor, sampling: tuple) -> None:
        params, generated, banned, grammar_masks = sampling
        if grammar_masks is not None:
            disallowed = self.masks.banned(grammar_masks)
            banned = disallowed if banned is None else banned | disallowed
        wanted = [s.request.logprobs for s in seqs if s.request.logprobs is not None]
        if not wanted:
            tokens = sample(logits, params, generated, self.eos_mask, banned).tolist()  # the step's one transfer back
            for seq, token in zip(seqs, tokens):
                if seq.finish_reason is None:
                    self._accept(seq, token)
            return
        top = max(wanted)
        result = sample_with_logprobs(logits, params, generated, self.eos_mask, banned, top)
        packed = torch.cat([result[0][:, None].double(), result[1][:, None].double(), result[2].double(), result[3].double()], 1)
        for seq, row in zip(seqs, packed.tolist()):  # still one transfer back
            if seq.finish_reason is not None:
                continue
            token = int(row[0])
            if seq.request.logprobs is not None and token != BAD_ROW:
                alternatives = tuple(zip(map(int, row[2 + top : 2 + top + seq.request.logprobs]), row[2 : 2 + seq.request.logprobs]))
                seq.logprobs.append(TokenLogprob(token, row[1], alternatives))
            self._accept(seq, token)

    def _params_for(self, seqs: list[Sequence], fresh: bool) -> BatchParams:
        """The rows' sampling tensors, rebuilt only when a decoding group's rows change. A row's
        ``seen`` lives in the one cached batch that holds it."""
        key = tuple(s.id for s in seqs)
        params = None if fresh else self._params_cache.get(key)
        if params is None:
            seen = [s.seen for s in seqs] if any(s.seen is not None for s in seqs) else None
            if seen is not None:
                seen = [row if row is not None else torch.zeros(self.vocab, dtype=torch.bool, device=self.device) for row in seen]
            params = BatchParams.build([s.params for s in seqs], seen, self.device)
            if params.seen is not None:
                for i, seq in enumerate(seqs):
                    if seq.seen is not None:
                        seq.seen = params.seen[i]  # the batch tensor is updated in place each step
            if not fresh:
                rows = set(key)
                self._params_cache = {k: v for k, v in self._params_cache.items() if rows.isdisjoint(k)}
                self._params_cache[key] = params
        return params

    def _bans(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """n-gram bans, for the rare rows that ask for them (host work per such row)."""
        rows = [(i, s) for i, s in enumerate(seqs) if s.params.no_repeat_ngram_size]
        if not rows:
            return None
        banned = torch.zeros((len(seqs), self.vocab), dtype=torch.bool)
        for i, seq in rows:
            tokens = banned_ngram_tokens(seq.request.prompt_ids + seq.generated, seq.params.no_repeat_ngram_size)
            banned[i, tokens] = True
        return banned.to(self.device)

    def _accept(self, seq: Sequence, token: int) -> None:
        """Take one generated token: update text, stream what is safe, finish if it is time."""
        if token == BAD_ROW:
            self._fail([seq], "generation failed: the model produced non-finite logits (NaN or infinity) for this request")
            return
        seq.generated.append(token)
        if token in self.eos_ids:
            self._finish(seq, "eos")
            return
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            self._fail([seq], f"generation failed: the answer left its grammar ({seq.matcher.get_error().splitlines()[0]})")
            return
        seq.text.add(token)
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.slot.max_new_tokens:
            self._finish(seq, "length")
        else:
            delta = seq.text.delta()
            if delta:
                self._send(seq, self._delta(seq, delta))

    def _log_progress(self) -> None:
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

    # ----------------------------------------------------------------- beam search
    def _run_beam_search(self, seqs: list[Sequence]) -> None:
        """Beam search (``beam_search.py``) on the engine thread; it stops early when the job is
        cancelled or runs past its time limit."""
        (seq,) = seqs
        self.scheduler.prefilling.remove(seq)
        self.scheduler.running.append(seq)  # counted as running while it runs
        deadline = seq.submitted + self.config.max_job_seconds if self.config.max_job_seconds else None
        request = seq.request
        tokens = beam_search(
            self.model, request.prompt_ids, request.config, seq.params, request.adapter,
            self.eos_ids, self.pad_id, seq.handle.cancelled, deadline,
        )
        if seq.handle.cancelled.is_set():
            self._release(seq, "cancelled")
            return
        for token in tokens:
            self._accept(seq, token)
            if seq.finish_reason is not None:
                return
        self._finish(seq, "time_limit" if deadline and time.monotonic() > deadline else "length")


def _return_freed_memory(device: torch.device) -> None:
    """An idle CPU worker gives a burst's temporary buffers back: glibc keeps freed heap pages for
    reuse (measured: 0.76 GB before a 200-job burst, 2.06 GB after, without this). A GPU keeps
    its cached blocks: they are inside the memory budget and the next burst reuses them."""
    if device.type == "cpu" and sys.platform.startswith("linux") and (libc := ctypes.util.find_library("c")):
        ctypes.CDLL(libc).malloc_trim(0)


def _pool_index(seq: Sequence, position: int) -> int:
    """Where the token at ``position`` of ``seq`` lives in the flat pool."""
    return seq.slot.blocks[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE


def _activation_dtype(model) -> torch.dtype:
    floats = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    configured = model.generation_config.eos_token_id
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
