"""Decoding steps captured as CUDA graphs: one per (adapter, rows bucket, context bucket).

The host copies a step's inputs into the graph's static buffers and replays it. Buckets pad rows
(to 1, 2, 4, 8, 16, 24, 32, 48, ...) and context blocks (to powers of two); padding rows write to
and read from the scratch block.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from llm_worker.engine.forward import StepInputs, with_carried
from llm_worker.engine.kv_cache import BLOCK_SIZE, SCRATCH_BLOCK


class StepRunner(Protocol):
    """What a captured step reads of ``runner.StepRunner`` (which imports this module)."""

    model: Any
    pool: Any
    static: Any
    staging: Any
    windows: Any
    step: Any
    use_graphs: bool
    graph_pool: Any


def bucket(value: int, sizes: list[int]) -> int:
    return next(size for size in sizes if size >= value)


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, ... up to ``max_rows``."""
    sizes, size = [1, 2, 4, 8], 16
    while size < max_rows:
        sizes += [size, size * 3 // 2]
        size *= 2
    return sorted({s for s in sizes if s < max_rows} | {max_rows})


def block_buckets(max_blocks: int, first: int = 1, factor: int = 2) -> list[int]:
    """Context buckets in blocks: ``first``, times ``factor`` each, up to ``max_blocks``."""
    sizes, size = [], first
    while size < max_blocks:
        sizes.append(size)
        size *= factor
    return sizes + [max_blocks]


class Staging:
    """Pinned host buffers that carry a captured step's inputs to the device, used in turn. With
    overlapping steps the host lays out the next step while the device may not yet have copied the
    last one's inputs (it is still busy with the step before), and one step may replay two graphs:
    a buffer is written again only once the copy that read it has run (its event)."""

    SLOTS = 4

    def __init__(self, size: int, device: torch.device) -> None:
        self.device = device
        cuda = device.type == "cuda"
        self.buffers = [torch.zeros(size, dtype=torch.long, pin_memory=cuda) for _ in range(self.SLOTS if cuda else 1)]
        self.copied: list[torch.cuda.Event | None] = [None] * len(self.buffers)
        self.turn = 0

    def send(self, rows: list[list[int]]) -> torch.Tensor:
        """``rows`` (equally long) on the device, on their way (the copy is queued, not waited for)."""
        turn, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()
        values = torch.from_numpy(np.array(rows, dtype=np.int64))  # numpy reads nested ints 2x faster than torch.tensor
        host = self.buffers[turn][: values.numel()].view(values.shape)
        host.copy_(values)
        if self.device.type != "cuda":
            return host
        staged = host.to(self.device, non_blocking=True)
        self.copied[turn] = torch.cuda.Event()
        self.copied[turn].record()
        return staged


class CapturedStep:
    """A decoding step of fixed shape recorded as a CUDA graph, with its static inputs. Without
    CUDA (``StepRunner(static_shapes=True)`` on the CPU, for tests) the same static buffers and
    padding run eagerly at each replay."""

    def __init__(self, runner: StepRunner, rows: int, blocks: int, context, kwargs: dict, step=None) -> None:
        self.rows, self.blocks = rows, blocks
        buffers = runner.static
        self.input_ids = buffers["input_ids"][:rows]
        self.positions = buffers["positions"][:rows]
        self.write_index = buffers["write_index"][:rows]
        self.block_table = buffers["block_table"][:rows, :blocks]
        self.staging = runner.staging
        for tensor in (self.input_ids, self.positions, self.write_index, self.block_table):
            tensor.zero_()  # padding: every write and read goes to the scratch block
        args = (runner.model, runner.pool, self.input_ids, self.positions, self.write_index, self.block_table)
        kwargs = {**kwargs, "windows": runner.windows}
        self.graph = None
        step = step or runner.step  # forward_step, or compiled (DECODE_COMPILE)
        if not runner.use_graphs:
            self._eager = lambda: step(*args, **kwargs)
            self._context = context
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with context(), torch.cuda.stream(stream):
            step(*args, **kwargs)  # one warm-up outside the graph, as capture requires (lazy inits, compilation)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the engine thread may capture while idle, and other threads' CUDA calls must not break it
        with context(), torch.cuda.graph(self.graph, pool=runner.graph_pool, capture_error_mode="thread_local"):
            self.logits = step(*args, **kwargs)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        count = len(inputs.input_ids)
        rows = [
            [ids[0], pos[0], write, *table]
            for ids, pos, write, table in zip(inputs.input_ids, inputs.positions, inputs.write_index, inputs.block_table)
        ]
        staged = self.staging.send(rows)
        self.input_ids[:count, 0] = with_carried(staged[:, 0], inputs.carry)
        self.positions[:count, 0] = staged[:, 1]
        self.write_index[:count] = staged[:, 2]
        self.block_table[:count] = staged[:, 3:]
        if count < self.rows:  # rows left from a bigger batch: back to scratch
            self.input_ids[count:] = 0
            self.positions[count:] = 0
            self.write_index[count:] = SCRATCH_BLOCK * BLOCK_SIZE
            self.block_table[count:] = SCRATCH_BLOCK
        if self.graph is None:
            with self._context():
                return self._eager()[:count]
        self.graph.replay()
        return self.logits[:count]
