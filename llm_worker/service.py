"""The worker: turns job inputs into engine requests and engine events into job outputs.

The handler, notebooks, benchmarks and tests all go through ``Worker``; it is the one place where
input is validated, prompts are built and outputs are shaped.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from llm_worker import native
from llm_worker import parallel as tensor_parallel
from llm_worker.engine import Completion, Delta, Engine, EngineConfig, EngineError, Failed, GenerationRequest, LoopSink
from llm_worker.engine.constraints import Grammars, grammar_vocab
from llm_worker.engine.device import Device
from llm_worker.logs import log_refused
from llm_worker.reports import RequestRecord, log_job
from llm_worker.model.adapters import AdapterError, AdapterManager
from llm_worker.model.reasoning import thinks
from llm_worker.model.loading import LoadedModel
from llm_worker.model.prompts import render_prompt
from llm_worker.model.quantization import QuantizationError
from llm_worker.model.sharding import ShardingError
from llm_worker.parallel import RankStartError, TensorParallel
from llm_worker.schema import GenerationConfig, InputError, JobInput, Limits, ListAdaptersInput, parse_job_input
from llm_worker.settings import Settings, SettingsError
from model_cache import ModelSourceError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Worker:
    """Owns the loaded model and its engine. Build one per process with ``Worker.start()``."""

    def __init__(
        self,
        settings: Settings,
        loaded: LoadedModel | None,
        adapters: AdapterManager | None = None,
        load_error: str | None = None,
        device: Device | None = None,
        parallel: TensorParallel | None = None,
    ) -> None:
        """``device``: the device's queue the engine launches on (default: the model's device's;
        a simulated GPU in benchmarks and tests); ``parallel``: this rank 0 of tensor parallel."""
        self.settings = settings
        self.parallel = parallel
        self.loaded = loaded
        self.adapters = adapters
        self.load_error = load_error
        self.limits = Limits(
            max_input_bytes=settings.max_input_bytes,
            max_new_tokens=settings.max_new_tokens_limit,
            max_stop_strings=settings.max_stop_strings,
            max_stop_chars=settings.max_stop_chars,
        )
        self.engine = None
        self.ready_seconds: float | None = None  # from Worker.start to ready to answer
        self.watchers: list[Callable[[RequestRecord], None]] = []  # told how each engine request went
        if loaded is not None:
            self.context_length = _context_length(loaded)
            try:
                self.engine = Engine(
                    loaded.model, loaded.tokenizer, engine_config(settings, self.context_length), dtype=loaded.dtype,
                    adapters=adapters, device=device, ranks=parallel.ranks if parallel else None,
                )
                self.grammars = Grammars(loaded.tokenizer, grammar_vocab(self.engine.vocab, loaded.tokenizer), self.engine.eos_ids)
                self.grammars.warm_up()
            except Exception as err:
                log.exception("the engine failed to start")
                self.load_error = f"the engine failed to start: {type(err).__name__}: {err}"
                _close(parallel)

    @classmethod
    def start(cls, settings: Settings | None = None, device: Device | None = None) -> Worker:
        """Read the settings and load the model. If a setting is invalid or the model fails to load,
        return a worker that answers every job with the reason (on RunPod, a worker that exits at
        start is restarted in a loop and tells callers nothing). ``device``: as for ``Worker``."""
        try:
            settings = settings or Settings()
        except SettingsError as err:
            for problem in err.problems:
                log.error("Invalid setting: %s", problem)
            return cls(Settings.model_construct(), None, load_error=f"invalid configuration: {err}")
        log_settings(settings)
        started = time.perf_counter()
        try:
            loaded, adapters, parallel = tensor_parallel.load_on_every_rank(settings)
        except (ModelSourceError, AdapterError, ShardingError, RankStartError, QuantizationError) as err:  # explained in its message
            log.error("The model failed to load: %s", err)
            return cls(settings, None, load_error=f"the model failed to load: {err}")
        except Exception as err:
            log.exception("The model failed to load")
            return cls(settings, None, load_error=f"the model failed to load: {type(err).__name__}: {err}")
        log.info("Loaded %s in %.1f s", loaded.name, loaded.load_seconds)
        log.info("The chat template %s", thinks(settings.chat_template or getattr(loaded.tokenizer, "chat_template", None)))
        worker = cls(settings, loaded, adapters, device=device, parallel=parallel)
        if parallel is not None:  # from then on, every job is answered with the reason
            parallel.ranks.on_lost.insert(0, lambda reason: setattr(worker, "load_error", f"the worker lost a tensor-parallel rank ({reason})"))
        worker.ready_seconds = time.perf_counter() - started
        if worker.engine is not None:
            log.info("Ready in %.1f s (model %.1f s, engine and grammars %.1f s)",
                     worker.ready_seconds, loaded.load_seconds, worker.ready_seconds - loaded.load_seconds)
        return worker

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        _close(self.parallel)
        gc.collect()  # a model and its KV pool caught in reference cycles are gigabytes: give them back now

    # ------------------------------------------------------------------ requests
    def build_request(self, job: JobInput, job_id: str | None = None) -> GenerationRequest:
        prompt_config = job.prompt_config
        prompt = render_prompt(
            self.loaded.tokenizer,
            prompt_config.template,
            prompt_config.instruction,
            prompt_config.input,
            stop_at_section=prompt_config.stop_at_section,
        )
        ids = self.loaded.tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        config = job.generation_config
        return self.request(ids, config, tuple(config.stop) + prompt.stop, job.adapter, job_id)

    def request(
        self, ids: list[int], config: GenerationConfig, stop: tuple[str, ...], adapter: str | None, job_id: str | None = None
    ) -> GenerationRequest:
        """The engine request for a tokenized prompt, once it is known to fit; ``adapter`` as a job
        names it, ``job_id`` as the door names the job (for the logs). The config's constraint, if
        any, is compiled (cached)."""
        check_fits(ids, config, self.settings, self.context_length, self.engine, tensor_parallel=self.parallel is not None)
        chosen = self.adapters.choose(adapter)
        if chosen == self.adapters.merged:
            chosen = None  # already in the weights
        grammar = self.grammars.compile(*config.constraint) if config.constraint is not None else None
        return GenerationRequest(
            prompt_ids=ids, config=config, stop=stop, adapter=chosen, adapter_revision=self.adapters.revision(chosen),
            logprobs=config.logprobs, grammar=grammar, job_id=job_id,
        )

    def prepare(self, raw: Any, job_id: str | None = None) -> tuple[JobInput | ListAdaptersInput, GenerationRequest | None]:
        """Validate a job input; a generation job also gets its engine request. A refused job is
        logged (at INFO, with the reason: field names and limits, never the job's text)."""
        if self.load_error:
            raise EngineError(self.load_error)
        try:
            job = parse_job_input(raw, self.limits)
            if isinstance(job, ListAdaptersInput):
                return job, None
            return job, self.build_request(job, job_id)
        except InputError as err:
            log_refused(job_id, str(err))
            raise

    @staticmethod
    def choices(request: GenerationRequest) -> list[GenerationRequest]:
        """The engine requests for a job's ``n`` answers: with a seed, answer i samples with seed + i."""
        config = request.config
        if config.n == 1:
            return [request]
        seeds = [None if config.seed is None else (config.seed + i) % 2**63 for i in range(config.n)]
        return [replace(request, config=config.model_copy(update={"seed": seed})) for seed in seeds]

    async def events(self, requests: Sequence[GenerationRequest]) -> AsyncIterator[tuple[int, Delta | Completion]]:
        """The engine events of several requests as they come, each with its request's index. A
        failed request raises ``EngineError``; leaving early cancels every request still running.
        Each request's ``RequestRecord`` goes to ``watchers`` when it ends, and the job gets one
        log line (``log_job``)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Delta | Completion | Failed]] = asyncio.Queue()
        handles = []
        started = time.monotonic()
        first_text: dict[int, float] = {}  # seconds from submission, per request
        ended: dict[int, tuple[Completion | Failed, float]] = {}
        try:
            for index, request in enumerate(requests):
                sink = LoopSink(loop, lambda event, index=index: events.put_nowait((index, event)))
                handles.append(self.engine.submit(request, sink))
            while len(ended) < len(requests):
                index, event = await events.get()
                if isinstance(event, Delta):
                    if event.text:
                        first_text.setdefault(index, time.monotonic() - started)
                else:
                    ended[index] = event, time.monotonic() - started
                if isinstance(event, Failed):
                    raise EngineError(event.error)
                yield index, event
        finally:
            for handle in handles:
                handle.cancel()
            seconds = time.monotonic() - started
            log_job(requests, [ended.get(index, (None, seconds))[0] for index in range(len(requests))], seconds, self.adapters.merged)
            if self.watchers:
                self._report(requests, ended, first_text, seconds)

    def _report(
        self, requests: Sequence[GenerationRequest], ended: dict[int, tuple[Completion | Failed, float]],
        first_text: dict[int, float], seconds: float,
    ) -> None:
        for index, request in enumerate(requests):
            end, end_seconds = ended.get(index, (None, seconds))
            done = isinstance(end, Completion)
            record = RequestRecord(
                outcome="finished" if done else "failed" if end else "cancelled",
                finish_reason=end.finish_reason if done else None,
                prompt_tokens=len(request.prompt_ids),
                cached_tokens=end.cached_tokens if done else 0,
                completion_tokens=end.completion_tokens if done else 0,
                seconds=end_seconds,
                first_token_seconds=first_text.get(index),
            )
            for watcher in self.watchers:
                try:
                    watcher(record)
                except Exception:  # a watcher's bug must not cost the answer
                    log.exception("a request watcher failed")

    def load_adapter(self, name: str, source: str) -> str:
        """Serve one more adapter while running (``ALLOW_RUNTIME_ADAPTERS``); raises ``InputError`` or
        ``AdapterError`` naming what is wrong. Returns where it was found."""
        if not self.settings.allow_runtime_adapters:
            raise InputError("adapters are loaded at run time only with ALLOW_RUNTIME_ADAPTERS=1")
        return str(self.adapters.add(name, source, self.engine.model, self.loaded.tokenizer))

    def unload_adapter(self, name: str) -> None:
        if not self.settings.allow_runtime_adapters:
            raise InputError("adapters are unloaded at run time only with ALLOW_RUNTIME_ADAPTERS=1")
        self.adapters.remove(name)

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens included), for logprobs."""
        return self.loaded.tokenizer.decode([token_id])

    # ------------------------------------------------------------------ outputs
    def complete(self, raw: Any) -> dict[str, Any] | str:
        """Blocking: one native job input in, its folded output (or ``{"error": ...}``) out."""
        return blocking(lambda: collect(self.handle(raw)))

    async def handle(self, raw: Any, job_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """A native job's outputs: one result, or with ``stream`` the deltas, the last one carrying
        ``finish_reason``, ``usage``, ``model`` and ``adapter`` (see ``native.answers`` for ``n`` > 1 and
        logprobs). Errors come out as ``{"error": ...}``. ``job_id`` names the job in the logs."""
        try:
            job, request = self.prepare(raw, job_id)
        except (InputError, EngineError) as err:
            yield {"error": str(err)}
            return
        async for chunk in self.outputs(job, request):
            yield chunk

    async def outputs(self, job: JobInput | ListAdaptersInput, request: GenerationRequest | None) -> AsyncIterator[dict[str, Any]]:
        """A prepared job's outputs: the adapter listing, or the answers; a failure in the engine
        is the last output, ``{"error": ...}``."""
        if request is None:
            yield self.adapters.listing()
            return
        try:
            async for chunk in native.answers(self, job, request):
                yield chunk
        except EngineError as err:
            yield {"error": str(err)}


def check_fits(ids: list[int], config: GenerationConfig, settings: Settings, context_length: int, engine: Engine, tensor_parallel: bool) -> None:
    """Refuse, naming the field, a request this worker cannot run: a prompt or an answer too long
    for its context or KV cache, token ids outside the vocabulary, beam search under tensor parallel."""
    room = min(settings.max_input_tokens, context_length - config.max_new_tokens)
    if len(ids) > room:
        raise InputError(
            f"prompt_config: the prompt is {len(ids)} tokens; at most {room} fit "
            f"(MAX_INPUT_TOKENS={settings.max_input_tokens}, context {context_length} "
            f"minus max_new_tokens {config.max_new_tokens})"
        )
    capacity = engine.capacity_tokens
    if len(ids) + config.max_new_tokens > capacity:
        raise InputError(
            f"generation_config.max_new_tokens: the prompt ({len(ids)} tokens) plus max_new_tokens "
            f"({config.max_new_tokens}) is {len(ids) + config.max_new_tokens} tokens, more than the "
            f"{capacity} tokens this worker's KV cache holds (KV_CACHE_TOKENS, GPU_MEMORY_UTILIZATION)"
        )
    vocab = engine.vocab
    for name, tokens in (("logit_bias", [int(t) for t in config.logit_bias or {}]), ("stop_token_ids", config.stop_token_ids)):
        wrong = next((token for token in tokens if token >= vocab), None)
        if wrong is not None:
            raise InputError(f"generation_config.{name}: token id {wrong} is not in the vocabulary (0 to {vocab - 1})")
    if config.num_beams > 1 and tensor_parallel:
        raise InputError(
            f"generation_config.num_beams: beam search is not served with TENSOR_PARALLEL_SIZE={settings.tensor_parallel_size} "
            "(it runs transformers' generate, outside the engine's steps that every rank follows); use num_beams 1"
        )


def _close(parallel: TensorParallel | None) -> None:
    if parallel is not None:
        parallel.close()


def engine_config(settings: Settings, context_length: int) -> EngineConfig:
    """The engine's configuration from the worker's settings."""
    return EngineConfig(
        max_batch_size=settings.max_batch_size,
        max_prefill_tokens=settings.max_prefill_tokens,
        max_job_seconds=settings.max_job_seconds,
        max_seq_len=min(context_length, settings.max_input_tokens + settings.max_new_tokens_limit),
        kv_cache_tokens=settings.kv_cache_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        cuda_graphs=settings.cuda_graphs,
        prefix_caching=settings.enable_prefix_cache,
        attention_backend="gather" if settings.attention_backend == "auto" else settings.attention_backend,
        lora_backend="peft" if settings.lora_backend == "auto" else settings.lora_backend,
        decode_compile="off" if settings.decode_compile == "auto" else settings.decode_compile, compile_cache_dir=str(settings.model_cache_dir / "torch_compile"),
        overlap_steps=settings.overlap_steps == "on",
    )


def log_settings(settings: Settings) -> None:
    """Log the settings that differ from their defaults (one line), and warn about any that do nothing."""
    changed = settings.model_dump(exclude_defaults=True)
    shown = ", ".join(f"{name.upper()}={value}" for name, value in changed.items()) or "all defaults"
    log.info("Settings: %s", shown)
    for warning in settings.ineffective():
        log.warning("%s", warning)


def _context_length(loaded: LoadedModel) -> int:
    config = loaded.model.config
    return getattr(config, "max_position_embeddings", None) or loaded.tokenizer.model_max_length


def blocking(make: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine ``make()`` to its end from synchronous code. Inside a running event loop
    (a notebook cell) it runs on a helper thread with a loop of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


async def collect(chunks: AsyncIterator[dict[str, Any] | str]) -> dict[str, Any] | str:
    """Fold a job's outputs into one object: the result, or the joined stream with its ending (each
    choice's deltas and logprobs joined). An OpenAI stream's server-sent events are joined as text."""
    events, summary, answers = [], {}, {}
    async for chunk in chunks:
        if isinstance(chunk, str):
            events.append(chunk)
        elif "error" in chunk:
            return chunk
        elif "delta" not in chunk:
            summary.update(chunk)
        else:
            answer = answers.setdefault(chunk.get("index"), {"index": chunk.get("index"), "output": ""})
            answer["output"] += chunk["delta"]
            if "logprobs" in chunk:
                answer["logprobs"] = answer.get("logprobs", []) + chunk["logprobs"]
            answer.update({key: value for key, value in chunk.items() if key not in ("delta", "logprobs", "index")})
    if events:
        return "".join(events)
    if None in answers:  # n = 1: the answer is the result
        return {key: value for key, value in answers[None].items() if key != "index"} | summary
    if answers:
        return {"choices": [answers[index] for index in sorted(answers)], **summary}
    return summary
