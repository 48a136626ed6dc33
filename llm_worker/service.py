"""The worker: turns job inputs into engine requests and engine events into job outputs.

The handler, notebooks, benchmarks and tests all go through ``Worker``; it is the one place where
input is validated, prompts are built and outputs are shaped.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from llm_worker.adapters import AdapterError, AdapterManager
from llm_worker.engine import Completion, Delta, Engine, EngineConfig, EngineError, Failed, GenerationRequest
from llm_worker.loading import LoadedModel, load_model
from llm_worker.prompts import render_prompt
from llm_worker.loading import adapter_name
from llm_worker.schema import InputError, JobInput, Limits, ListAdaptersInput, parse_job_input
from llm_worker.settings import Settings, SettingsError
from model_cache import ModelSourceError

log = logging.getLogger(__name__)


class Worker:
    """Owns the loaded model and its engine. Build one per process with ``Worker.start()``."""

    def __init__(
        self,
        settings: Settings,
        loaded: LoadedModel | None,
        adapters: AdapterManager | None = None,
        load_error: str | None = None,
    ) -> None:
        self.settings = settings
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
        if loaded is not None:
            self.context_length = _context_length(loaded)
            try:
                self.engine = self._start_engine(loaded)
            except Exception as err:
                log.exception("the engine failed to start")
                self.load_error = f"the engine failed to start: {type(err).__name__}: {err}"

    def _start_engine(self, loaded: LoadedModel) -> Engine:
        settings = self.settings
        config = EngineConfig(
            max_batch_size=settings.max_batch_size,
            max_prefill_tokens=settings.max_prefill_tokens,
            max_job_seconds=settings.max_job_seconds,
            max_seq_len=min(self.context_length, settings.max_input_tokens + settings.max_new_tokens_limit),
            kv_cache_tokens=settings.kv_cache_tokens,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            cuda_graphs=settings.cuda_graphs,
        )
        return Engine(loaded.model, loaded.tokenizer, config, dtype=loaded.dtype, adapters=self.adapters)

    @classmethod
    def start(cls, settings: Settings | None = None) -> Worker:
        """Read the settings and load the model. If a setting is invalid or the model fails to load,
        return a worker that answers every job with the reason (on RunPod, a worker that exits at
        start is restarted in a loop and tells callers nothing)."""
        try:
            settings = settings or Settings()
        except SettingsError as err:
            for problem in err.problems:
                log.error("Invalid setting: %s", problem)
            return cls(Settings.model_construct(), None, load_error=f"invalid configuration: {err}")
        log_settings(settings)
        try:
            loaded = load_model(settings)
            default = adapter_name(settings.lora_weights) if settings.lora_weights else None
            adapters = AdapterManager(settings, default=None if loaded.merged_adapter else default, merged=loaded.merged_adapter)
            if adapters.default:
                loaded.model = adapters.activate(loaded.model, adapters.default, in_use=set())
        except (ModelSourceError, AdapterError) as err:  # explained in its message: no traceback needed
            log.error("The model failed to load: %s", err)
            return cls(settings, None, load_error=f"the model failed to load: {err}")
        except Exception as err:
            log.exception("The model failed to load")
            return cls(settings, None, load_error=f"the model failed to load: {type(err).__name__}: {err}")
        log.info("Loaded %s in %.1f s", loaded.name, loaded.load_seconds)
        return cls(settings, loaded, adapters)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------------ requests
    def build_request(self, job: JobInput) -> GenerationRequest:
        prompt = render_prompt(
            self.loaded.tokenizer, job.prompt_config.template, job.prompt_config.instruction, job.prompt_config.input
        )
        ids = self.loaded.tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        config = job.generation_config
        room = min(self.settings.max_input_tokens, self.context_length - config.max_new_tokens)
        if len(ids) > room:
            raise InputError(
                f"prompt_config: the prompt is {len(ids)} tokens; at most {room} fit "
                f"(MAX_INPUT_TOKENS={self.settings.max_input_tokens}, context {self.context_length} "
                f"minus max_new_tokens {config.max_new_tokens})"
            )
        capacity = self.engine.capacity_tokens
        if len(ids) + config.max_new_tokens > capacity:
            raise InputError(
                f"generation_config.max_new_tokens: the prompt ({len(ids)} tokens) plus max_new_tokens "
                f"({config.max_new_tokens}) is {len(ids) + config.max_new_tokens} tokens, more than the "
                f"{capacity} tokens this worker's KV cache holds (KV_CACHE_TOKENS, GPU_MEMORY_UTILIZATION)"
            )
        stop = tuple(config.stop) + ((prompt.response_split,) if prompt.response_split else ())
        adapter = self.adapters.choose(job.adapter)
        if adapter == self.adapters.merged:
            adapter = None  # already in the weights
        return GenerationRequest(prompt_ids=ids, config=config, stop=stop, adapter=adapter)

    def prepare(self, raw: Any) -> tuple[JobInput | ListAdaptersInput, GenerationRequest | None]:
        """Validate a job input; a generation job also gets its engine request."""
        if self.load_error:
            raise EngineError(self.load_error)
        job = parse_job_input(raw, self.limits)
        if isinstance(job, ListAdaptersInput):
            return job, None
        return job, self.build_request(job)

    # ------------------------------------------------------------------ outputs
    def result(self, completion: Completion, adapter: str | None) -> dict[str, Any]:
        """The job's output; ``adapter`` is the one that answered (the merged one, if any)."""
        return {
            "output": completion.text,
            "finish_reason": completion.finish_reason,
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
            "model": self.loaded.name,
            "adapter": adapter or self.adapters.merged,
        }

    def complete(self, raw: Any) -> dict[str, Any]:
        """Blocking: one job input in, one output (or ``{"error": ...}``) out."""
        try:
            job, request = self.prepare(raw)
            if request is None:
                return self.adapters.listing()
            return self.result(self.engine.generate(request), request.adapter)
        except (InputError, EngineError) as err:
            return {"error": str(err)}

    async def handle(self, raw: Any) -> AsyncIterator[dict[str, Any]]:
        """The job's outputs: one result, or with ``stream`` the deltas, the last one carrying
        ``finish_reason``, ``usage``, ``model`` and ``adapter``. Errors come out as ``{"error": ...}``."""
        try:
            job, request = self.prepare(raw)
        except (InputError, EngineError) as err:
            yield {"error": str(err)}
            return
        if request is None:
            yield self.adapters.listing()
            return
        pending = ""  # the newest delta waits, so that the last chunk carries text and ending
        try:
            async for event in self.engine.stream(request):
                if isinstance(event, Failed):
                    yield {"error": event.error}
                elif isinstance(event, Delta):
                    if job.stream:
                        if pending:
                            yield {"delta": pending}
                        pending = event.text
                elif job.stream:
                    final = self.result(event, request.adapter)
                    del final["output"]
                    yield {"delta": pending, **final}
                else:
                    yield self.result(event, request.adapter)
        except EngineError as err:
            yield {"error": str(err)}


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


async def collect(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """Fold a job's outputs into one object: the result, or the joined stream with its ending."""
    text, last = [], {}
    async for chunk in chunks:
        if "error" in chunk:
            return chunk
        text.append(chunk.get("delta", ""))
        last = chunk
    if "delta" not in last:
        return last
    folded = {key: value for key, value in last.items() if key != "delta"}
    return {"output": "".join(text), **folded}

