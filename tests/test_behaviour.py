"""What a demanding user sees, through ``Worker`` and the handler only, so it holds for any engine.

No model output is hard-coded: an answer is compared with the same job run alone (greedy in
fp32, where a batch must not change an answer) or checked for a property. The only thing looked
at besides outputs is ``worker.engine.running``, the number of requests in the running batch.
Waits are bounded, so a bug fails a test instead of hanging the suite; time is never compared
with a fixed budget, because other processes share this machine's cores.
"""

import asyncio
import shutil
import threading
import time

import pytest
from conftest import concurrently, seed_tasks, uncached

from llm_worker.service import Worker, collect
from llm_worker.settings import Settings

FRANCE = "What is the capital of France?"
STORY = "Tell me a long story about dragons."
WAIT = 120  # seconds: the most any single wait below may take before the test fails


def event(instruction: str, input: str = "", template: str = "alpaca", stream: bool = False, **generation) -> dict:
    prompt = {"instruction": instruction, "input": input, "template": template}
    return {"prompt_config": prompt, "generation_config": generation, "stream": stream}


def streamed(worker, job: dict) -> list[dict]:
    async def consume():
        return [chunk async for chunk in worker.handle({**job, "stream": True})]

    return asyncio.run(consume())


def joined(chunks: list[dict]) -> str:
    return "".join(chunk["delta"] for chunk in chunks)


def in_background(work) -> tuple[threading.Thread, list]:
    """Run ``work()`` in a daemon thread (a hung call must not keep the test process alive)."""
    box = []
    thread = threading.Thread(target=lambda: box.append(work()), daemon=True)
    thread.start()
    return thread, box


async def until(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        await asyncio.sleep(0.005)


@pytest.fixture(scope="module")
def narrow_worker(base_model_dir):
    """fp32 (a batch does not change a greedy answer) with room for only two running requests."""
    worker = Worker.start(Settings(dtype="float32", max_batch_size=2))
    yield worker
    worker.close()


# ------------------------------------------------------------------------------ templates
def test_alpaca_answer_ends_where_a_new_section_starts(fp32_worker):
    """`make run`'s answer used to go on into '### Explanation:'; the job can still ask for that.
    In fp32: the precondition holds for the fp32 answer, not for the bf16 one."""
    runs_on = event(FRANCE, max_new_tokens=24)
    runs_on["prompt_config"]["stop_at_section"] = False
    kept = fp32_worker.complete(runs_on)
    assert "\n### " in kept["output"], "precondition: without the section end this answer runs on"
    answer = fp32_worker.complete(event(FRANCE, max_new_tokens=24))
    assert answer["output"] == kept["output"][: kept["output"].index("\n### ")].strip()
    assert answer["finish_reason"] == "stop"
    assert joined(streamed(fp32_worker, event(FRANCE, max_new_tokens=24))) == answer["output"]


def test_chat_template_on_a_model_without_one_is_a_named_input_error(started, base_model_dir, tmp_path):
    """A base LLaMA has no chat template: the job gets a one-line error naming the field."""
    folder = tmp_path / "no-chat-template"
    folder.mkdir()
    for path in base_model_dir.iterdir():
        if path.name not in ("chat_template.jinja", "tokenizer_config.json"):
            (folder / path.name).symlink_to(path)
    config = (base_model_dir / "tokenizer_config.json").read_text()
    assert "chat_template" not in config, "the chat template must only live in chat_template.jinja"
    shutil.copy(base_model_dir / "tokenizer_config.json", folder)
    worker = started(base_model=str(folder))
    plain = worker.complete(event(FRANCE, template="chat"))
    assert set(plain) == {"error"} and plain["error"].startswith("prompt_config.template: ")
    assert "\n" not in plain["error"]
    assert uncached(streamed(worker, event(FRANCE, template="chat"))) == uncached([plain])
    assert "Paris" in worker.complete(event(FRANCE, max_new_tokens=24))["output"]


# ------------------------------------------------------------------------------ lengths
def test_default_max_new_tokens_respects_a_lower_limit(started):
    worker = started(max_new_tokens_limit=6)
    result = worker.complete(event(STORY))
    assert result["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 6


CUTS = range(1, 17)


def test_answer_cut_inside_a_multibyte_character_drops_the_partial_character(fp32_worker):
    """Byte-level tokens split Japanese characters; a cut between their bytes must not show U+FFFD."""
    jobs = [event("Say good night in Japanese.", template="chat", max_new_tokens=n) for n in CUTS]
    plain = concurrently(fp32_worker, jobs)

    async def chunks_of(job):
        return [chunk async for chunk in fp32_worker.handle({**job, "stream": True})]

    async def stream_all():
        return await asyncio.gather(*(chunks_of(j) for j in jobs))

    streams = asyncio.run(stream_all())
    full = plain[-1]["output"]
    assert sum(ord(char) > 0x3000 for char in full) >= 3, "precondition: the answer is in Japanese"
    for n, result, chunks in zip(CUTS, plain, streams):
        assert result["usage"]["completion_tokens"] == n
        assert "\ufffd" not in result["output"], f"max_new_tokens={n}: {result['output']!r}"
        assert full.startswith(result["output"])
        assert all("\ufffd" not in chunk["delta"] for chunk in chunks), f"max_new_tokens={n}"
        assert joined(chunks) == result["output"]


# ------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize(
    "job",
    [
        event("Say good night in Japanese.", template="chat", max_new_tokens=24),
        event("Write three emoji that describe the ocean.", max_new_tokens=24),
        event("Write a sentence in French about café and crème brûlée.", max_new_tokens=32),
    ],
    ids=["japanese", "emoji", "accents"],
)
def test_non_ascii_deltas_join_exactly_to_the_answer(worker, job):
    answer = worker.complete(job)
    chunks = streamed(worker, job)
    assert any(ord(char) > 0x7F for char in answer["output"]), "precondition: the answer is not plain ASCII"
    assert joined(chunks) == answer["output"]
    assert not any("\ufffd" in chunk["delta"] for chunk in chunks)
    assert uncached(chunks[-1]["usage"]) == uncached(answer["usage"]) and chunks[-1]["finish_reason"] == answer["finish_reason"]


WATER = event("Describe the water cycle.", max_new_tokens=40)


def with_stop(job: dict, *stop: str) -> dict:
    return {**job, "generation_config": {**job["generation_config"], "stop": list(stop)}}


def test_a_stop_string_over_several_tokens_cuts_exactly_and_is_never_streamed(worker):
    free = joined(streamed(worker, WATER))
    start = len(free) // 2
    while not (free[start - 1].isalnum() and free[start].isalnum()):  # begin inside a word
        start += 1
    stop = free[start : start + 12]
    assert len(stop.split()) >= 2, "precondition: the stop string spans several words"
    cut = free[: free.index(stop)].strip()
    chunks = streamed(worker, with_stop(WATER, stop))
    assert chunks[-1]["finish_reason"] == "stop"
    assert joined(chunks) == cut  # deltas cannot be taken back, so no part of the stop was sent
    plain = worker.complete(with_stop(WATER, stop))
    assert plain["output"] == cut


def test_a_held_back_partial_stop_string_is_released_when_it_does_not_complete(worker):
    free = streamed(worker, WATER)
    text = joined(free)
    almost = text[len(text) // 2 : len(text) // 2 + 6] + "\u2603"  # the model never writes the snowman
    chunks = streamed(worker, with_stop(WATER, almost, "\u2603\u2603"))
    assert joined(chunks) == text
    assert chunks[-1]["finish_reason"] == free[-1]["finish_reason"]


# ------------------------------------------------------------------------------ batches
def test_seeded_sampled_jobs_in_one_batch_give_their_solo_answers(fp32_worker):
    haiku = event("Write a haiku about the sea.", temperature=0.9, seed=7, max_new_tokens=20)
    colors = event("Name some colors.", temperature=1.1, top_k=40, top_p=0.9, seed=99, max_new_tokens=20)
    alone = [fp32_worker.complete(haiku), fp32_worker.complete(colors)]
    assert uncached(fp32_worker.complete(haiku)) == uncached(alone[0]), "the same seed twice gives the same answer"
    together = concurrently(fp32_worker, [haiku, colors, haiku, event(FRANCE, max_new_tokens=20)])
    assert uncached(together[:3]) == uncached([alone[0], alone[1], alone[0]])


@pytest.mark.parametrize(
    "sampling",
    [{"top_k": 1}, {"top_p": 1e-9}, {"top_p": 1e-300}, {"temperature": 1e-4}, {"temperature": 1e-300}],
    ids=["top_k=1", "top_p=1e-9", "top_p=1e-300", "temperature=1e-4", "temperature=1e-300"],
)
def test_sampling_that_can_only_pick_the_most_likely_token_gives_the_greedy_answer(fp32_worker, sampling):
    haiku = "Write a haiku about the sea."
    greedy = fp32_worker.complete(event(haiku, max_new_tokens=12))
    sampled = fp32_worker.complete(event(haiku, max_new_tokens=12, do_sample=True, seed=3, **sampling))
    assert sampled["output"] == greedy["output"]


def test_more_jobs_than_max_batch_size_queue_and_all_get_their_own_answer(narrow_worker):
    jobs = [event(**task, max_new_tokens=12) for task in seed_tasks(7, skip=20)]
    solo = [narrow_worker.complete(j) for j in jobs]
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.add(narrow_worker.engine.running)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    together = concurrently(narrow_worker, jobs)
    done.set()
    watcher.join()
    assert uncached(together) == uncached(solo)
    assert max(seen) == 2, f"the batch held {sorted(seen)} requests; MAX_BATCH_SIZE is 2"


# ------------------------------------------------------------------------------ cancellation
def test_a_cancelled_job_stops_frees_its_slot_and_leaves_the_others_unchanged(narrow_worker):
    """Two slots: a long job and A run, B waits. Cancelling the long job lets B start while A is
    still running, the long job makes no more tokens, and A and B answer as they do alone."""
    a = event(**seed_tasks(1, skip=30)[0], max_new_tokens=40, min_new_tokens=40)
    b = event(**seed_tasks(1, skip=31)[0], max_new_tokens=12)
    solo_a, solo_b = narrow_worker.complete(a), narrow_worker.complete(b)
    long_job = event(STORY, stream=True, max_new_tokens=1500, min_new_tokens=1500)

    async def scenario():
        long_deltas, a_chunks, b_chunks = [], [], []

        async def consume(job, into):
            async for chunk in narrow_worker.handle({**job, "stream": True}):
                into.append(chunk)

        long_task = asyncio.create_task(consume(long_job, long_deltas))
        await until(lambda: len(long_deltas) >= 3, "the long job's first deltas")
        a_task = asyncio.create_task(consume(a, a_chunks))
        await until(lambda: a_chunks, "A's first delta")
        b_task = asyncio.create_task(consume(b, b_chunks))
        await asyncio.sleep(0.2)
        assert not b_chunks, "precondition: B waits while both slots are taken"
        long_task.cancel()  # what the RunPod SDK does to cancel a job
        await until(lambda: b_chunks or a_task.done(), "B's start or A's end")
        assert not a_task.done(), "B did not start until A ended: the cancelled job kept its slot"
        await asyncio.wait_for(asyncio.gather(a_task, b_task), WAIT)
        await until(lambda: narrow_worker.engine.running == 0, "the cancelled job to leave the batch", timeout=10)
        return a_chunks, b_chunks

    a_chunks, b_chunks = asyncio.run(scenario())
    for chunks, solo in ((a_chunks, solo_a), (b_chunks, solo_b)):
        assert joined(chunks) == solo["output"]
        assert uncached(chunks[-1]["usage"]) == uncached(solo["usage"])


# ------------------------------------------------------------------------------ shutdown
def test_close_with_jobs_in_flight_answers_each_with_an_error(started):
    worker = started(max_batch_size=2)
    jobs = [event(STORY, max_new_tokens=1000, min_new_tokens=1000) for _ in range(3)]  # two run, one waits
    calls = [in_background(lambda j=j: worker.complete(j)) for j in jobs]
    deadline = time.monotonic() + WAIT
    while worker.engine.running < 2:
        assert time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.01)
    closing, _ = in_background(worker.close)
    closing.join(WAIT)
    assert not closing.is_alive(), "close() hung"
    for thread, box in calls:
        thread.join(30)
        assert not thread.is_alive(), "a job in flight at close() never got an answer"
        (result,) = box
        assert set(result) == {"error"} and "\n" not in result["error"], result
    late, box = in_background(lambda: worker.complete(event(FRANCE)))
    late.join(30)
    assert not late.is_alive() and set(box[0]) == {"error"}, "a job after close() must get an error"


# ------------------------------------------------------------------------------ beam search
BEAMS = event(STORY, num_beams=4, max_new_tokens=200, min_new_tokens=200)


def test_beam_search_ends_at_max_job_seconds(started):
    worker = started(max_job_seconds=1.0)
    thread, box = in_background(lambda: worker.complete(BEAMS))
    thread.join(WAIT)
    assert not thread.is_alive()
    (result,) = box
    assert result["finish_reason"] == "time_limit", result
    assert 0 < result["usage"]["completion_tokens"] < 200


def test_cancelled_beam_search_stops_and_lets_other_jobs_run(started):
    worker = started()
    short = event(FRANCE, max_new_tokens=8)
    worker.complete(short)  # warm up
    began = time.perf_counter()
    alone = worker.complete(short)
    alone_seconds = time.perf_counter() - began

    async def scenario():
        beam_task = asyncio.create_task(collect(worker.handle(BEAMS)))
        await asyncio.sleep(0.5)
        assert not beam_task.done(), "precondition: the beam search is still running"
        beam_task.cancel()
        began = time.perf_counter()
        answer = await asyncio.wait_for(collect(worker.handle(short)), WAIT)
        return answer, time.perf_counter() - began

    answer, seconds = asyncio.run(scenario())
    assert uncached(answer) == uncached(alone)
    # the remaining beam search takes many times longer than the short job: waiting for it shows
    assert seconds < 5 * alone_seconds + 2.0, f"{seconds:.1f} s after cancelling, against {alone_seconds:.1f} s alone"
