"""What goes into the engine and what comes out of it, as plain dataclasses: a request, the
events its caller receives (deltas, then a completion or a failure), the engine's settings and a
snapshot of its load."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

from llm_worker.engine.constraints import Grammar
from llm_worker.engine.thinking import ThinkingBudget
from llm_worker.schema import GenerationConfig

__all__ = [
    "Completion",
    "Delta",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "Event",
    "Failed",
    "GenerationRequest",
    "LoopSink",
    "RequestHandle",
    "Sink",
    "TokenLogprob",
]


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    config: GenerationConfig
    stop: tuple[str, ...] = ()
    adapter: str | None = None
    adapter_revision: str = ""  # the adapter's name and revision (default: its name): prompt blocks are shared only within it
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely alternatives
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's (but the first) logprob and k alternatives
    grammar: Grammar | None = None  # the answer must follow it (a compiled json_schema, regex or choice)
    strip: bool = True  # answer without leading and trailing whitespace; False: exactly as generated
    job_id: str | None = None  # the job it answers, as the door names it (RunPod's job id): for the logs
    thinking: ThinkingBudget | None = None  # its thinking is bounded: the engine closes it when the tokens are spent


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
    prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's tokens after the first, as the model scores them
    stop: str | None = None  # finish_reason stop: the stop string that ended the answer (None: a stop token)


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens decoded since the previous delta
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # once, before any text, when the request asks for them


@dataclass(frozen=True)
class Failed:
    error: str


Event = Delta | Completion | Failed
Sink = Callable[[Event], None]


@dataclass(frozen=True)
class LoopSink:
    """A caller on an asyncio event loop, a ``Sink`` the engine batches: the events of one step for
    every such caller of a loop are handed over in one call, so the loop is woken once a step,
    not once a token (``Lifecycle.flush``). Called directly, it hands one event over."""

    loop: asyncio.AbstractEventLoop
    put: Callable[[Event], None]  # runs on the loop

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.put, event)


class EngineError(RuntimeError):
    """A request could not be served by the engine."""


class RequestHandle:
    """The caller's side of a submitted request: lets it cancel."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step
    max_job_seconds: float = 0.0
    max_seq_len: int = 4096  # longest prompt + max_new_tokens a request may have
    kv_cache_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    cuda_graphs: bool = True
    static_shapes: bool | None = None  # decoding steps in CUDA graphs' fixed shapes (default: with graphs); True on the CPU in tests
    prefix_caching: bool = True  # share the KV of prompt blocks already computed
    attention_backend: str = "gather"  # gather: the pool's blocks copied out for the model's own kernel; triton: paged kernel
    lora_backend: str = "peft"  # rows of mixed adapters: peft (its loop over adapters), triton (one batched product)
    decode_compile: str = "off"  # off, or the torch.compile backend of the decoding steps (inductor; aot_eager in tests)
    compile_cache_dir: str | None = None  # where compiled code is kept between starts (inductor's and Triton's caches)
    overlap_steps: bool = False  # launch each step before the previous one's tokens are read back


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for metrics."""

    running: int  # holding KV: decoding, or their prompt being prefilled
    waiting: int  # submitted, not yet admitted
    kv_blocks_used: int  # referenced by a request
    kv_blocks_total: int
    kv_blocks_cached: int  # holding a cached prefix nobody uses now (free room too)
