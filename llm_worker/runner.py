"""The step runner: one forward pass over fixed-shape inputs, eager or as a replayed CUDA graph.

``forward_step`` is the whole device side of a step, a pure function of tensors (gpt-fast's
``decode_one_token``): positions, the pool slots to write and the block tables come in as
tensors the host filled; the causal mask and the gather indices are computed on the device; the
logits of each row's last column come out. Nothing in it reads a tensor back to the host, so it
compiles with ``torch.compile(fullgraph=True)`` and captures as a CUDA graph.

On CUDA, decoding steps run as CUDA graphs, one per (adapter, rows bucket, context bucket): the
host copies its inputs into the graph's static buffers and replays it. Buckets pad rows (to
1, 2, 4, 8, 16, 24, 32, 48, ...) and context blocks (to powers of two); padding rows write to and
read from the scratch block. A graph is captured the first time its bucket is used (the smallest
contexts at start), logged with its capture time. Prefill chunks and steps that mix adapters run
eagerly. On the CPU every step runs eagerly, unpadded.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from llm_worker.kv_cache import BLOCK_SIZE, SCRATCH_BLOCK, KVPool, PoolView

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
GRAPH_CONTEXT_BLOCKS_AT_START = 16  # graphs for contexts up to 256 tokens are captured at start


def forward_step(
    model: torch.nn.Module,
    pool: KVPool,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    write_index: torch.Tensor,
    block_table: torch.Tensor,
    **model_kwargs,
) -> torch.Tensor:
    """One forward pass. ``input_ids``/``positions``: [rows, width] (left padding at position 0);
    ``write_index``: [rows * width] flat pool positions for the new keys/values; ``block_table``:
    [rows, blocks]. Returns the logits of each row's last column, [rows, vocab]."""
    rows = input_ids.shape[0]
    offsets = torch.arange(BLOCK_SIZE, device=block_table.device)
    read_index = (block_table[:, :, None] * BLOCK_SIZE + offsets).reshape(-1)
    keys = torch.arange(block_table.shape[1] * BLOCK_SIZE, device=positions.device)
    mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [rows, 1, width, context]
    output = model(
        input_ids=input_ids,
        position_ids=positions,
        attention_mask=mask,
        cache=PoolView(pool, write_index, read_index, rows),
        use_cache=True,
        logits_to_keep=1,
        **model_kwargs,
    )
    return output.logits[:, -1, :]


@dataclass
class StepInputs:
    """One forward pass as the host lays it out (lists of Python ints)."""

    input_ids: list[list[int]]
    positions: list[list[int]]
    write_index: list[int]
    block_table: list[list[int]]


AdapterState = tuple[Callable[[], contextlib.AbstractContextManager], dict, str | None]


def adapter_state(model, names: list[str | None]) -> AdapterState:
    """How to run rows that use these adapters (None: the base model): a context to run in (a
    factory: capture enters it twice), the forward's extra arguments, and a key naming the state
    for graph capture (None: mixed, run eagerly). One shared adapter becomes PEFT's active
    adapter; a mix uses PEFT's per-row ``adapter_names``."""
    if not hasattr(model, "peft_config"):
        return contextlib.nullcontext, {}, BASE_ADAPTER
    distinct = set(names)
    if distinct == {None}:
        return model.disable_adapter, {}, BASE_ADAPTER
    if len(distinct) == 1:
        (name,) = distinct
        if model.active_adapter != name:
            model.set_adapter(name)
        return contextlib.nullcontext, {}, name
    return contextlib.nullcontext, {"adapter_names": [n or BASE_ADAPTER for n in names]}, None


def bucket(value: int, sizes: list[int]) -> int:
    return next(size for size in sizes if size >= value)


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, ... up to ``max_rows``."""
    sizes, size = [1, 2, 4, 8], 16
    while size < max_rows:
        sizes += [size, size * 3 // 2]
        size *= 2
    return sorted({s for s in sizes if s < max_rows} | {max_rows})


def block_buckets(max_blocks: int) -> list[int]:
    sizes, size = [], 1
    while size < max_blocks:
        sizes.append(size)
        size *= 2
    return sizes + [max_blocks]


class CapturedStep:
    """A decoding step of fixed shape recorded as a CUDA graph, with its static inputs. Without
    CUDA (``StepRunner(static_shapes=True)`` on the CPU, for tests) the same static buffers and
    padding run eagerly at each replay."""

    def __init__(self, runner: StepRunner, rows: int, blocks: int, context, kwargs: dict) -> None:
        self.rows, self.blocks = rows, blocks
        buffers = runner.static
        self.input_ids = buffers["input_ids"][:rows]
        self.positions = buffers["positions"][:rows]
        self.write_index = buffers["write_index"][:rows]
        self.block_table = buffers["block_table"][:rows, :blocks]
        self.pinned = runner.pinned
        for tensor in (self.input_ids, self.positions, self.write_index, self.block_table):
            tensor.zero_()  # padding: every write and read goes to the scratch block
        args = (runner.model, runner.pool, self.input_ids, self.positions, self.write_index, self.block_table)
        self.graph = None
        if not runner.use_graphs:
            self._eager = lambda: forward_step(*args, **kwargs)
            self._context = context
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with context(), torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph, as CUDA graph capture requires
                forward_step(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with context(), torch.cuda.graph(self.graph, pool=runner.graph_pool):
            self.logits = forward_step(*args, **kwargs)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        count = len(inputs.input_ids)
        rows = [
            [ids[0], pos[0], write, *table]
            for ids, pos, write, table in zip(inputs.input_ids, inputs.positions, inputs.write_index, inputs.block_table)
        ]
        host = self.pinned[: count * (3 + self.blocks)].view(count, 3 + self.blocks)
        host.copy_(torch.tensor(rows, dtype=torch.long))  # the previous step's copy ended: its tokens were read
        staged = host.to(self.input_ids.device, non_blocking=True)
        self.input_ids[:count, 0] = staged[:, 0]
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


class StepRunner:
    """Owns the KV pool and the device-side buffers; runs forward passes."""

    def __init__(
        self,
        model,
        pool: KVPool,
        device: torch.device,
        max_rows: int,
        max_blocks: int,
        cuda_graphs: bool,
        static_shapes: bool | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.max_blocks = max_blocks
        self.use_graphs = cuda_graphs and device.type == "cuda"
        self.static_shapes = self.use_graphs if static_shapes is None else static_shapes
        self.rows_sizes = row_buckets(max_rows)
        self.block_sizes = block_buckets(max_blocks)
        self.graphs: dict[tuple, CapturedStep | None] = {}  # None: capture failed, run eagerly
        self.capture_seconds = 0.0
        if self.use_graphs:
            self.graph_pool = torch.cuda.graph_pool_handle()
        if self.static_shapes:
            long = dict(dtype=torch.long, device=device)
            self.static = {
                "input_ids": torch.zeros((max_rows, 1), **long),
                "positions": torch.zeros((max_rows, 1), **long),
                "write_index": torch.zeros(max_rows, **long),
                "block_table": torch.zeros((max_rows, max_blocks), **long),
            }
            self.pinned = torch.zeros(max_rows * (3 + max_blocks), dtype=torch.long)
            if device.type == "cuda":
                self.pinned = self.pinned.pin_memory()

    def set_model(self, model) -> None:
        """The model object changed (an adapter was loaded or unloaded): captured graphs may read
        weights that are gone, so they are dropped and captured again when used."""
        self.model = model
        self.graphs.clear()

    def capture_at_start(self) -> None:
        """Capture the base model's decoding graphs for every batch size and short contexts."""
        if not self.use_graphs:
            return
        started = time.perf_counter()
        context, kwargs, key = adapter_state(self.model, [None])
        with torch.inference_mode():
            for blocks in [b for b in self.block_sizes if b <= GRAPH_CONTEXT_BLOCKS_AT_START]:
                for rows in reversed(self.rows_sizes):  # largest first, so smaller ones reuse its memory
                    self._graph(key, rows, blocks, context, kwargs)
        log.info("Captured %d CUDA graphs in %.1f s", len(self.graphs), time.perf_counter() - started)

    def _graph(self, key, rows: int, blocks: int, context, kwargs) -> CapturedStep | None:
        index = (key, rows, blocks)
        if index not in self.graphs:
            started = time.perf_counter()
            try:
                self.graphs[index] = CapturedStep(self, rows, blocks, context, kwargs)
            except Exception as err:  # e.g. a quantized layer that synchronises: run this shape eagerly
                log.warning("CUDA graph capture failed for %s rows=%d blocks=%d (%s: %s); running it eagerly",
                            key, rows, blocks, type(err).__name__, err)
                self.graphs[index] = None
            self.capture_seconds += time.perf_counter() - started
            log.debug("captured graph %s in %.2f s", index, time.perf_counter() - started)
        return self.graphs[index]

    def run(self, inputs: StepInputs, adapters: list[str | None]) -> torch.Tensor:
        """Logits [rows, vocab] of each row's last column."""
        context, kwargs, key = adapter_state(self.model, adapters)
        width = len(inputs.input_ids[0])
        if self.static_shapes and key is not None and width == 1:
            rows = bucket(len(inputs.input_ids), self.rows_sizes)
            blocks = bucket(len(inputs.block_table[0]), self.block_sizes)
            graph = self._graph(key, rows, blocks, context, kwargs)
            if graph is not None:
                return graph.run(replace(inputs, block_table=pad_tables(inputs.block_table, blocks)))
        tensors = [
            torch.tensor(value, dtype=torch.long).to(self.device, non_blocking=True)
            for value in (inputs.input_ids, inputs.positions, inputs.write_index, inputs.block_table)
        ]
        with context():
            return forward_step(self.model, self.pool, *tensors, **kwargs)


def pad_tables(tables: list[list[int]], width: int | None = None) -> list[list[int]]:
    """Block tables padded with the scratch block to ``width`` (default: the longest)."""
    width = width or max(len(table) for table in tables)
    return [table + [SCRATCH_BLOCK] * (width - len(table)) for table in tables]
