"""Generation through the engine: decoding settings, finish reasons, batching, streaming."""

import asyncio
import threading

from conftest import job, seed_tasks

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
    assert first == second


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


def test_eos_finish_stops_before_the_limit(worker):
    result = worker.complete(job(FRANCE, max_new_tokens=200))
    assert result["finish_reason"] == "eos"
    assert result["usage"]["completion_tokens"] < 200


def test_min_new_tokens_holds_back_end_of_sequence(worker):
    short = worker.complete(job(FRANCE, max_new_tokens=200))
    longer = worker.complete(job(FRANCE, max_new_tokens=200, min_new_tokens=short["usage"]["completion_tokens"] + 5))
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
    jobs = [{"prompt_config": task, "generation_config": {"max_new_tokens": 48}} for task in seed_tasks(12)]
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
    assert results[0] == alone


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
    assert chunks[-1]["usage"] == plain[0]["usage"]


def test_stream_with_stop_string_never_leaks_the_stop_text(worker):
    async def run():
        return [c async for c in worker.handle({**job(FRANCE, max_new_tokens=40, stop=["Paris"]), "stream": True})]

    chunks = asyncio.run(run())
    assert "Paris" not in "".join(c["delta"] for c in chunks)
    assert chunks[-1]["finish_reason"] == "stop"


def test_collect_folds_a_stream_into_one_result(worker):
    plain = worker.complete(job(FRANCE, max_new_tokens=40))
    folded = asyncio.run(collect(worker.handle({**job(FRANCE, max_new_tokens=40), "stream": True})))
    assert folded == plain


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
