"""The step runner: one forward pass over fixed-shape inputs, eager or as a replayed CUDA graph.

``forward_step`` is the whole device side of a step, a pure function of tensors (gpt-fast's
``decode_one_token``): positions, the pool slots to write and the block tables come in as
tensors the host filled; the model's own masks are evaluated at those positions on the device
(``attention.py``); the logits of each row's last column come out. Nothing in it reads a tensor
back to the host, so it captures as a CUDA graph (the layers' sliding windows, which set how
many blocks a read copies, are learned once, at the probe step of ``StepRunner``).

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

from llm_worker.attention import (
    LayerWindows,
    PoolView,
    UnsupportedModel,
    attention_path,
    base_model_of,
    check_probe,
    use_pool_attention,
)
from llm_worker.kv_cache import BLOCK_SIZE, SCRATCH_BLOCK, KVPool, Segment, blocks_for
from llm_worker.loading import weight_bytes

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
GRAPH_CONTEXT_BLOCKS_AT_START = 16  # graphs for contexts up to 256 tokens are captured at start
# What one more segment of rows costs in a forward (per layer: a copy and an attention call more),
# counted in blocks of context copied for one row; measured on the CPU, ~45 us against ~3 us.
SEGMENT_COST_BLOCKS = 16


def forward_step(
    model: torch.nn.Module,
    pool: KVPool,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    write_index: torch.Tensor,
    block_table: torch.Tensor,
    segments: tuple[Segment, ...] | None = None,
    windows: LayerWindows | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """One forward pass. ``input_ids``/``positions``: [rows, width] (left padding at position 0);
    ``write_index``: [rows * width] flat pool positions for the new keys/values; ``block_table``:
    [rows, blocks]; ``segments`` (host ints): rows that read fewer blocks than the table's width;
    ``windows``: the layers' sliding windows, learned once. No mask goes in: the model builds its
    own mask rules and the pool's attention evaluates them at these positions. Returns the
    logits of each row's last column, [rows, vocab]."""
    return run_view(model, input_ids, PoolView(pool, write_index, block_table, positions, segments, windows), **model_kwargs)


def run_view(model: torch.nn.Module, input_ids: torch.Tensor, view: PoolView, **model_kwargs) -> torch.Tensor:
    use_pool_attention(model)
    output = model(
        input_ids=input_ids,
        position_ids=view.positions,
        cache=view,
        use_cache=True,
        logits_to_keep=1,
        **model_kwargs,
    )
    return output.logits[:, -1, :]


@dataclass
class StepInputs:
    """One forward pass as the host lays it out (lists of Python ints). Block tables may be of
    different lengths; a row reads the blocks its positions need."""

    input_ids: list[list[int]]
    positions: list[list[int]]
    write_index: list[int]
    block_table: list[list[int]]

    @property
    def context_lengths(self) -> list[int]:
        return [max(positions) + 1 for positions in self.positions]

    def take(self, rows: list[int]) -> StepInputs:
        """These rows, in this order, each row's table cut to the blocks it reads."""
        width = len(self.input_ids[0])
        lengths = self.context_lengths
        return StepInputs(
            [self.input_ids[i] for i in rows],
            [self.positions[i] for i in rows],
            [index for i in rows for index in self.write_index[i * width : (i + 1) * width]],
            [self.block_table[i][: blocks_for(lengths[i])] for i in rows],
        )


AdapterState = tuple[Callable[[], contextlib.AbstractContextManager], dict, str | None]


def adapter_state(model, names: list[str | None]) -> AdapterState:
    """How to run rows that use these adapters (None: the base model): a context to run in (a
    factory: capture enters it twice), the forward's extra arguments, and a key naming the state
    for graph capture (None: mixed, run eagerly). One shared adapter becomes PEFT's active
    adapter; a mix uses PEFT's per-row ``adapter_names`` (only where ``adapter_groups`` allows)."""
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


def adapter_groups(model, names: list[str | None]) -> list[list[int]]:
    """Rows that run as one forward: all of them, unless they use several adapters and PEFT
    cannot mix the loaded ones per row; then one forward per adapter, so that no answer depends
    on what shares its step."""
    if len(set(names)) == 1 or all(mixable(config) for config in getattr(model, "peft_config", {}).values()):
        return [list(range(len(names)))]
    groups: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    return list(groups.values())


def mixable(config) -> bool:
    """Whether PEFT's per-row ``adapter_names`` serves this adapter exactly: plain LoRA only.
    PEFT refuses DoRA there, and a loaded adapter with ``modules_to_save`` (or trainable tokens)
    breaks every mixed forward, even one it is not part of."""
    return not (
        getattr(config, "use_dora", False)
        or getattr(config, "modules_to_save", None)
        or getattr(config, "trainable_token_indices", None)
        or getattr(config, "target_parameters", None)
        or getattr(config, "lora_bias", False)
    )


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
        kwargs = {**kwargs, "windows": runner.windows}
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
        use_pool_attention(model)
        self.model = model
        self.pool = pool
        self.device = device
        self.weight_bytes = weight_bytes(model)
        self.max_blocks = max_blocks
        self.windows = LayerWindows(max_blocks * BLOCK_SIZE)
        self._probe()
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

    def _probe(self) -> None:
        """One step of one token on the scratch block: every layer must read through the pool
        (else the model is refused), and each layer's sliding window is learned. Logs the path."""
        zero = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        view = PoolView(self.pool, zero[0] + SCRATCH_BLOCK * BLOCK_SIZE, zero + SCRATCH_BLOCK, zero, windows=self.windows)
        try:
            with torch.inference_mode():
                run_view(self.model, zero, view)
        except UnsupportedModel:
            raise
        except Exception as err:  # the model's forward does not take the pool as its cache
            raise UnsupportedModel(
                f"{type(base_model_of(self.model)).__name__}: a probe step through the engine's KV pool failed "
                f"({type(err).__name__}: {err}); the engine serves decoder models whose layers all use attention"
            ) from err
        check_probe(self.model, view)
        windows = self.windows.describe()
        log.info("Attention: %s%s", attention_path(self.model)[1], f"; sliding windows: {windows}" if windows else "")

    def set_model(self, model) -> None:
        """The model object changed (an adapter was loaded or unloaded): captured graphs may read
        weights that are gone, so they are dropped and captured again when used."""
        use_pool_attention(model)
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
        """Logits [rows, vocab] of each row's last column, rows in the order given.

        Rows whose adapters PEFT cannot mix run as one forward per adapter (``adapter_groups``).
        A decoding step that can use CUDA graphs replays one graph, or two when one long context
        would make every row copy its length (``split_by_context``). Any other step is one eager
        forward with its rows sorted by context length and cut into segments of similar length
        (``plan_segments``)."""
        groups = adapter_groups(self.model, adapters)
        if len(groups) == 1:
            return self._run_group(inputs, adapters)
        parts = [self._run_group(inputs.take(group), [adapters[i] for i in group]) for group in groups]
        return self._in_order(torch.cat(parts), [i for group in groups for i in group])

    def _run_group(self, inputs: StepInputs, adapters: list[str | None]) -> torch.Tensor:
        lengths = inputs.context_lengths
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        context, kwargs, key = adapter_state(self.model, [adapters[i] for i in order])  # per-row adapters follow the rows
        if self.static_shapes and key is not None and len(inputs.input_ids[0]) == 1:
            groups = split_by_context(lengths, self.pool.shape.bytes_per_token, self.weight_bytes)
            parts = [self._replay(inputs.take(group), key, context, kwargs) for group in groups]
            if len(parts) == 1:
                return parts[0]
            return self._in_order(torch.cat(parts), [i for group in groups for i in group])
        ordered = inputs.take(order)
        segments = plan_segments([len(table) for table in ordered.block_table])
        return self._in_order(self._eager(ordered, context, kwargs, segments if len(segments) > 1 else None), order)

    def _replay(self, inputs: StepInputs, key: str, context, kwargs) -> torch.Tensor:
        rows = bucket(len(inputs.input_ids), self.rows_sizes)
        blocks = bucket(max(len(table) for table in inputs.block_table), self.block_sizes)
        graph = self._graph(key, rows, blocks, context, kwargs)
        if graph is None:
            return self._eager(inputs, context, kwargs)
        return graph.run(replace(inputs, block_table=pad_tables(inputs.block_table, blocks)))

    def _eager(self, inputs: StepInputs, context, kwargs, segments: tuple[Segment, ...] | None = None) -> torch.Tensor:
        tensors = [
            torch.tensor(value, dtype=torch.long).to(self.device, non_blocking=True)
            for value in (inputs.input_ids, inputs.positions, inputs.write_index, pad_tables(inputs.block_table))
        ]
        with context():
            return forward_step(self.model, self.pool, *tensors, segments=segments, windows=self.windows, **kwargs)

    def _in_order(self, logits: torch.Tensor, order: list[int]) -> torch.Tensor:
        """Rows computed in ``order`` put back in the caller's order."""
        if order == sorted(order):
            return logits
        index = torch.tensor(order, dtype=torch.long).to(self.device, non_blocking=True)
        return torch.empty_like(logits).index_copy_(0, index, logits)


def plan_segments(blocks: list[int]) -> tuple[Segment, ...]:
    """Cut rows sorted by context (``blocks`` ascending) into segments that read as few blocks as
    possible: each row copies its segment's longest context, and a segment costs
    ``SEGMENT_COST_BLOCKS`` more. Exact, by dynamic programming over the distinct lengths."""
    ends = [i + 1 for i in range(len(blocks)) if i + 1 == len(blocks) or blocks[i + 1] != blocks[i]]
    best = {0: (0, 0)}  # rows covered -> (cost, where its last segment starts)
    for end in ends:
        best[end] = min(
            (cost + (end - start) * blocks[end - 1] + SEGMENT_COST_BLOCKS, start) for start, (cost, _) in best.items()
        )
    segments, end = [], len(blocks)
    while end:
        start = best[end][1]
        segments.append((start, end, blocks[end - 1]))
        end = start
    return tuple(reversed(segments))


def split_by_context(lengths: list[int], kv_bytes_per_token: int, weights: int) -> list[list[int]]:
    """Row indices for one captured decoding step, or two when that moves fewer bytes.

    A captured step copies every row's context padded to the longest one (a graph has one
    shape), so one long request in a batch of short ones multiplies the keys and values copied
    and read (3 passes: copy read, write, attention read). A second replay costs one more read of
    the weights. The split, if any, is the one that moves the fewest bytes, rows sorted by context."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    padded = [blocks_for(lengths[i]) * BLOCK_SIZE for i in order]

    def kv_cost(count: int, longest: int) -> int:
        return 3 * count * longest * kv_bytes_per_token

    best_cost, best_split = weights + kv_cost(len(order), padded[-1]), None
    for split in range(1, len(order)):
        cost = 2 * weights + kv_cost(split, padded[split - 1]) + kv_cost(len(order) - split, padded[-1])
        if cost < best_cost:
            best_cost, best_split = cost, split
    if best_split is None:
        return [list(range(len(lengths)))]
    return [sorted(order[:best_split]), sorted(order[best_split:])]


def pad_tables(tables: list[list[int]], width: int | None = None) -> list[list[int]]:
    """Block tables padded with the scratch block to ``width`` (default: the longest)."""
    width = width or max(len(table) for table in tables)
    return [table + [SCRATCH_BLOCK] * (width - len(table)) for table in tables]
