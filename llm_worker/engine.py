"""The generation engine: one background thread owns the model and batches at decoding steps.

Design (measured on the project's 2-core CPU with SmolLM2-135M; figures in the README):

- Step-level continuous batching, in the spirit of TGI's original ``CausalLMBatch``
  (``concatenate`` / ``filter``). Every step is one ``model(...)`` call over all running
  requests, so the weights are read once per step for everyone: on a bandwidth-bound device
  that is where the throughput comes from. A new request is prefilled (with the others that
  arrived meanwhile, shortest first, in chunks of little padding) and joins at the next step. A
  finished request leaves at once, and its answer goes out without waiting for the others.
- The KV cache is a ``SlotCache`` (``kv_cache.py``): one row per request, written in place.
  The first version concatenated like ``DynamicCache`` and rebuilt a left-padded cache on every
  join and leave; at 32 concurrent requests that was slower than at 8 (page-fault churn).
- Not transformers' own ``init_continuous_batching``: on this CPU it measured 70 tok/s at 32
  requests, against 115-280 for padded batching (its packed attention dominates a step). It
  refuses per-request ``repetition_penalty`` and PEFT ``adapter_names``, and its result queue
  re-queues other requests' results. Plain forward calls over a ``DynamicCache`` subclass keep
  every model that transformers and PEFT support.
- Each row is sampled with its own settings and its own ``torch.Generator`` (``sampling.py``),
  and positions beyond a row's length are masked. So in fp32 a greedy answer in a batch equals
  the same request alone (tested); in bf16 the batch shape changes kernel rounding.
- Beam search (``num_beams > 1``) runs through ``model.generate`` on this same thread, between
  steps. Its tokens then go through the same ``_accept`` path as batched ones (stop strings,
  finish reasons, text).
- Faults stay with the requests they touch: a failed prefill chunk is retried one request at a
  time, an out-of-memory step drops the newest request, and no error stops the thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from llm_worker.adapters import AdapterError, AdapterManager, AdapterSlotsBusy
from llm_worker.kv_cache import SlotCache
from llm_worker.sampling import RowSampling, next_tokens
from llm_worker.schema import GenerationConfig

log = logging.getLogger(__name__)

MAX_PADDING_RATIO = 1.25  # a prefill chunk computes at most this many padded tokens per real one
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    config: GenerationConfig
    stop: tuple[str, ...] = ()
    adapter: str | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # eos | length | stop | time_limit | cancelled
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Failed:
    error: str


Event = Delta | Completion | Failed
Sink = Callable[[Event], None]


class EngineError(RuntimeError):
    """A request could not be served by the engine."""


class RequestHandle:
    """The caller's side of a submitted request: lets it cancel."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Sequence:
    """One request while the engine works on it."""

    request: GenerationRequest
    sink: Sink
    handle: RequestHandle
    submitted: float
    row: RowSampling | None = None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_batch_size: int = 32,
        max_prefill_tokens: int = 4096,
        max_job_seconds: float = 0.0,
        adapters: AdapterManager | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_job_seconds = max_job_seconds
        self.adapters = adapters
        self._cache = SlotCache(model.config.get_text_config(decoder=True).num_hidden_layers, self.device)
        self.eos_ids = sorted(_eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._inbox: queue.Queue[Sequence | None] = queue.Queue()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._thread = threading.Thread(target=self._loop, name="generation-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- callers' side
    def submit(self, request: GenerationRequest, sink: Sink) -> RequestHandle:
        if not self._thread.is_alive():
            raise EngineError("the generation engine has stopped")
        handle = RequestHandle()
        self._inbox.put(Sequence(request, sink, handle, time.monotonic()))
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
        cancels the request, which frees its batch slot at the next step."""
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
        self._inbox.put(None)
        self._thread.join()

    @property
    def running(self) -> int:
        return len(self._active)

    # ----------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._take_inbox(block=not self._active and not self._waiting):
                    return
                try:
                    self._drop_cancelled_waiting()
                    self._admit()
                    self._drop_cancelled_and_expired()
                    if self._active:
                        self._guarded(self._active, self._step)
                except Exception as err:  # a bug must cost the requests it touched, never the engine
                    log.exception("engine iteration failed")
                    self._fail(self._active + list(self._waiting), f"engine error: {type(err).__name__}: {err}")
                    self._waiting.clear()

    def _take_inbox(self, block: bool) -> bool:
        """Move new requests to the waiting line; False when the engine is asked to stop."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    return False
                self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _drop_cancelled_waiting(self) -> None:
        for seq in [s for s in self._waiting if s.handle.cancelled.is_set()]:
            self._waiting.remove(seq)

    def _admit(self) -> None:
        """Start waiting requests while there is room. Prompts are prefilled shortest first, in
        chunks of similar length, so that little padding is computed (a burst of 32 seed tasks
        padded to its longest prompt costs 3x the prefill of the same prompts sorted). Each chunk's
        first tokens go out as soon as it is done."""
        admitted: list[Sequence] = []
        while self._waiting and len(self._active) + len(admitted) < self.max_batch_size:
            seq = self._waiting[0]
            if seq.request.adapter is not None:
                in_use = {s.request.adapter for s in self._active + admitted}
                try:
                    self.model = self.adapters.activate(self.model, seq.request.adapter, in_use)
                except AdapterSlotsBusy:
                    break  # every loaded adapter is busy: admit once a running request ends
                except Exception as err:
                    self._waiting.popleft()
                    message = str(err) if isinstance(err, AdapterError) else f"adapter {seq.request.adapter!r}: {err}"
                    self._fail([seq], message)
                    continue
            self._waiting.popleft()
            seq.row = self._row_sampling(seq.request)
            if seq.request.config.num_beams > 1:
                self._guarded([seq], self._run_beam_search)
            else:
                admitted.append(seq)
        admitted.sort(key=lambda s: len(s.request.prompt_ids))
        chunk: list[Sequence] = []
        real_tokens = 0
        for seq in admitted:
            length = len(seq.request.prompt_ids)
            padded = length * (len(chunk) + 1)
            if chunk and (padded > self.max_prefill_tokens or padded > MAX_PADDING_RATIO * (real_tokens + length)):
                self._guarded(chunk, self._prefill)
                chunk, real_tokens = [], 0
            chunk.append(seq)
            real_tokens += length
        if chunk:
            self._guarded(chunk, self._prefill)

    def _guarded(self, seqs: list[Sequence], work: Callable[[list[Sequence]], None]) -> None:
        """Run engine work; if it raises, fail exactly the requests it was for and keep serving."""
        try:
            work(seqs)
        except Exception as err:
            log.exception("generation failed for %d request(s)", len(seqs))
            self._fail(seqs, f"generation failed: {type(err).__name__}: {err}")

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in list(seqs):
            if seq.finish_reason is None:
                seq.finish_reason = "error"
                seq.sink(Failed(message))
        _release_accelerator_memory(self.device)
        self._remove_finished()

    def _row_sampling(self, request: GenerationRequest) -> RowSampling:
        config = request.config
        generator = None
        if config.sampling:
            generator = torch.Generator(device=self.device)
            if config.seed is not None:
                generator.manual_seed(config.seed)
            else:
                generator.seed()
        seen = None
        if config.repetition_penalty != 1.0:
            seen = torch.zeros(_vocab_size(self.model), dtype=torch.bool, device=self.device)
            seen[request.prompt_ids] = True
        return RowSampling(
            token_ids=list(request.prompt_ids),
            generated=0,
            sample=config.sampling,
            temperature=config.temperature or 1.0,
            top_k=config.top_k or 0,
            top_p=config.top_p if config.top_p is not None else 1.0,
            repetition_penalty=config.repetition_penalty,
            no_repeat_ngram_size=config.no_repeat_ngram_size,
            min_new_tokens=config.min_new_tokens,
            generator=generator,
            seen=seen,
        )

    def _forward(self, seqs: list[Sequence], **inputs) -> torch.Tensor:
        outputs = self.model(**inputs, **self._adapter_kwargs(seqs), use_cache=True, logits_to_keep=1)
        return outputs.logits[:, -1, :]

    def _adapter_kwargs(self, seqs: list[Sequence]) -> dict:
        """Select the rows' LoRA adapters: one shared adapter becomes PEFT's active adapter (no
        per-row dispatch); anything else uses PEFT's mixed-batch ``adapter_names``."""
        if not hasattr(self.model, "peft_config"):
            return {}
        names = [s.request.adapter or BASE_ADAPTER for s in seqs]
        if len(set(names)) == 1 and names[0] != BASE_ADAPTER:
            if self.model.active_adapter != names[0]:
                self.model.set_adapter(names[0])
            return {}
        return {"adapter_names": names}

    def _prefill(self, group: list[Sequence]) -> None:
        """Run the new prompts (left-padded together), pick their first tokens, merge them in."""
        longest = max(len(s.request.prompt_ids) for s in group)
        input_ids = torch.full((len(group), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for i, seq in enumerate(group):
            ids = seq.request.prompt_ids
            input_ids[i, longest - len(ids) :] = torch.tensor(ids)
            mask[i, longest - len(ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model.config)
        try:
            logits = self._forward(
                group,
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                cache=cache,
            )
        except Exception:
            if len(group) == 1:
                raise
            log.warning("prefill of %d prompts failed; retrying them one by one", len(group))
            del cache
            _release_accelerator_memory(self.device)
            for seq in group:
                self._guarded([seq], self._prefill)
            return
        self._cache.add_rows(cache, [len(s.request.prompt_ids) for s in group])
        self._active.extend(group)
        self._accept_all(group, next_tokens(logits, [s.row for s in group], self.eos_ids))

    def _step(self, seqs: list[Sequence]) -> None:
        """One decoding step for every running request. Out of memory, the newest request is
        dropped (with an error) and the step retried for the rest: the writes of a failed step
        sit at positions the retry overwrites."""
        while True:
            self._cache.prepare_step()
            try:
                logits = self._forward(
                    seqs,
                    input_ids=torch.tensor([[s.generated[-1]] for s in seqs], device=self.device),
                    attention_mask=self._cache.attention_mask(),
                    position_ids=self._cache.lengths[:, None],
                    cache=self._cache,
                )
                break
            except torch.OutOfMemoryError:
                if len(seqs) == 1:
                    raise
                newest = max(seqs, key=lambda s: s.submitted)
                log.warning("out of memory in a step of %d requests: dropping the newest", len(seqs))
                self._fail([newest], "out of memory: the batch could not hold this request; retry it")
        self._cache.advance()
        self._accept_all(seqs, next_tokens(logits, [s.row for s in seqs], self.eos_ids))

    def _drop_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        for seq in self._active:
            if seq.handle.cancelled.is_set():
                seq.finish_reason = "cancelled"
            elif self.max_job_seconds and now - seq.submitted > self.max_job_seconds:
                self._finish(seq, "time_limit")
        self._remove_finished()

    def _accept_all(self, seqs: list[Sequence], tokens: list[int]) -> None:
        for seq, token in zip(seqs, tokens):
            self._accept(seq, token)
        self._remove_finished()

    def _accept(self, seq: Sequence, token: int) -> None:
        """Take one generated token: update text, stream what is safe, finish if it is time."""
        seq.generated.append(token)
        row = seq.row
        row.token_ids.append(token)
        row.generated += 1
        if row.seen is not None:
            row.seen[token] = True
        if token in self.eos_ids:
            self._finish(seq, "eos")
            return
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and row.generated < seq.request.config.max_new_tokens:
            return  # an incomplete multi-byte character: wait for the rest
        seq.text = text
        stop_at = _find_stop(text, seq.request.stop)
        if stop_at is not None:
            seq.text = text[:stop_at]
            self._finish(seq, "stop")
        elif row.generated >= seq.request.config.max_new_tokens:
            self._finish(seq, "length")
        else:
            self._emit(seq, _streamable_length(text, seq.request.stop))

    def _emit(self, seq: Sequence, upto: int) -> None:
        visible = seq.text.lstrip()
        upto = min(upto - (len(seq.text) - len(visible)), len(visible.rstrip()))
        if upto > seq.emitted:
            seq.sink(Delta(visible[seq.emitted : upto]))
            seq.emitted = upto

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._emit(seq, len(seq.text))
        seq.finish_reason = reason
        seq.sink(
            Completion(
                text=seq.text.strip(),
                finish_reason=reason,
                prompt_tokens=len(seq.request.prompt_ids),
                completion_tokens=len(seq.generated),
                token_ids=list(seq.generated),
            )
        )

    def _remove_finished(self) -> None:
        """Drop finished rows at once (highest first, so the rows moved into gaps are live ones)."""
        for row in reversed(range(len(self._active))):
            if self._active[row].finish_reason is not None:
                moved = self._cache.remove_row(row)
                self._active[row] = self._active[moved]
                self._active.pop()

    def _run_beam_search(self, seqs: list[Sequence]) -> None:
        """Beam search through ``model.generate``, serialized on the engine thread."""
        (seq,) = seqs
        config = seq.request.config
        sampling = {}
        if config.sampling:
            sampling = {"do_sample": True, "temperature": seq.row.temperature, "top_k": seq.row.top_k, "top_p": seq.row.top_p}
            if config.seed is not None:
                torch.manual_seed(config.seed)
        input_ids = torch.tensor([seq.request.prompt_ids], device=self.device)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            num_beams=config.num_beams,
            max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.min_new_tokens,
            repetition_penalty=config.repetition_penalty,
            no_repeat_ngram_size=config.no_repeat_ngram_size,
            early_stopping=True,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            **sampling,
            **self._adapter_kwargs(seqs),
        )
        for token in output[0, input_ids.shape[1] :].tolist():
            self._accept(seq, token)
            if seq.finish_reason is not None:
                break
        if seq.finish_reason is None:
            self._finish(seq, "length")


def _release_accelerator_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(stop) for stop in stops]
    found = [p for p in positions if p >= 0]
    return min(found) if found else None


def _streamable_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent: all but a tail that could still grow into a stop string."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return len(text) - held


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    configured = model.generation_config.eos_token_id
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]
