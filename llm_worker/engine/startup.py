"""The engine's start, each part timed for the start log: the memory a worst-case step needs (on
a GPU), the KV pool sized from what is left, the step runner's probe step, the CUDA graphs of
the first answers; and the planned graphs captured later, while the engine is idle."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from llm_worker.engine.attention import check_model
from llm_worker.engine.device import Device
from llm_worker.engine.kv_cache import BLOCK_SIZE, KVPool, KVShape, blocks_for, kv_budget_blocks
from llm_worker.engine.memory import activation_dtype, profile_peak
from llm_worker.engine.ranks import Ranks
from llm_worker.engine.requests import EngineConfig
from llm_worker.engine.runner import StepRunner

log = logging.getLogger("llm_worker.engine.loop")  # the engine's start is told under the engine's name


class StartClock:
    """How long each part of the engine's start took, for the start log."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.parts: list[str] = []

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.parts.append(f"{part} {now - self.last:.2f} s")
        self.last = now

    def __str__(self) -> str:
        return f"{self.last - self.started:.2f} s ({', '.join(self.parts)})"



def start_runner(
    model, config: EngineConfig, device: torch.device, dtype: torch.dtype | None, target: Device, ranks: Ranks | None = None
) -> StepRunner:
    """The step runner over a KV pool sized for this device, its first graphs captured; ``target``
    may fix its shapes and what its captured steps run (a simulated GPU). Under tensor parallel
    (``ranks``) every rank runs this, in step: the pool holds the rank's KV heads, with as many
    blocks as the fullest device has room for, and rank 0's runner tells the others each step."""
    check_model(model)
    shape = KVShape.of(model, dtype or activation_dtype(model))
    if ranks is not None:
        shape = replace(shape, kv_heads=ranks.kv_heads)
    max_blocks = blocks_for(config.max_seq_len)
    reserved = 0
    clock = StartClock()
    if device.type == "cuda":
        rows, width = config.max_batch_size, config.max_prefill_tokens
        kernel = config.attention_backend == "triton"
        vocab = model.get_output_embeddings().weight.shape[0]
        reserved = profile_peak(model, shape, device, rows, width, max_blocks, vocab, kernel)
        clock.lap("memory profile")
    blocks = kv_budget_blocks(
        shape, device, kv_cache_tokens=config.kv_cache_tokens,
        gpu_memory_utilization=config.gpu_memory_utilization, reserved_bytes=reserved,
    )
    if ranks is not None:
        blocks = ranks.agree_min(blocks)
    pool = KVPool(shape, blocks, device)
    clock.lap("KV pool")
    runner = StepRunner(
        model, pool, device, config.max_batch_size, max_blocks, config.cuda_graphs,
        config.static_shapes if target.static_shapes is None else target.static_shapes,
        attention_kernel=config.attention_backend == "triton", lora_kernel=config.lora_backend == "triton",
        compile_backend=None if config.decode_compile == "off" else config.decode_compile, compile_cache=config.compile_cache_dir,
        graph_step=target.graph_step, leader=ranks if ranks is not None and ranks.leader else None,
    )
    clock.lap("probe step")
    runner.capture_at_start()
    if runner.static_shapes:
        clock.lap("first graphs")
    log.info("Engine ready in %s", clock)
    log.info(
        "KV cache: %d tokens (%.2f GiB, %d blocks of %d), %d full-length sequences of %d tokens; batch up to %d; "
        "prefix caching %s",
        pool.capacity_tokens, pool.nbytes / 2**30, blocks - 1, BLOCK_SIZE,
        pool.capacity_tokens // config.max_seq_len, config.max_seq_len, config.max_batch_size,
        "on" if config.prefix_caching else "off (ENABLE_PREFIX_CACHE=0)",
    )
    return runner


def capture_when_idle(runner: StepRunner) -> None:
    """One planned graph, on the engine thread when it has nothing to run; a failure is logged and
    ends the plan (the graphs left are captured when first used), never the engine."""
    try:
        runner.capture_pending()
    except Exception:
        log.exception("capturing a CUDA graph while idle failed")
        runner.pending.clear()
