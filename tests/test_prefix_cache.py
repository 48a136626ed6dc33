"""Prefix caching: a prompt's blocks already in the KV cache are shared, not computed again, and
every answer equals the answer without the cache (fp32: greedy and seeded). Tiny random models
make the volume cases fast; the embedded model checks usage, adapters and the setting."""

import copy
import threading

import pytest
import torch
from conftest import seed_tasks, uncached
from test_conformance import tiny_model

from llm_worker.engine import Engine, EngineConfig, GenerationRequest
from llm_worker.engine.kv_cache import BLOCK_SIZE, BlockAllocator, prefix_hashes
from llm_worker.schema import GenerationConfig
from llm_worker.doors import jobs

from transformers import AutoTokenizer

VOCAB_LIMIT = 2000  # the tiny models' prompts use token ids below this


# ---------------------------------------------------------------------- the allocator
def test_shared_blocks_are_referenced_cached_when_idle_and_evicted_least_recently_used_first():
    allocator = BlockAllocator(1 + 6)
    first = allocator.reserve(3)
    hashes = [b"a", b"b", b"c"]
    for block, digest in zip(first, hashes):
        allocator.register(block, digest)
    assert allocator.lookup(hashes + [b"d"]) == first and allocator.lookup([b"x"] + hashes) == []
    allocator.share(first[:2])  # a second request takes the first two
    allocator.release(first)  # the first ends: its third block is idle, the shared two stay in use
    assert allocator.free == 4 and allocator.cached == 1 and allocator.idle(first) == 1
    allocator.release(first[:2])  # the second ends
    assert allocator.free == 6 and allocator.cached == 3
    taken = allocator.reserve(4)  # three blank blocks, then the least recently used cached one
    assert first[2] in taken and allocator.lookup(hashes) == first[:2]
    assert allocator.reserve(3) is None and allocator.free == 2


def test_block_hashes_chain_tokens_and_adapter():
    ids = list(range(40))
    assert len(prefix_hashes(ids)) == 40 // BLOCK_SIZE
    assert prefix_hashes(ids)[:2] == prefix_hashes(ids[:32] + [7] * 8)[:2]
    assert prefix_hashes(ids)[1] != prefix_hashes([99] + ids[1:])[1]  # a block's hash covers what came before
    assert prefix_hashes(ids, "pirate")[0] != prefix_hashes(ids)[0]  # an adapter changes the keys and values


# ---------------------------------------------------------------------- tiny models: exactness and volume
@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="module")
def system(tokenizer) -> list[int]:
    """A shared system prompt of 5.5 blocks (it ends inside a block)."""
    text = " ".join(task["instruction"] for task in seed_tasks(8))
    ids = [i for i in tokenizer(text)["input_ids"] if i < VOCAB_LIMIT]
    return ids[: 5 * BLOCK_SIZE + 8]


def questions(tokenizer, count: int, skip: int = 40) -> list[list[int]]:
    out = []
    for task in seed_tasks(count, skip=skip):
        ids = [i for i in tokenizer(task["instruction"])["input_ids"] if i < VOCAB_LIMIT]
        out.append(ids[:12] or [5])
    return out


def engine_pair(tokenizer, family: str, **config) -> tuple[Engine, Engine]:
    """The same tiny model in two engines, with and without the prefix cache."""
    model = tiny_model(family, VOCAB_LIMIT)
    settings = dict(max_prefill_tokens=32, max_seq_len=256, kv_cache_tokens=4096, cuda_graphs=False)
    settings.update(config)
    on = Engine(copy.deepcopy(model), tokenizer, EngineConfig(**settings), dtype=torch.float32)
    off = Engine(copy.deepcopy(model), tokenizer, EngineConfig(**settings, prefix_caching=False), dtype=torch.float32)
    return on, off


def request(ids: list[int], max_new_tokens: int = 12, **generation) -> GenerationRequest:
    return GenerationRequest(prompt_ids=ids, config=GenerationConfig(max_new_tokens=max_new_tokens, **generation))


def answers(engine: Engine, requests: list[GenerationRequest]) -> list:
    """All submitted at once; each completion (an EngineError for a failure)."""
    results: list = [None] * len(requests)
    done = threading.Semaphore(0)

    def sink_for(index):
        def sink(event):
            if type(event).__name__ in ("Completion", "Failed"):
                results[index] = event
                done.release()

        return sink

    for index, req in enumerate(requests):
        engine.submit(req, sink_for(index))
    for _ in requests:
        assert done.acquire(timeout=300)
    return results


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: a 32-token sliding window
def test_answers_with_the_cache_equal_answers_without(tokenizer, system, family):
    on, off = engine_pair(tokenizer, family)
    try:
        prompts = [system + q for q in questions(tokenizer, 12)]
        prompts.append(system[: 2 * BLOCK_SIZE + 5] + [11, 12, 13])  # shares a prefix that ends inside a block
        greedy = [request(p) for p in prompts]
        seeded = [request(p, do_sample=True, temperature=0.9, seed=i) for i, p in enumerate(prompts)]
        # all at once, before anything is cached: they arrive while the shared prefix is prefilled
        burst_on, burst_off = answers(on, greedy + seeded), answers(off, greedy + seeded)
        assert [a.token_ids for a in burst_on] == [a.token_ids for a in burst_off]
        # again, one by one then together: now the shared blocks come from the cache
        alone = [answers(on, [r])[0] for r in greedy[:2]]
        again = answers(on, greedy + seeded)
        assert [a.token_ids for a in alone + again] == [a.token_ids for a in burst_off[:2] + burst_off]
        # shared in whole 32-token prefill chunks: 64 of the system prompt's 88 tokens; 32 of the one cut inside a block
        assert all(a.cached_tokens == 4 * BLOCK_SIZE for a in again[:12]) and again[12].cached_tokens == 2 * BLOCK_SIZE
        assert all(a.cached_tokens == 0 for a in burst_off)
        assert len({tuple(a.token_ids) for a in burst_off}) > 6  # the prompts get different answers
    finally:
        on.close()
        off.close()


def test_200_jobs_with_a_shared_system_prompt_are_answered_exactly(tokenizer, system):
    on, off = engine_pair(tokenizer, "llama", max_batch_size=32)
    try:
        prompts = [system + q + [i % 7 + 20] for i, q in enumerate(questions(tokenizer, 100) * 2)]
        requests = [request(p, max_new_tokens=6) for p in prompts]
        with_cache, without = answers(on, requests), answers(off, requests)
        assert [a.token_ids for a in with_cache] == [a.token_ids for a in without]
        assert sum(a.cached_tokens for a in with_cache) >= 150 * 4 * BLOCK_SIZE
    finally:
        on.close()
        off.close()


def test_more_prefixes_than_fit_are_evicted_and_every_answer_stays_exact(tokenizer):
    on, off = engine_pair(tokenizer, "llama", kv_cache_tokens=20 * BLOCK_SIZE, max_seq_len=8 * BLOCK_SIZE)
    try:
        prefixes = [[(7 * k + j) % 1500 + 10 for j in range(4 * BLOCK_SIZE)] for k in range(8)]  # 32 blocks of prefixes
        rounds = [[request(p + [3, 4]) for p in prefixes] for _ in range(2)]
        for batch in rounds:
            for req in batch:  # one at a time: each can reuse what the pool still holds
                assert answers(on, [req])[0].token_ids == answers(off, [req])[0].token_ids
        allocator = on.scheduler.allocator
        assert allocator.free == allocator.total  # nothing in use, the cached blocks count as free room
        assert 0 < allocator.cached <= allocator.total
        newest, oldest = (answers(on, [request(prefixes[k] + [3, 4])])[0] for k in (7, 0))
        assert newest.cached_tokens == 4 * BLOCK_SIZE and oldest.cached_tokens == 0  # least recently used: evicted
    finally:
        on.close()
        off.close()


def test_a_request_that_fails_mid_prefill_leaves_nothing_in_the_cache(tokenizer, system):
    on, off = engine_pair(tokenizer, "llama")
    off.close()
    poison = 1999
    prompt = system + [poison] + list(range(30, 60))  # the poison sits in the third 32-token chunk
    real_run = on.runner.run

    def failing(inputs, adapters, *rest):
        if any(poison in row for row in inputs.input_ids):
            raise RuntimeError("injected failure")
        return real_run(inputs, adapters, *rest)

    on.runner.run = failing
    try:
        (failed,) = answers(on, [request(prompt)])
        assert type(failed).__name__ == "Failed"
        allocator = on.scheduler.allocator
        assert allocator.lookup(prefix_hashes(prompt)) == [] and allocator.cached == 0
        assert allocator.free == allocator.total
        (fine,) = answers(on, [request(system + [5, 6])])
        assert fine.cached_tokens == 0  # nothing of the failed request was shared
    finally:
        on.close()


# ---------------------------------------------------------------------- the worker
def test_usage_says_how_many_prompt_tokens_came_from_the_cache(started, random_adapter):
    worker = started(dtype="float32", lora_adapters=f"noisy={random_adapter}", max_prefill_tokens=64)
    system = "You are a careful assistant. " * 12  # 72 tokens: one whole 64-token prefill chunk to share
    job = {"prompt_config": {"instruction": system + "What is the capital of France?", "template": "none"},
           "generation_config": {"max_new_tokens": 8}}
    first, second = worker.complete(job), worker.complete(job)
    assert "cached_tokens" not in first["usage"] and second["usage"]["cached_tokens"] == 64
    assert {k: v for k, v in second.items() if k != "usage"} == {k: v for k, v in first.items() if k != "usage"}
    adapted = worker.complete({**job, "adapter": "noisy"})  # no sharing across adapters
    assert "cached_tokens" not in adapted["usage"]
    body = {"prompt": "Be brief and exact. " * 15 + "Paris is", "max_tokens": 4, "temperature": 0}
    openai_first = jobs.complete(worker, {"openai_route": "/v1/completions", "openai_input": body})
    openai_second = jobs.complete(worker, {"openai_route": "/v1/completions", "openai_input": body})
    assert openai_first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert openai_second["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
    assert openai_second["choices"] == openai_first["choices"]

    off = started(dtype="float32", enable_prefix_cache=False, max_prefill_tokens=64)
    assert off.complete(job) == first and "cached_tokens" not in off.complete(job)["usage"]
    # the embedded model, fp32: answers and their logprobs are the same to the last bit with the cache
    for question in ("Name a color.", "What is two plus two?"):
        for generation in ({"logprobs": 3}, {"do_sample": True, "temperature": 1.0, "seed": 4, "logprobs": 3}):
            ask = {"prompt_config": {"instruction": system + question, "template": "none"}, "generation_config": {"max_new_tokens": 12, **generation}}
            cached = worker.complete(ask)
            assert cached["usage"]["cached_tokens"] == 64 and uncached(cached) == off.complete(ask)


@pytest.fixture(scope="module")
def random_adapter(base_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapters") / "noisy"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(folder)
    return folder
