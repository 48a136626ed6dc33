"""The paged attention kernel (``ATTENTION_BACKEND=triton``) against attention over the same keys
gathered out of the pool, and the engine's greedy answers with it against the gathered path.

On a machine without CUDA the kernels run under Triton's interpreter (``conftest.py`` sets
``TRITON_INTERPRET=1``), in float32, on tiny shapes; with ``DEVICE=cuda`` the same tests run the
compiled kernels on the GPU."""

import logging
import queue

import pytest
import torch
import transformers
from conftest import DEVICE
from transformers import AutoTokenizer
from transformers.masking_utils import causal_mask_function, chunked_causal_mask_function, sliding_window_causal_mask_function

from llm_worker.engine import Completion, Engine, EngineConfig, Failed, GenerationRequest
from llm_worker.engine.attention import check_kernel_device
from llm_worker.engine.kv_cache import BLOCK_SIZE, SCRATCH_BLOCK
from llm_worker.engine.masks import MaskRule
from llm_worker.engine.paged_attention import paged_attention, splits_for, write_kv
from llm_worker.schema import GenerationConfig

@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


TOLERANCE = {"atol": 2e-5, "rtol": 1e-4}  # float32; the kernel sums keys in another order (pages, splits)


def reference(query, keys, values, tables, positions, scale, window):
    """Attention of each row's queries over its keys gathered position by position, with the
    causal (or sliding-window) mask written out: [rows, width, heads, head_dim]."""
    rows, heads, width, dim = query.shape
    group = heads // keys.shape[1]
    out = torch.empty(rows, width, heads, dim, dtype=query.dtype)
    for row in range(rows):
        newest = int(positions[row, -1])
        slots = torch.tensor([tables[row][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(newest + 1)])
        k = keys[slots].transpose(0, 1).repeat_interleave(group, 0)  # [heads, keys, dim]
        v = values[slots].transpose(0, 1).repeat_interleave(group, 0)
        query_positions = (newest - (width - 1) + torch.arange(width)).clamp(min=0)
        key_positions = torch.arange(newest + 1)
        visible = key_positions[None, :] <= query_positions[:, None]
        if window:
            visible &= key_positions[None, :] > query_positions[:, None] - window
        scores = (query[row] @ k.transpose(1, 2)) * scale
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[row] = (weights @ v).transpose(0, 1)
    return out


def case(lengths, width, heads, kv_heads, dim, shared=0, seed=0):
    """A pool with random keys and values, rows whose newest position is ``length - 1``, block
    tables laid out as the allocator would (the first ``shared`` blocks common to every row), and
    queries for the last ``width`` positions (a row shorter than ``width`` is left-padded)."""
    generator = torch.Generator().manual_seed(seed)
    pages = [-(-length // BLOCK_SIZE) for length in lengths]
    tables, next_block = [], 1
    common = list(range(next_block, next_block + shared))
    next_block += shared
    for count in pages:
        own = list(range(next_block, next_block + count - shared))
        next_block += count - shared
        tables.append(common + own)
    blocks = next_block + 1
    keys = torch.randn(blocks * BLOCK_SIZE, kv_heads, dim, generator=generator)
    values = torch.randn(blocks * BLOCK_SIZE, kv_heads, dim, generator=generator)
    query = torch.randn(len(lengths), heads, width, dim, generator=generator)
    positions = torch.tensor([[max(length - width + c, 0) for c in range(width)] for length in lengths])
    widest = max(pages) + 1
    table = torch.tensor([t + [SCRATCH_BLOCK] * (widest - len(t)) for t in tables])
    return query, keys, values, tables, table, positions


CASES = {
    "decode, rows of different lengths ending inside a block": dict(lengths=[1, 17, 40, 5], width=1, heads=4, kv_heads=2, dim=16),
    "decode, no GQA": dict(lengths=[33, 9], width=1, heads=2, kv_heads=2, dim=16),
    "decode, groups of three, a head size not a power of two": dict(lengths=[20, 50], width=1, heads=6, kv_heads=2, dim=24),
    "decode, split over a long context": dict(lengths=[700, 300], width=1, heads=2, kv_heads=1, dim=16),
    "decode, rows sharing their first blocks (prefix cache)": dict(lengths=[48, 40, 70], width=1, heads=4, kv_heads=2, dim=16, shared=2),
    "prefill chunk from the start, left-padded": dict(lengths=[3, 7], width=7, heads=4, kv_heads=2, dim=16),
    "prefill chunk after earlier chunks": dict(lengths=[45, 38], width=9, heads=4, kv_heads=1, dim=16),
    "prefill chunk wider than a tile": dict(lengths=[100], width=80, heads=2, kv_heads=2, dim=16),
}


@pytest.mark.parametrize("window", [0, 20], ids=["causal", "window-20"])
@pytest.mark.parametrize("name", list(CASES))
def test_the_kernel_equals_attention_over_the_gathered_keys(name, window):
    query, keys, values, tables, table, positions = case(**CASES[name])
    scale = query.shape[-1] ** -0.5
    expected = reference(query, keys, values, tables, positions, scale, window)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    got = paged_attention(on(query), on(keys), on(values), on(table), on(positions), scale, window)
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCE)


def test_long_decoding_rows_are_split_and_prefill_is_not():
    assert splits_for(rows=1, kv_heads=1, width=1, table_pages=64) > 1
    assert splits_for(rows=1, kv_heads=1, width=8, table_pages=64) == 1
    assert splits_for(rows=128, kv_heads=8, width=1, table_pages=64) == 1


def test_write_kv_writes_where_index_copy_does():
    generator = torch.Generator().manual_seed(1)
    new_keys, new_values = torch.randn(3, 2, 4, 16, generator=generator), torch.randn(3, 2, 4, 16, generator=generator)
    index = torch.randperm(64, generator=generator)[:12]
    keys, values = torch.zeros(64, 2, 16), torch.zeros(64, 2, 16)
    expected_keys = keys.index_copy(0, index, new_keys.transpose(1, 2).reshape(-1, 2, 16))
    expected_values = values.index_copy(0, index, new_values.transpose(1, 2).reshape(-1, 2, 16))
    keys, values = keys.to(DEVICE), values.to(DEVICE)
    write_kv(keys, values, new_keys.to(DEVICE), new_values.to(DEVICE), index.to(DEVICE))
    assert torch.equal(keys.cpu(), expected_keys) and torch.equal(values.cpu(), expected_values)


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MODELS = {
    "llama": lambda vocab: transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **TINY)),
    "mistral, a 24-token window": lambda vocab: transformers.MistralForCausalLM(
        transformers.MistralConfig(vocab_size=vocab, sliding_window=24, **TINY)
    ),
    "qwen2": lambda vocab: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=vocab, **TINY)),
}


def scaled(model):
    """Random weights scaled up, so that greedy answers differ from prompt to prompt."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4)
    return model.eval().to(DEVICE)


def answers(engine, prompts, config):
    """Every prompt's greedy token ids, all submitted at once: rows of different lengths share steps."""
    events = queue.Queue()
    for i, ids in enumerate(prompts):
        engine.submit(GenerationRequest(ids, config), lambda event, i=i: events.put((i, event)))
    done = {}
    while len(done) < len(prompts):
        i, event = events.get(timeout=600)
        assert not isinstance(event, Failed), event.error
        if isinstance(event, Completion):
            done[i] = event.token_ids
    return [done[i] for i in range(len(prompts))]


@pytest.mark.parametrize("family", list(MODELS))
def test_greedy_answers_with_the_kernel_equal_the_gathered_path(family, tokenizer, caplog):
    """Prompts prefilled in chunks of 8 tokens, then decoded together, through the kernel; against
    each prompt alone through the gathered path."""
    torch.manual_seed(0)
    model = scaled(MODELS[family](len(tokenizer)))
    texts = ("Hello there", "The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12 13 14")
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    config = GenerationConfig(max_new_tokens=20, min_new_tokens=20)

    def engine(backend):
        settings = EngineConfig(max_seq_len=64, kv_cache_tokens=512, max_prefill_tokens=8, cuda_graphs=False, attention_backend=backend)
        return Engine(model, tokenizer, settings)

    gathered = engine("gather")
    try:
        expected = [gathered.generate(GenerationRequest(ids, config)).token_ids for ids in prompts]
    finally:
        gathered.close()
    with caplog.at_level(logging.INFO, logger="llm_worker.engine.runner"):
        kernel = engine("triton")
    try:
        assert answers(kernel, prompts, config) == expected
    finally:
        kernel.close()
    assert "paged Triton kernel on every layer (ATTENTION_BACKEND=triton)" in caplog.text


def test_decoding_in_graph_shapes_through_the_kernel_uses_coarse_contexts_and_one_replay(tokenizer):
    """CUDA graphs' fixed shapes (run eagerly here): with every layer in the kernel, a row reads its
    own length whatever the table's width, so one context bucket serves these short answers, and
    the answers are the gathered path's."""
    torch.manual_seed(0)
    model = scaled(MODELS["llama"](len(tokenizer)))
    prompts = [tokenizer(text)["input_ids"] for text in ("Hello there", "1 2 3 4 5 6 7 8 9 10 11 12 13 14")]
    config = GenerationConfig(max_new_tokens=16, min_new_tokens=16)

    def engine(backend, **fixed):
        return Engine(model, tokenizer, EngineConfig(max_seq_len=64, kv_cache_tokens=512, cuda_graphs=False, attention_backend=backend, **fixed))

    gathered = engine("gather")
    try:
        expected = [gathered.generate(GenerationRequest(ids, config)).token_ids for ids in prompts]
    finally:
        gathered.close()
    kernel = engine("triton", static_shapes=True)
    try:
        assert kernel.runner.block_sizes == [4]  # 64 tokens: the gathered path's buckets are 1, 2, 4 blocks
        assert answers(kernel, prompts, config) == expected
        assert {blocks for _, _, blocks in kernel.runner.graphs} == {4}
    finally:
        kernel.close()


def test_without_cuda_or_the_interpreter_the_kernel_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="ATTENTION_BACKEND=triton runs on CUDA"):
        check_kernel_device(torch.device("cpu"))


def test_only_causal_and_sliding_window_rules_go_to_the_kernel():
    def rule(function):
        return MaskRule({"mask_function": function})

    assert rule(causal_mask_function).kernel_window(4096) == 0
    assert rule(sliding_window_causal_mask_function(32)).kernel_window(4096) == 32
    assert rule(sliding_window_causal_mask_function(4096)).kernel_window(4096) == 0  # as long as any sequence
    assert rule(chunked_causal_mask_function(16, torch.zeros(1, dtype=torch.long))).kernel_window(4096) is None


def test_a_model_on_its_own_eager_attention_keeps_the_gathered_path_and_the_log_says_so(tokenizer, caplog):
    """Gemma 2 soft-caps its logits in its own eager attention, which the kernel does not compute."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=len(tokenizer), head_dim=16, query_pre_attn_scalar=16, sliding_window=32, **TINY)
    model = scaled(transformers.Gemma2ForCausalLM(config))
    prompt = tokenizer("The capital of France is")["input_ids"]
    request = GenerationRequest(prompt, GenerationConfig(max_new_tokens=8, min_new_tokens=8))
    answers = []
    for backend in ("gather", "triton"):
        with caplog.at_level(logging.INFO, logger="llm_worker.engine.runner"):
            engine = Engine(model, tokenizer, EngineConfig(max_seq_len=64, kv_cache_tokens=256, cuda_graphs=False, attention_backend=backend))
        try:
            answers.append(engine.generate(request).token_ids)
        finally:
            engine.close()
    assert answers[0] == answers[1]
    assert "ATTENTION_BACKEND=triton), except layers [0, 1], whose mask or attention function it does not compute" in caplog.text


def test_the_compiled_step_takes_the_kernels_whole_and_answers_as_the_gathered_path():
    """DECODE_COMPILE with ATTENTION_BACKEND=triton: the kernels are custom ops, so torch.compile
    traces prefill and decoding steps through them with no graph break (``fullgraph``), and the
    logits are the gathered path's (aot_eager here; inductor's code is the device's to prove)."""
    from llm_worker.engine.kv_cache import KVPool, KVShape, blocks_for
    from llm_worker.engine.runner import StepInputs, StepRunner

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = scaled(MODELS["llama"](256))
    device = torch.device(DEVICE)

    def runner(**options):
        pool = KVPool(KVShape.of(model, torch.float32), 64, device)
        return StepRunner(model, pool, device, max_rows=8, max_blocks=16, cuda_graphs=False, **options)

    gathered = runner()
    compiled = runner(static_shapes=True, attention_kernel=True, compile_backend="aot_eager")
    compiled.capture_at_start()
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (21, 9)]
    tables = [list(range(1, 9)), list(range(9, 17))]
    with torch.inference_mode():
        for prompt, table in zip(prompts, tables):
            write = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(len(prompt))]
            step = StepInputs([prompt], [list(range(len(prompt)))], write, [table[: blocks_for(len(prompt))]])
            torch.testing.assert_close(compiled.run(step, [None]), gathered.run(step, [None]).clone(), **TOLERANCE)
        lengths = [len(p) for p in prompts]
        step = StepInputs(
            [[5], [7]], [[n] for n in lengths], [t[n // BLOCK_SIZE] * BLOCK_SIZE + n % BLOCK_SIZE for t, n in zip(tables, lengths)],
            [t[: blocks_for(n + 1)] for t, n in zip(tables, lengths)],
        )
        expected = gathered.run(step, [None, None]).clone()
        torch.testing.assert_close(compiled.run(step, [None, None]), expected, **TOLERANCE)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert 2 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4
