"""The step runner: owns the KV pool and the device-side buffers, and runs one forward pass
(``forward.py``) over a step's rows, eager or as a replayed CUDA graph (``graphs.py``).

On CUDA a decoding step replays a graph captured for its (adapter, rows, context) bucket: those
of the first answers (one row, short contexts) at start, the base model's others for short
contexts while the engine is idle (``capture_pending``), any other the first time it is used.
With ``DECODE_COMPILE=inductor`` what each graph records is the step compiled by ``torch.compile``
(``compiled_step``: one compilation for every bucket, its code cached on disk), and prefill
chunks run that compiled step too. Decoding steps that mix adapters replay graphs of their own
(``MIXED``) when the batched LoRA product serves them (``LORA_BACKEND=triton``). Otherwise prefill
chunks and steps that mix adapters run eagerly, with rows sorted by context and cut into segments
of similar length. On the CPU every step runs eagerly, unpadded (in the graphs' fixed shapes when
asked: tests, and a simulated GPU, which may also say what its captured steps compute: ``graph_step``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from llm_worker.engine.adapter_rows import BASE_ADAPTER, MIXED, adapter_groups, adapter_state
from llm_worker.engine.attention import (
    PoolView,
    UnsupportedModel,
    attention_path,
    base_model_of,
    check_kernel_device,
    check_probe,
    use_pool_attention,
)
from llm_worker.engine.forward import StepInputs, forward_step, pad_tables, run_view, with_carried
from llm_worker.engine.graphs import CapturedStep, Staging, block_buckets, bucket, row_buckets
from llm_worker.engine.kv_cache import BLOCK_SIZE, SCRATCH_BLOCK, KVPool, Segment, blocks_for
from llm_worker.engine.masks import LayerWindows
from llm_worker.engine.ranks import RankLost, Ranks
from llm_worker.model.loading import weight_bytes

log = logging.getLogger(__name__)

GRAPH_CONTEXT_BLOCKS_AT_START = 16  # graphs for contexts up to 256 tokens are planned at start
# What one more segment of rows costs in a forward (per layer: a copy and an attention call more),
# counted in blocks of context copied for one row; measured on the CPU, ~45 us against ~3 us.
SEGMENT_COST_BLOCKS = 16


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
        attention_kernel: bool = False,
        lora_kernel: bool = False,
        compile_backend: str | None = None,
        compile_cache: str | None = None,
        graph_step=None,
        leader: Ranks | None = None,
    ) -> None:
        """``leader``: under tensor parallel, rank 0's group, through which the other ranks are told
        each step's inputs (and each idle capture) before rank 0 runs them itself."""
        use_pool_attention(model)
        self.leader = leader
        self.model = model
        self.pool = pool
        self.device = device
        self.weight_bytes = weight_bytes(model)
        self.max_blocks = max_blocks
        if attention_kernel:
            check_kernel_device(device)
        if lora_kernel:
            check_kernel_device(device, "LORA_BACKEND", "peft")
        self.windows = LayerWindows(max_blocks * BLOCK_SIZE, kernel=attention_kernel)
        self.lora_kernel = lora_kernel
        self.batched_lora = batched_lora_of(model, max_rows) if lora_kernel else None
        self._probe()
        self.use_graphs = cuda_graphs and device.type == "cuda"
        self.static_shapes = self.use_graphs if static_shapes is None else static_shapes
        self.compile_backend = compile_backend if self.static_shapes else None
        if compile_backend and not self.static_shapes:
            log.warning("DECODE_COMPILE=%s does nothing here: decoding steps are compiled for CUDA graphs only", compile_backend)
        self.step = graph_step or (compiled_step(compile_backend, compile_cache) if self.compile_backend else forward_step)
        if self.compile_backend:  # the pool's shapes never change: symbolic, they would tie rows and widths to them
            for tensor in [*pool.keys, *pool.values]:
                torch._dynamo.mark_static(tensor)
        self.rows_sizes = row_buckets(max_rows)
        # through the paged kernel a row reads its own length whatever the table's width: few, coarse context buckets
        self.block_sizes = block_buckets(max_blocks, GRAPH_CONTEXT_BLOCKS_AT_START, 4) if self.windows.all_in_kernel else block_buckets(max_blocks)
        self.graphs: dict[tuple, CapturedStep | None] = {}  # None: capture failed, run eagerly
        self.pending: list[tuple[int, int]] = []  # (rows, blocks) of base-model graphs to capture when idle
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
            self.staging = Staging(max_rows * (3 + max_blocks), device)

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
        parts = [attention_path(self.model)[1], self.windows.describe_kernel()]
        windows = self.windows.describe()
        log.info("Attention: %s", "; ".join(part for part in parts + [f"sliding windows: {windows}" if windows else ""] if part))

    def set_model(self, model) -> None:
        """The model object changed (an adapter was loaded or unloaded): captured graphs may read
        weights that are gone, so they are dropped and captured again when idle or used."""
        use_pool_attention(model)
        self.model = model
        self.graphs.clear()
        self.pending = self._planned() if self.static_shapes else []
        self.batched_lora = batched_lora_of(model, self.rows_sizes[-1]) if self.lora_kernel else None

    def _planned(self) -> list[tuple[int, int]]:
        """The base model's graphs for short contexts, every batch size: largest first, so that
        smaller ones reuse its memory."""
        short = [b for b in self.block_sizes if b <= GRAPH_CONTEXT_BLOCKS_AT_START]
        return [(rows, blocks) for rows in reversed(self.rows_sizes) for blocks in reversed(short)]

    def capture_at_start(self) -> None:
        """Capture what the first answers need (the base model, one row, contexts up to 256
        tokens); the other planned graphs wait for idle time (``capture_pending``) or first use."""
        if not self.static_shapes:
            return
        started = time.perf_counter()
        context, kwargs, key = adapter_state(self.model, [None])
        planned = self._planned()
        with torch.inference_mode():
            if self.compile_backend:  # prefill chunks of one row and of several: their compilations, before the first answer
                for rows in (1, 2):
                    scratch = StepInputs([[0] * 16] * rows, [list(range(16))] * rows, [SCRATCH_BLOCK * BLOCK_SIZE] * rows * 16, [[SCRATCH_BLOCK]] * rows)
                    self._eager(at_least_two(scratch), context, kwargs, step=self.step)
            for rows, blocks in [p for p in planned if p[0] == 1]:
                self._graph(key, rows, blocks, context, kwargs)
        self.pending = [p for p in planned if p[0] != 1]
        compiled = f" (compiled by torch.compile, {self.compile_backend}, cached in {os.environ.get('TORCHINDUCTOR_CACHE_DIR')})"
        log.info(
            "Captured %d CUDA graphs for the first answers in %.1f s%s; %d more (every batch size, contexts up to %d tokens) "
            "while idle or when first used", len(self.graphs), time.perf_counter() - started,
            compiled if self.compile_backend else "", len(self.pending), GRAPH_CONTEXT_BLOCKS_AT_START * BLOCK_SIZE,
        )

    def capture_pending(self) -> None:
        """Capture the next planned graph not captured yet (the engine thread calls this when it
        has nothing to run: one graph at a time, so a new request waits for one capture at most)."""
        if self.leader:
            self.leader.tell("capture")
        context, kwargs, key = adapter_state(self.model, [None])
        while self.pending:
            rows, blocks = self.pending[0]
            fresh = (key, rows, blocks) not in self.graphs
            if fresh:
                with torch.inference_mode():
                    self._graph(key, rows, blocks, context, kwargs)
            self.pending.pop(0)  # once captured: an empty plan means every planned graph is there
            if fresh:
                break
        if not self.pending:
            log.info("Captured every planned CUDA graph: %d in %.1f s in all", len(self.graphs), self.capture_seconds)

    def _graph(self, key, rows: int, blocks: int, context, kwargs) -> CapturedStep | None:
        index = (key, rows, blocks)
        if index not in self.graphs:
            started = time.perf_counter()
            try:
                # mixed adapters: PEFT's per-row names would be compiled in, one compilation per batch size
                step = forward_step if key == MIXED else self.step
                self.graphs[index] = CapturedStep(self, rows, blocks, context, kwargs, step)
            except Exception as err:  # e.g. a quantized layer that synchronises: run this shape eagerly
                log.warning("CUDA graph capture failed for %s rows=%d blocks=%d (%s: %s); running it eagerly",
                            key, rows, blocks, type(err).__name__, err)
                self.graphs[index] = None
            self.capture_seconds += time.perf_counter() - started
            log.debug("captured graph %s in %.2f s", index, time.perf_counter() - started)
        return self.graphs[index]

    def run(self, inputs: StepInputs, adapters: list[str | None], all_positions: bool = False) -> torch.Tensor:
        """Logits [rows, vocab] of each row's last column, rows in the order given; ``all_positions``:
        of every column, [rows, width, vocab], always eagerly (scoring a prompt).

        Rows whose adapters PEFT cannot mix run as one forward per adapter (``adapter_groups``).
        A decoding step that can use CUDA graphs replays one graph, or two when one long context
        would make every row copy its length (``split_by_context``). Any other step is one eager
        forward with its rows sorted by context length and cut into segments of similar length
        (``plan_segments``)."""
        if self.leader is None:
            return self._run(inputs, adapters, all_positions)
        self.leader.tell("run", inputs, adapters, all_positions)
        try:
            return self._run(inputs, adapters, all_positions)
        except RankLost:
            raise
        except Exception as err:  # the other ranks ran on, or wait in a collective: the ranks are out of step
            raise self.leader.broken("a step", err) from err

    def _run(self, inputs: StepInputs, adapters: list[str | None], all_positions: bool) -> torch.Tensor:
        groups = adapter_groups(self.model, adapters)
        if len(groups) == 1:
            return self._run_group(inputs, adapters, all_positions)
        parts = [self._run_group(inputs.take(group), [adapters[i] for i in group], all_positions) for group in groups]
        return self._in_order(torch.cat(parts), [i for group in groups for i in group])

    def _run_group(self, inputs: StepInputs, adapters: list[str | None], all_positions: bool = False) -> torch.Tensor:
        lengths = inputs.context_lengths
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        context, kwargs, key = adapter_state(self.model, [adapters[i] for i in order])  # per-row adapters follow the rows
        if key is None and self.batched_lora is not None:
            self.batched_lora.index([adapters[i] for i in order])
            key = MIXED  # every mix of adapters through the batched product: one graph per bucket
        if self.static_shapes and key is not None and len(inputs.input_ids[0]) == 1 and not all_positions:
            groups = (  # the paged kernel reads no padding: one replay
                [list(range(len(lengths)))] if self.windows.all_in_kernel
                else split_by_context(lengths, self.pool.shape.bytes_per_token, self.weight_bytes)
            )
            if len(groups) == 1:  # every row, in order: tables are cut to what the rows read (``decode_inputs``)
                return self._replay(inputs, key, context, kwargs, adapters)
            parts = [self._replay(inputs.take(group), key, context, kwargs, [adapters[i] for i in group]) for group in groups]
            return self._in_order(torch.cat(parts), [i for group in groups for i in group])
        ordered = inputs.take(order)
        segments = plan_segments([len(table) for table in ordered.block_table])
        if self.compile_backend and key not in (None, MIXED) and not all_positions and (len(segments) == 1 or self.windows.all_in_kernel):
            logits = self._eager(at_least_two(ordered), context, kwargs, step=self.step)  # a prefill chunk, compiled (DECODE_COMPILE)
        else:
            logits = self._eager(ordered, context, kwargs, segments if len(segments) > 1 else None, all_positions)
        return self._in_order(logits, order)

    def _replay(self, inputs: StepInputs, key: str, context, kwargs, names: list[str | None]) -> torch.Tensor:
        rows = bucket(len(inputs.input_ids), self.rows_sizes)
        blocks = bucket(max(len(table) for table in inputs.block_table), self.block_sizes)
        if key == MIXED:  # the graph reads the rows' adapters from the batched product's buffer, padding rows none
            self.batched_lora.index(names, size=rows)
            kwargs = {"adapter_names": [BASE_ADAPTER] * rows}  # PEFT's mixed path; the names themselves go unread
        graph = self._graph(key, rows, blocks, context, kwargs)
        if graph is None:
            if key == MIXED:
                self.batched_lora.index(names)
                kwargs = {"adapter_names": [name or BASE_ADAPTER for name in names]}
            return self._eager(inputs, context, kwargs)
        return graph.run(replace(inputs, block_table=pad_tables(inputs.block_table, blocks)))

    def _eager(
        self, inputs: StepInputs, context, kwargs, segments: tuple[Segment, ...] | None = None, all_positions: bool = False, step=forward_step
    ) -> torch.Tensor:
        """One forward outside a graph: ``forward_step``, or ``step`` (compiled) with no segments."""
        tensors = [
            torch.tensor(value, dtype=torch.long).to(self.device, non_blocking=True)
            for value in (inputs.input_ids, inputs.positions, inputs.write_index, pad_tables(inputs.block_table))
        ]
        tensors[0] = with_carried(tensors[0], inputs.carry)
        with context():
            if step is not forward_step:
                return step(self.model, self.pool, *tensors, windows=self.windows, **kwargs)
            return forward_step(
                self.model, self.pool, *tensors, segments=segments, windows=self.windows, all_positions=all_positions, **kwargs
            )

    def _in_order(self, logits: torch.Tensor, order: list[int]) -> torch.Tensor:
        """Rows computed in ``order`` put back in the caller's order."""
        if order == sorted(order):
            return logits
        index = torch.tensor(order, dtype=torch.long).to(self.device, non_blocking=True)
        return torch.empty_like(logits).index_copy_(0, index, logits)


def compiled_step(backend: str, cache: str | None):
    """``forward_step`` compiled by ``torch.compile`` for decoding steps: rows and context blocks
    symbolic, so that one compilation serves every bucket (1-sized ones aside, which torch
    specialises), and whole (``fullgraph``: a graph break would be a host round trip inside a
    CUDA graph). Inductor's and Triton's compiled code is kept under ``cache`` (MODEL_CACHE_DIR,
    which a network volume keeps), unless their own variables say otherwise."""
    if cache:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache) / "inductor"))
        os.environ.setdefault("TRITON_CACHE_DIR", str(Path(cache) / "triton"))
    return torch.compile(forward_step, backend=backend, dynamic=True, fullgraph=True)


def at_least_two(inputs: StepInputs) -> StepInputs:
    """A prefill chunk for the compiled step: at least two columns (one more of left padding) and
    two blocks (the scratch block), since torch compiles sizes of 1 apart; rows of one and of
    several are both compiled at start."""
    pad = max(0, 2 - len(inputs.input_ids[0]))
    return StepInputs(
        [[0] * pad + ids for ids in inputs.input_ids],
        [[0] * pad + positions for positions in inputs.positions],
        [index for i in range(len(inputs.input_ids)) for index in [SCRATCH_BLOCK * BLOCK_SIZE] * pad + inputs.write_index[i * (len(inputs.input_ids[0])) : (i + 1) * len(inputs.input_ids[0])]],
        pad_tables(inputs.block_table, max(2, *(len(table) for table in inputs.block_table))),
        inputs.carry,
    )


def batched_lora_of(model, max_rows: int):
    """The batched LoRA product for this model's adapters (``LORA_BACKEND=triton``), or None
    where PEFT's own mixed forward must serve them; imported when used (triton)."""
    from llm_worker.engine.batched_lora import BatchedLora

    batched = BatchedLora.of(model, max_rows)
    if hasattr(model, "peft_config"):
        way = "one batched LoRA product per layer (LORA_BACKEND=triton)" if batched else "PEFT's loop (not all plain LoRA on linear layers)"
        log.info("Rows of mixed adapters: %s", way)
    return batched


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
