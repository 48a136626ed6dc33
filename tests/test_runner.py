"""The step runner's forward pass over the paged KV pool: exact, and free of host synchronisation."""

import functools
import logging
import re
import time

import pytest
import torch
from test_paged_attention import answers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llm_worker.engine import Engine, EngineConfig, GenerationRequest
from llm_worker.schema import GenerationConfig

from llm_worker.engine.masks import LayerWindows
from llm_worker.engine.kv_cache import BLOCK_SIZE, KVPool, KVShape, blocks_for
import itertools

from llm_worker.engine.runner import (
    SEGMENT_COST_BLOCKS,
    StepInputs,
    StepRunner,
    block_buckets,
    forward_step,
    plan_segments,
    row_buckets,
    split_by_context,
)


@pytest.fixture(scope="module")
def tiny():
    """A two-layer LLaMA with grouped-query attention (4 heads, 2 KV heads), random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="module")
def tiny_engine_model(tokenizer):
    """A two-layer LLaMA over the embedded tokenizer's vocabulary, random weights scaled up so that
    greedy answers differ from prompt to prompt."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4)
    return model


def fresh_pool(model, blocks=32):
    return KVPool(KVShape.of(model, torch.float32), blocks, torch.device("cpu"))


def long(values):
    return torch.tensor(values, dtype=torch.long)


def prefill_and_decode(model, pool, prompt, steps, blocks, chunk=None):
    """Feed ``prompt`` (in chunks of ``chunk`` tokens) then ``steps`` greedy tokens through
    ``forward_step``; returns the logits of every position after the prompt's last token."""
    chunk = chunk or len(prompt)
    outputs = []
    for start in range(0, len(prompt), chunk):
        piece = prompt[start : start + chunk]
        positions = list(range(start, start + len(piece)))
        write = [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]
        logits = forward_step(
            model, pool, long([piece]), long([positions]), long(write), long([blocks[: blocks_for(start + len(piece))]])
        )
    outputs.append(logits[0])
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(outputs[-1].argmax()))
        p = len(tokens) - 1
        logits = forward_step(
            model, pool, long([[tokens[-1]]]), long([[p]]),
            long([blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE]), long([blocks[: blocks_for(p + 1)]]),
        )
        outputs.append(logits[0])
    return tokens, torch.stack(outputs)


def test_paged_steps_give_the_logits_of_a_plain_forward(tiny):
    """Chunked prefill and decoding over scattered blocks equal one plain forward of the sequence."""
    prompt = torch.randint(0, 256, (37,)).tolist()
    with torch.inference_mode():
        tokens, stepped = prefill_and_decode(tiny, fresh_pool(tiny), prompt, steps=20, blocks=[9, 3, 17, 5, 11], chunk=16)
        plain = tiny(long([tokens])).logits[0, len(prompt) - 1 :]
    torch.testing.assert_close(stepped, plain[: len(stepped)], rtol=1e-4, atol=1e-4)


def test_a_batch_with_padding_rows_and_tables_gives_each_row_its_own_logits(tiny):
    pool = fresh_pool(tiny)
    a, b = torch.randint(0, 256, (20,)).tolist(), torch.randint(0, 256, (7,)).tolist()
    with torch.inference_mode():
        alone_a = tiny(long([a])).logits[0, -1]
        alone_b = tiny(long([b])).logits[0, -1]
        # left padding: b's pad tokens sit at position 0 and write to the scratch block
        ids = long([a, [0] * 13 + b])
        positions = long([list(range(20)), [0] * 13 + list(range(7))])
        write = [4 * BLOCK_SIZE + p if p < 16 else 6 * BLOCK_SIZE + p - 16 for p in range(20)]
        write += [0] * 13 + [8 * BLOCK_SIZE + p for p in range(7)]
        tables = long([[4, 6], [8, 0]])
        logits = forward_step(tiny, pool, ids, positions, long(write), tables)
    torch.testing.assert_close(logits[0], alone_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], alone_b, rtol=1e-4, atol=1e-4)


def test_decode_step_compiles_as_one_graph(tiny):
    """fullgraph=True fails on any graph break: a ``.item()``, ``.tolist()``, a data-dependent
    branch, anything that would read the device from the host inside the step. The layers'
    sliding windows are learned once on the host, as the runner's probe step does."""
    pool = fresh_pool(tiny)
    windows = LayerWindows(4 * BLOCK_SIZE)
    compiled = torch.compile(functools.partial(forward_step, windows=windows), fullgraph=True, backend="aot_eager")
    rows = 3
    ids = torch.randint(0, 256, (rows, 1))
    positions = long([[5], [17], [40]])
    write = long([1 * BLOCK_SIZE + 5, 2 * BLOCK_SIZE + 1, 7 * BLOCK_SIZE + 8])
    table = long([[1, 0, 0, 0], [9, 2, 0, 0], [3, 5, 7, 0]])
    with torch.inference_mode():
        eager = forward_step(tiny, pool, ids, positions, write, table, windows=windows)
        graphed = compiled(tiny, pool, ids, positions, write, table)
    torch.testing.assert_close(graphed, eager)


def test_runner_runs_unpadded_on_cpu(tiny):
    runner = StepRunner(tiny, fresh_pool(tiny), torch.device("cpu"), max_rows=8, max_blocks=8, cuda_graphs=True)
    assert not runner.use_graphs
    with torch.inference_mode():
        logits = runner.run(StepInputs([[1], [2]], [[0], [0]], [16, 32], [[1], [2]]), [None, None])
    assert logits.shape == (2, 256)


def test_graph_buckets_cover_every_batch_and_context():
    assert row_buckets(128) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]
    assert row_buckets(5) == [1, 2, 4, 5]
    assert block_buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert block_buckets(100)[-1] == 100
    assert block_buckets(256, 16, 4) == [16, 64, 256]  # the paged kernel's coarse contexts
    assert block_buckets(8, 16, 4) == [8]


def test_start_captures_the_first_answers_graphs_and_the_rest_one_at_a_time_largest_first(tiny):
    """At start only one-row graphs for short contexts (what a first answer walks through); the
    other planned ones (every batch size, contexts up to 256 tokens) one per ``capture_pending``,
    largest first; a graph first used in between is not captured twice."""
    runner = StepRunner(tiny, fresh_pool(tiny, 64), torch.device("cpu"), max_rows=8, max_blocks=32, cuda_graphs=False, static_shapes=True)
    runner.capture_at_start()
    assert set(runner.graphs) == {("__base__", 1, blocks) for blocks in (1, 2, 4, 8, 16)}
    planned = {(rows, blocks) for rows in (2, 4, 8) for blocks in (1, 2, 4, 8, 16)}
    assert set(runner.pending) == planned and runner.pending[0] == (8, 16) and runner.pending[-1] == (2, 1)
    runner.capture_pending()
    assert ("__base__", 8, 16) in runner.graphs and len(runner.pending) == len(planned) - 1
    with torch.inference_mode():  # 3 rows of 1 to 3 blocks: the (4, 4) graph, captured on first use
        runner.run(StepInputs([[1], [2], [3]], [[0], [20], [40]], [16, 36, 56], [[1], [2, 3], [4, 5, 6]]), [None] * 3)
    assert ("__base__", 4, 4) in runner.graphs
    calls = 0
    while runner.pending:
        runner.capture_pending()
        calls += 1
    assert calls == len(planned) - 2  # (4, 4) was skipped, not captured again
    assert set(runner.graphs) == {("__base__", rows, blocks) for rows in (1, 2, 4, 8) for blocks in (1, 2, 4, 8, 16)}
    runner.set_model(tiny)  # an adapter loaded: every graph is planned again
    assert not runner.graphs and len(runner.pending) == len(planned) + 5


def test_an_idle_engine_captures_its_planned_graphs_and_answers_as_without_them(tiny_engine_model, tokenizer, caplog):
    """The engine thread captures the planned graphs while it has nothing to run (the CUDA-graph
    shapes, run eagerly on the CPU), logs each part of its start, and answers as an engine without
    fixed shapes."""
    prompts = [tokenizer(text)["input_ids"] for text in ("Hello there", "The capital of France is", "1 2 3 4 5 6 7 8 9")]
    config = GenerationConfig(max_new_tokens=12, min_new_tokens=12)

    def engine(**fixed):
        return Engine(tiny_engine_model, tokenizer, EngineConfig(max_seq_len=128, kv_cache_tokens=1024, max_batch_size=8, cuda_graphs=False, **fixed))

    plain = engine()
    try:
        expected = [plain.generate(GenerationRequest(ids, config)).token_ids for ids in prompts]
    finally:
        plain.close()
    with caplog.at_level(logging.INFO, logger="llm_worker.engine"):
        fixed = engine(static_shapes=True)
        try:
            for _ in range(600):
                if not fixed.runner.pending:
                    break
                time.sleep(0.1)
            assert set(fixed.runner.graphs) == {("__base__", rows, blocks) for rows in (1, 2, 4, 8) for blocks in (1, 2, 4, 8)}
            together = answers(fixed, prompts, config)  # 3 rows replay the 4-row shapes
        finally:
            fixed.close()
    assert together == expected
    assert "Captured 4 CUDA graphs for the first answers" in caplog.text and "12 more" in caplog.text
    assert "Captured every planned CUDA graph: 16" in caplog.text
    assert re.search(r"Engine ready in [\d.]+ s \(KV pool [\d.]+ s, probe step [\d.]+ s, first graphs [\d.]+ s\)", caplog.text)


def test_bucketed_static_steps_give_the_logits_of_unpadded_steps(tiny):
    """The CUDA-graph path's static buffers, row and context padding, run eagerly on the CPU:
    padded rows and scratch blocks must not change any real row's logits."""
    pool = fresh_pool(tiny, blocks=64)
    plain = StepRunner(tiny, pool, torch.device("cpu"), max_rows=8, max_blocks=16, cuda_graphs=False)
    static = StepRunner(tiny, pool, torch.device("cpu"), max_rows=8, max_blocks=16, cuda_graphs=False, static_shapes=True)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 21, 40)]
    tables = [[3, 4, 5, 6], [10, 11, 12, 13], [20, 21, 22, 23]]
    with torch.inference_mode():
        for prompt, table in zip(prompts, tables):  # prefill each prompt into its blocks
            write = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(len(prompt))]
            plain.run(StepInputs([prompt], [list(range(len(prompt)))], write, [table[: blocks_for(len(prompt))]]), [None])
        positions = [len(p) for p in prompts]
        step = StepInputs(
            input_ids=[[7], [8], [9]],
            positions=[[p] for p in positions],
            write_index=[t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for t, p in zip(tables, positions)],
            block_table=[t[: blocks_for(p + 1)] + [0] * (3 - blocks_for(p + 1)) for t, p in zip(tables, positions)],
        )
        expected = plain.run(step, [None, None, None]).clone()
        first = static.run(step, [None, None, None]).clone()  # 3 rows pad to 4, 3 blocks to 4
        again = static.run(StepInputs(step.input_ids[:1], step.positions[:1], step.write_index[:1], [step.block_table[0][:1]]), [None])
    assert set(static.graphs) == {("__base__", 4, 4), ("__base__", 1, 1)}
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again[0], expected[0], rtol=1e-5, atol=1e-5)


def test_segments_are_the_cheapest_cut_of_sorted_rows():
    """Against every way to cut rows into contiguous segments (brute force)."""
    torch.manual_seed(1)

    def cost(segments):
        return sum((end - start) * blocks + SEGMENT_COST_BLOCKS for start, end, blocks in segments)

    for _ in range(200):
        blocks = sorted(torch.randint(1, 60, (int(torch.randint(1, 9, ())),)).tolist())
        best = min(
            cost([(a, b, blocks[b - 1]) for a, b in zip((0, *cuts), (*cuts, len(blocks)))])
            for k in range(len(blocks))
            for cuts in itertools.combinations(range(1, len(blocks)), k)
        )
        segments = plan_segments(blocks)
        assert cost(segments) == best
        assert [s[0] for s in segments[1:]] == [s[1] for s in segments[:-1]] and segments[-1][1] == len(blocks)
    assert plan_segments([2] * 31 + [90]) == ((0, 31, 2), (31, 32, 90))
    assert plan_segments([3, 3, 4, 4, 5]) == ((0, 5, 5),)


def prefilled(runner, prompts, tables):
    with torch.inference_mode():
        for prompt, table in zip(prompts, tables):
            write = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(len(prompt))]
            runner.run(StepInputs([prompt], [list(range(len(prompt)))], write, [table]), [None])


def decode_step(tables, positions, tokens):
    return StepInputs(
        input_ids=[[t] for t in tokens],
        positions=[[p] for p in positions],
        write_index=[t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for t, p in zip(tables, positions)],
        block_table=tables,
    )


def test_rows_of_very_different_lengths_in_one_forward_give_their_solo_logits(tiny):
    """Rows given out of order, one far longer than the others: the eager step sorts them, reads
    them in segments (each padded to its segment only) and returns each row its own logits."""
    pool = fresh_pool(tiny, blocks=64)
    runner = StepRunner(tiny, pool, torch.device("cpu"), max_rows=8, max_blocks=16, cuda_graphs=False)
    lengths = [21, 230, 5, 9]
    assert len(plan_segments(sorted(blocks_for(n + 1) for n in lengths))) > 1
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in lengths]
    tables = [list(range(1 + 15 * i, 16 + 15 * i)) for i in range(len(lengths))]
    prefilled(runner, prompts, tables)
    step = decode_step(tables, lengths, [7, 8, 9, 10])
    with torch.inference_mode():
        together = runner.run(step, [None] * 4)
        alone = [runner.run(step.take([i]), [None])[0] for i in range(4)]
        plain = [tiny(long([prompt + [token]])).logits[0, -1] for prompt, token in zip(prompts, [7, 8, 9, 10])]
    for i in range(4):
        torch.testing.assert_close(together[i], alone[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together[i], plain[i], rtol=1e-4, atol=1e-4)


def test_a_captured_step_splits_off_one_long_row_and_keeps_every_rows_logits(tiny):
    """The graph path: padded to one shape, a long row would make every row copy its length, so the
    step replays two graphs (short rows, long row); the logits come back in the caller's order."""
    pool = fresh_pool(tiny, blocks=64)
    plain = StepRunner(tiny, pool, torch.device("cpu"), max_rows=8, max_blocks=16, cuda_graphs=False)
    static = StepRunner(tiny, pool, torch.device("cpu"), max_rows=8, max_blocks=16, cuda_graphs=False, static_shapes=True)
    lengths = [12, 200, 3]
    assert len(split_by_context([n + 1 for n in lengths], pool.shape.bytes_per_token, static.weight_bytes)) == 2
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in lengths]
    tables = [list(range(1 + 15 * i, 16 + 15 * i)) for i in range(len(lengths))]
    prefilled(plain, prompts, tables)
    step = decode_step(tables, lengths, [4, 5, 6])
    with torch.inference_mode():
        expected = plain.run(step, [None] * 3).clone()
        replayed = static.run(step, [None] * 3)
    assert set(static.graphs) == {("__base__", 2, 1), ("__base__", 1, 16)}
    torch.testing.assert_close(replayed, expected, rtol=1e-5, atol=1e-5)


def test_a_compiled_decoding_step_is_one_whole_graph_and_answers_as_the_eager_one(tiny):
    """DECODE_COMPILE: ``forward_step`` traced by torch.compile whole (``fullgraph``: any graph
    break raises), once for the buckets of more than one row and block (torch specialises sizes
    of 1), and its logits are the eager step's through prefill-then-decode over several buckets.
    On the CPU the backend is aot_eager (the traced graph, run by PyTorch's own kernels); inductor's
    code for CUDA is the device's to prove."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    pool = fresh_pool(tiny, blocks=64)
    plain = StepRunner(tiny, pool, torch.device("cpu"), max_rows=8, max_blocks=16, cuda_graphs=False)
    compiled = StepRunner(
        tiny, pool, torch.device("cpu"), max_rows=8, max_blocks=16, cuda_graphs=False, static_shapes=True, compile_backend="aot_eager"
    )
    lengths = [5, 21, 40, 70, 9]
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in lengths]
    tables = [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(len(lengths))]
    prefilled(plain, prompts, tables)
    shapes = set()
    with torch.inference_mode():
        for rows in ([0, 1, 2], [0, 1, 2, 3, 4], [1, 3], [2]):  # 4, 8, 2 and 1 rows; 1 to 8 blocks
            step = decode_step(
                [tables[i][: blocks_for(lengths[i] + 1)] for i in rows], [lengths[i] for i in rows], [7 + i for i in rows]
            )
            expected = plain.run(step, [None] * len(rows)).clone()
            got = compiled.run(step, [None] * len(rows))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            shapes |= set(compiled.graphs)
    assert compiled.step is not forward_step and len(shapes) >= 4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3, dict(torch._dynamo.utils.counters["stats"])


def chunks(prompts, tables, starts, ends):
    """One prefill forward over prompt pieces [start, end), left-padded to the widest (padding at
    position 0, written to the scratch block), as the engine lays them out."""
    width = max(end - start for start, end in zip(starts, ends))
    inputs = StepInputs([], [], [], [])
    for prompt, table, start, end in zip(prompts, tables, starts, ends):
        pad = width - (end - start)
        inputs.input_ids.append([0] * pad + prompt[start:end])
        inputs.positions.append([0] * pad + list(range(start, end)))
        inputs.write_index += [0] * pad + [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
        inputs.block_table.append(table[: blocks_for(end)])
    return inputs


def test_compiled_prefill_chunks_give_the_eager_logits_in_the_compilations_made_at_start(tiny):
    """DECODE_COMPILE: prefill chunks go through the compiled step too; its compilations for one
    row and for several are made at start (``capture_at_start``), so chunks of other widths, rows
    and contexts compile nothing more, and their logits are the eager forward's."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plain = StepRunner(tiny, fresh_pool(tiny, 64), torch.device("cpu"), max_rows=8, max_blocks=16, cuda_graphs=False)
    compiled = StepRunner(
        tiny, fresh_pool(tiny, 64), torch.device("cpu"), max_rows=8, max_blocks=16, cuda_graphs=False, static_shapes=True,
        compile_backend="aot_eager",
    )
    compiled.capture_at_start()
    at_start = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert at_start >= 2
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 21, 40, 70)]
    tables = [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(len(prompts))]
    steps = [  # (rows, starts, ends): one row; two rows left-padded; a row's second chunk beside a fresh one
        ([0], [0], [5]), ([1, 2], [0, 0], [21, 33]), ([3], [0], [30]), ([2, 3], [33, 30], [40, 70]),
    ]
    with torch.inference_mode():
        for rows, starts, ends in steps:
            step = chunks([prompts[i] for i in rows], [tables[i] for i in rows], starts, ends)
            expected = plain.run(step, [None] * len(rows)).clone()
            torch.testing.assert_close(compiled.run(step, [None] * len(rows)), expected, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == at_start, dict(torch._dynamo.utils.counters["stats"])
