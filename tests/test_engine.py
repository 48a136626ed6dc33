"""Generation through the engine: decoding settings, finish reasons, batching, streaming."""

import asyncio
import shutil
import threading
import time

import pytest

from conftest import POISON, concurrently, job, nan_logits, seed_tasks, uncached

from llm_worker.engine import LoopSink
from llm_worker.engine.kv_cache import BLOCK_SIZE
from llm_worker.service import collect

FRANCE = "What is the capital of France?"


def test_default_model_knows_the_capital_of_france(worker):
    result = worker.complete(job(FRANCE, max_new_tokens=32))
    assert "Paris" in result["output"]
    assert result["model"] == "SmolLM2-135M-Instruct"
    assert result["adapter"] is None


def test_greedy_is_deterministic(worker):
    first = worker.complete(job("Write a haiku about the sea.", max_new_tokens=24))
    second = worker.complete(job("Write a haiku about the sea.", max_new_tokens=24))
    assert uncached(first) == uncached(second)


def test_seed_makes_sampling_reproducible(worker):
    request = job("Write a haiku about the sea.", temperature=1.0, seed=1234, max_new_tokens=24)
    assert worker.complete(request)["output"] == worker.complete(request)["output"]


def test_sampling_actually_varies(worker):
    outputs = {
        worker.complete(job("Write a haiku about the sea.", temperature=1.2, seed=seed, max_new_tokens=16))["output"]
        for seed in range(4)
    }
    assert len(outputs) >= 3


def test_temperature_without_do_sample_samples(worker):
    """The seed's bug: temperature was ignored unless do_sample was set."""
    greedy = worker.complete(job("Write a haiku about the sea.", max_new_tokens=16))["output"]
    sampled = {
        worker.complete(job("Write a haiku about the sea.", temperature=1.5, seed=s, max_new_tokens=16))["output"]
        for s in range(3)
    }
    assert sampled - {greedy}


def test_length_finish_counts_exactly_max_new_tokens(worker):
    result = worker.complete(job("Tell me a long story about dragons.", max_new_tokens=7))
    assert result["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 7
    assert result["usage"]["prompt_tokens"] == len(worker.prepare(job("Tell me a long story about dragons."))[1].prompt_ids)


def whole_answer(instruction: str, **generation) -> dict:
    """A job whose alpaca answer runs on past a new '### ' section, to its end-of-sequence."""
    return {"prompt_config": {"instruction": instruction, "stop_at_section": False}, "generation_config": generation}


def test_eos_finish_stops_before_the_limit(worker):
    result = worker.complete(whole_answer(FRANCE, max_new_tokens=200))
    assert result["finish_reason"] == "eos"
    assert result["usage"]["completion_tokens"] < 200


def test_min_new_tokens_holds_back_end_of_sequence(worker):
    short = worker.complete(whole_answer(FRANCE, max_new_tokens=200))
    longer = worker.complete(whole_answer(FRANCE, max_new_tokens=200, min_new_tokens=short["usage"]["completion_tokens"] + 5))
    assert longer["usage"]["completion_tokens"] >= short["usage"]["completion_tokens"] + 5


def test_stop_string_cuts_the_answer(worker):
    free = worker.complete(job(FRANCE, max_new_tokens=32))["output"]
    assert "Paris" in free
    cut = worker.complete(job(FRANCE, max_new_tokens=32, stop=["Paris"]))
    assert cut["finish_reason"] == "stop"
    assert cut["output"] == free[: free.index("Paris")].strip()


def repetitive(worker, **generation):
    """A raw prompt the model continues by repeating it, run through the engine directly."""
    raw = {"prompt_config": {"instruction": "red blue red blue red blue red blue", "template": "none"}}
    request = worker.prepare({**raw, "generation_config": {"max_new_tokens": 16, **generation}})[1]
    return request.prompt_ids, worker.engine.generate(request).token_ids


def test_no_repeat_ngram_size_never_repeats_a_trigram(worker):
    prompt, generated = repetitive(worker, no_repeat_ngram_size=3)
    ids = prompt + generated
    trigrams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
    new = range(len(prompt) - 2, len(trigrams))
    assert all(trigrams[i] not in trigrams[:i] for i in new)
    _, plain = repetitive(worker)
    plain_trigrams = [tuple((prompt + plain)[i : i + 3]) for i in range(len(prompt + plain) - 2)]
    assert any(plain_trigrams[i] in plain_trigrams[:i] for i in new), "the plain answer should repeat"


def test_repetition_penalty_moves_away_from_seen_tokens(worker):
    prompt, plain = repetitive(worker)
    _, penalized = repetitive(worker, repetition_penalty=2.0)
    seen = set(prompt)
    assert sum(t in seen for t in penalized) < sum(t in seen for t in plain)


def test_beam_search_answers(worker):
    result = worker.complete(job(FRANCE, num_beams=3, max_new_tokens=24))
    assert "Paris" in result["output"]
    assert result["finish_reason"] in ("eos", "length")


def test_prompt_longer_than_the_context_is_refused(worker):
    result = worker.complete(job("word " * 9000))
    assert result["error"].startswith("prompt_config: the prompt is")
    assert "MAX_INPUT_TOKENS" in result["error"]


def test_greedy_answers_in_a_batch_equal_solo_answers(fp32_worker):
    """Compare token ids of real instructions run alone and run together (different lengths, so
    requests join and leave the batch at different steps)."""
    jobs = [{"prompt_config": task, "generation_config": {"max_new_tokens": 24}} for task in seed_tasks(8)]
    requests = [fp32_worker.prepare(j)[1] for j in jobs]
    solo = [fp32_worker.engine.generate(r) for r in requests]
    together = [None] * len(requests)

    def run(i):
        together[i] = fp32_worker.engine.generate(requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [c.token_ids for c in together] == [c.token_ids for c in solo]
    assert len({c.completion_tokens for c in solo}) > 1, "lengths should vary so rows leave at different steps"


def test_sampled_answer_with_seed_is_the_same_in_a_batch(fp32_worker):
    sampled = job("Write a haiku about the sea.", temperature=0.9, seed=7, max_new_tokens=20)
    alone = fp32_worker.complete(sampled)
    results = [None] * 4
    jobs = [sampled, job(FRANCE), job("Name three colors."), job("Count to ten.")]

    def run(i):
        results[i] = fp32_worker.complete(jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert uncached(results[0]) == uncached(alone)


def test_stream_concatenates_to_the_plain_answer(worker):
    async def run():
        plain = [chunk async for chunk in worker.handle(job(FRANCE, max_new_tokens=40))]
        chunks = [chunk async for chunk in worker.handle({**job(FRANCE, max_new_tokens=40), "stream": True})]
        return plain, chunks

    plain, chunks = asyncio.run(run())
    assert len(plain) == 1 and len(chunks) > 3
    assert all(set(c) == {"delta"} for c in chunks[:-1])
    assert {"delta", "finish_reason", "usage", "model", "adapter"} <= set(chunks[-1])
    assert "".join(c["delta"] for c in chunks) == plain[0]["output"]
    assert uncached(chunks[-1]["usage"]) == uncached(plain[0]["usage"])


def test_stream_with_stop_string_never_leaks_the_stop_text(worker):
    async def run():
        return [c async for c in worker.handle({**job(FRANCE, max_new_tokens=40, stop=["Paris"]), "stream": True})]

    chunks = asyncio.run(run())
    assert "Paris" not in "".join(c["delta"] for c in chunks)
    assert chunks[-1]["finish_reason"] == "stop"


def test_collect_folds_a_stream_into_one_result(worker):
    plain = worker.complete(job(FRANCE, max_new_tokens=40))
    folded = asyncio.run(collect(worker.handle({**job(FRANCE, max_new_tokens=40), "stream": True})))
    assert uncached(folded) == uncached(plain)


def test_cancelled_request_leaves_the_batch(worker):
    async def run():
        stream = worker.handle({**job("Tell me a long story about dragons.", max_new_tokens=400), "stream": True})
        await stream.__anext__()
        await stream.aclose()  # what cancelling the handler's task does to the generator
        for _ in range(100):
            if worker.engine.running == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(run())
    assert "Paris" in worker.complete(job(FRANCE, max_new_tokens=32))["output"]


# ------------------------------------------------------------------ KV budget, chunked prefill, faults
def watch_running(worker, stop: threading.Event, seen: list[int]) -> threading.Thread:
    def watch():
        while not stop.is_set():
            seen.append(worker.engine.running)
            time.sleep(0.005)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def test_a_budget_for_four_sequences_serves_eight_jobs_four_at_a_time(started, fp32_worker):
    candidates = seed_tasks(120)
    lengths = [len(fp32_worker.prepare({"prompt_config": task})[1].prompt_ids) for task in candidates]
    ranked = sorted(range(len(candidates)), key=lengths.__getitem__)
    # 8 tasks of similar prompt length, so that no job needs a long answer to fill its sequence
    start = min(range(len(ranked) - 7), key=lambda i: lengths[ranked[i + 7]] - lengths[ranked[i]])
    tasks = [candidates[i] for i in ranked[start : start + 8]]
    prompts = [lengths[i] for i in ranked[start : start + 8]]
    per_job = -(-(max(prompts) + 12) // BLOCK_SIZE) * BLOCK_SIZE
    # every job's prompt + max_new_tokens is exactly one sequence of the budget
    jobs = [{"prompt_config": task, "generation_config": {"max_new_tokens": per_job - n}} for task, n in zip(tasks, prompts)]
    small = started(dtype="float32", kv_cache_tokens=4 * per_job)
    assert small.engine.capacity_tokens == 4 * per_job
    solo = [fp32_worker.complete(j) for j in jobs]
    stop, seen = threading.Event(), []
    watcher = watch_running(small, stop, seen)
    together = concurrently(small, jobs)
    stop.set()
    watcher.join()
    assert uncached(together) == uncached(solo)
    assert max(seen) <= 4 and 4 in seen


def test_a_job_that_can_never_fit_is_refused_with_both_numbers(started):
    small = started(dtype="float32", kv_cache_tokens=256)
    result = small.complete(job(FRANCE, max_new_tokens=300))
    prompt = len(small.prepare(job(FRANCE))[1].prompt_ids)
    assert result["error"].startswith("generation_config.max_new_tokens: ")
    assert f"({prompt} tokens) plus max_new_tokens (300)" in result["error"]
    assert "256 tokens" in result["error"]
    assert "Paris" in small.complete(job(FRANCE, max_new_tokens=32))["output"]


def test_a_running_stream_keeps_moving_while_a_burst_of_long_prompts_is_prefilled(worker):
    """Chunked prefill: 8 prompts of ~600 tokens are ~10 prefill budgets; the running stream gets
    tokens between those chunks instead of waiting for all of them."""
    long_prompt = " ".join(task["instruction"] for task in seed_tasks(40))
    burst = [job(f"{i}: {long_prompt}"[:2400], max_new_tokens=1) for i in range(8)]
    assert len(worker.prepare(burst[0])[1].prompt_ids) > 400

    async def scenario():
        arrivals = []

        async def stream():
            request = {**job("Tell me a long story about dragons.", max_new_tokens=300, min_new_tokens=300), "stream": True}
            async for chunk in worker.handle(request):
                arrivals.append(time.monotonic())

        streaming = asyncio.create_task(stream())
        while len(arrivals) < 3:
            await asyncio.sleep(0.01)
        started_at = time.monotonic()
        results = await asyncio.gather(*(collect(worker.handle(b)) for b in burst))
        ended_at = time.monotonic()
        streaming.cancel()
        return results, [t for t in arrivals if started_at < t < ended_at]

    results, during = asyncio.run(scenario())
    assert all(r["usage"]["completion_tokens"] == 1 for r in results)
    assert len(during) >= 5, f"the running stream got {len(during)} tokens while the burst was prefilled"


@pytest.fixture
def nan_for_poison(fp32_worker):
    """Make the model's logits NaN for rows whose input holds a poison token sequence."""
    with nan_logits(fp32_worker.loaded.model, fp32_worker.loaded.tokenizer):
        yield


def test_nan_logits_fail_only_their_row(fp32_worker, nan_for_poison):
    requests = [job(t["instruction"], max_new_tokens=20) for t in seed_tasks(3, skip=50)]
    solo = [fp32_worker.complete(r) for r in requests]
    results = concurrently(fp32_worker, [*requests, job(POISON, max_new_tokens=20)])
    assert uncached(results[:3]) == uncached(solo)
    assert "non-finite logits" in results[3]["error"]
    assert uncached(fp32_worker.complete(requests[0])) == uncached(solo[0])


def others_answer_as_alone_beside_a_caller_that_is_gone(worker, sink, skip: int) -> None:
    """Three requests answer as they do alone while a long request whose caller is gone (its
    ``sink`` fails) runs beside them, and the engine drops that request."""
    engine = worker.engine
    requests = [worker.prepare(job(t["instruction"], max_new_tokens=20))[1] for t in seed_tasks(3, skip=skip)]
    solo = [engine.generate(r).token_ids for r in requests]
    engine.submit(worker.prepare(job("Tell me a long story about dragons.", max_new_tokens=200, min_new_tokens=200))[1], sink)
    results = [None] * 3

    def run(i):
        results[i] = engine.generate(requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [r.token_ids for r in results] == solo
    deadline = time.monotonic() + 30
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == 0


def test_a_caller_that_disappears_mid_stream_costs_only_its_request(fp32_worker):
    calls = []

    def vanishing_sink(event):
        calls.append(event)
        if len(calls) >= 3:
            raise RuntimeError("Event loop is closed")  # what a sink whose caller has gone raises

    others_answer_as_alone_beside_a_caller_that_is_gone(fp32_worker, vanishing_sink, skip=60)
    assert len(calls) == 3, "no event may go to a caller that is gone"


def test_a_caller_whose_event_loop_closed_costs_only_its_request(fp32_worker):
    """Events for callers on an event loop go over in one call a step (``LoopSink``); a loop that
    has closed refuses them, and only its own request is dropped."""
    loop = asyncio.new_event_loop()
    delivered = []
    loop.close()
    others_answer_as_alone_beside_a_caller_that_is_gone(fp32_worker, LoopSink(loop, delivered.append), skip=70)
    assert delivered == []


def test_close_with_jobs_in_flight_answers_each_with_an_error(started):
    closing = started(dtype="float32", max_batch_size=2)
    requests = [job(f"Tell me a long story about {animal}.", max_new_tokens=400, min_new_tokens=400) for animal in ("cats", "dogs", "owls", "bees")]
    results = [None] * 4

    def run(i):
        results[i] = closing.complete(requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    while closing.engine.running < 2 or len(closing.engine.scheduler.waiting) < 2:  # all four submitted
        time.sleep(0.05)
    closing.close()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a job hung after close()"
    assert all("shutting down" in r["error"] for r in results), results
    assert "stopped" in closing.complete(job(FRANCE))["error"]


def test_a_job_for_a_busy_adapter_does_not_delay_a_base_job_behind_it(started, pirate_adapter, robot_adapter, tmp_path):
    for adapter in (pirate_adapter, robot_adapter):
        shutil.copytree(adapter, tmp_path / adapter.name)
    one_slot = started(dtype="float32", adapter_dir=tmp_path, max_loaded_adapters=1)
    finished = {}

    def run(name, request):
        one_slot.complete(request)
        finished[name] = time.monotonic()

    long_pirate = {**job("Tell me a long story about dragons.", max_new_tokens=120, min_new_tokens=120), "adapter": "pirate"}
    robot = {**job(FRANCE, max_new_tokens=8), "adapter": "robot"}
    base = job(FRANCE, max_new_tokens=8)
    threads = [threading.Thread(target=run, args=("pirate", long_pirate))]
    threads[0].start()
    while one_slot.engine.running == 0:
        time.sleep(0.02)
    for name, request in (("robot", robot), ("base", base)):
        threads.append(threading.Thread(target=run, args=(name, request)))
        threads[-1].start()
        time.sleep(0.2)
    for thread in threads:
        thread.join(timeout=180)
    assert finished["base"] < finished["pirate"] < finished["robot"]
