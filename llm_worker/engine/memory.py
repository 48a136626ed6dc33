"""Memory around the KV pool: how much a worst-case step needs on a GPU before the pool is
sized (vLLM's profile run), and giving a burst's buffers back on an idle CPU worker; and the
heap taken out of the garbage collector's scans once a worker has started."""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import gc
import logging
import sys

import torch

from llm_worker.engine.kv_cache import BLOCK_SIZE, KVPool, KVShape, blocks_for
from llm_worker.engine.masks import LayerWindows
from llm_worker.engine.runner import forward_step

log = logging.getLogger(__name__)


def profile_peak(
    model, shape: KVShape, device: torch.device, rows: int, width: int, max_blocks: int, vocab: int, attention_kernel: bool
) -> int:
    """Bytes the worst steps (the widest decoding read, the largest prefill chunk) need besides
    the pool, measured on a two-block pool before the real one is sized, with the attention path
    the engine will use (the paged kernel gathers nothing)."""
    probe = KVPool(shape, 2, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)

    def zeros(*size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=torch.long, device=device)

    windows = LayerWindows(max_blocks * BLOCK_SIZE, kernel=attention_kernel)
    with torch.inference_mode():
        forward_step(model, probe, zeros(rows, 1), zeros(rows, 1), zeros(rows), zeros(rows, max_blocks), windows=windows)
        forward_step(model, probe, zeros(1, width), zeros(1, width), zeros(width), zeros(1, blocks_for(width)), windows=windows)
    peak = torch.cuda.max_memory_allocated(device) - before
    del probe
    torch.cuda.empty_cache()  # else the cached activations count as used, and again as reserved
    sampling = rows * vocab * 48  # sort, probabilities, noise, order: a few [rows, vocab] tensors
    log.info("Profiled a worst-case step: %.2f GiB of activations", peak / 2**30)
    return int(peak * 1.2) + sampling


def return_freed_memory(device: torch.device) -> None:
    """An idle CPU worker gives a burst's temporary buffers back: glibc keeps freed heap pages for
    reuse (measured: 0.76 GB before a 200-job burst, 2.06 GB after, without this). A GPU keeps
    its cached blocks: they are inside the memory budget and the next burst reuses them."""
    if device.type == "cpu" and sys.platform.startswith("linux") and (libc := ctypes.util.find_library("c")):
        ctypes.CDLL(libc).malloc_trim(0)


def activation_dtype(model) -> torch.dtype:
    """The dtype most of the model's floating-point weights have: the keys' and values' dtype."""
    floats = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def freeze_heap() -> None:
    """Take what is alive once a worker has started (the model's modules, the tokenizer, the
    libraries' objects: most of the heap) out of the cyclic garbage collector's scans
    (``gc.freeze``, as vLLM does after its start). A full collection otherwise walks all of it
    while holding the GIL: about 225 ms here, a stall of every stream, once every few seconds
    under load (``benchmarks.simulated_gpu`` found it). Frozen objects are still freed when
    nothing refers to them; only cycles among them wait for ``gc.unfreeze``, at exit at the latest
    (else native extensions report them as leaked). So it is for a process that serves one worker
    until it exits (handler.py, the HTTP server, a benchmark), once that worker has started: a
    process that starts and closes many (the tests) would keep each one's cycles, a gigabyte or more."""
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)
