"""Overlapping steps (``OVERLAP_STEPS``): each step launched before the previous one's tokens are
read back. Every caller sees exactly what it sees without them, chunk for chunk, on the CPU and on
a simulated GPU (the real embedded model in CUDA graphs' fixed shapes, each step timed by a queue
that makes the host wait for its tokens), through the RunPod door and the HTTP server.

One burst of jobs covers greedy, seeded sampling, stop strings, ``max_new_tokens``, the end token,
logprobs, penalties kept on the device, structured output and n-gram bans (steps that run one
after the other while they are in the batch), mixed adapters, a shared prefix (the prefix cache),
a job cancelled mid-stream and a job that fails alone (non-finite logits); through the HTTP server,
a chat whose thinking budget forces the close. fp32: a batch does not change an answer, so what
differs is the overlap's doing.
"""

import asyncio
import contextlib
import gc
import shutil
import time

import pytest
import torch
from conftest import OPENING, POISON, nan_logits, running, seed_tasks, template, uncached
from openai import AsyncOpenAI

from benchmarks.simulated_gpu import SimulatedGpu, StepTimes
from llm_worker.doors import jobs
from llm_worker.doors.app import create_app
from llm_worker.engine.forward import StepInputs, with_carried
from llm_worker.service import Worker, engine_config
from llm_worker.settings import ServerSettings, Settings

SHARED = "You are the help desk of a large library. Answer briefly and kindly, in plain words. " * 5
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30}}, "required": ["answer"]}
CANCEL_AFTER = 2  # chunks the cancelling caller reads before it leaves


def event(instruction: str, stream: bool = True, adapter: str | None = None, **generation) -> dict:
    job = {"prompt_config": {"instruction": instruction}, "generation_config": generation, "stream": stream}
    return {**job, "adapter": adapter} if adapter else job


def burst() -> dict[str, dict]:
    tasks = [task["instruction"] for task in seed_tasks(8, skip=20)]
    return {
        "greedy": event(tasks[0], max_new_tokens=28),
        "greedy, alpaca input": event(tasks[1], max_new_tokens=28),
        "seeded": event(tasks[2], max_new_tokens=28, temperature=0.9, top_p=0.9, seed=7),
        "stop string": event(tasks[3], max_new_tokens=28, stop=["e"]),
        "max_new_tokens": event(tasks[4], max_new_tokens=5),
        "end token": {**event("What is the capital of France?", max_new_tokens=120), "prompt_config": {
            "instruction": "What is the capital of France?", "stop_at_section": False}},
        "logprobs": event(tasks[5], max_new_tokens=20, logprobs=2),
        "penalties": event(tasks[6], max_new_tokens=24, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3),
        "json schema": event(tasks[7], max_new_tokens=12, json_schema=ANSWER),
        "n-gram bans": event(tasks[0], max_new_tokens=10, no_repeat_ngram_size=2),
        "pirate": event(tasks[1], max_new_tokens=16, adapter="pirate"),
        "robot": event(tasks[2], max_new_tokens=16, adapter="robot"),
        "prefix a": event(SHARED + "Where are the maps?", max_new_tokens=16),
        "prefix b": event(SHARED + "When do you open?", max_new_tokens=16),
        "fails alone": event(POISON, max_new_tokens=16),
        "cancelled": event(tasks[3], max_new_tokens=60),
    }


async def consume(worker, name: str, job: dict) -> list:
    """The job's chunks through the RunPod door; the cancelling caller leaves after a few."""
    chunks = []
    async with contextlib.aclosing(jobs.handle(worker, job, f"overlap-{name}")) as outputs:
        async for chunk in outputs:
            chunks.append(chunk)
            if name == "cancelled" and len(chunks) == CANCEL_AFTER:
                break
    return chunks


def run_burst(worker, overlap: bool) -> dict[str, list]:
    worker.engine.overlap = overlap
    jobs_ = burst()

    async def everything():
        results = await asyncio.gather(*(consume(worker, name, job) for name, job in jobs_.items()))
        return dict(zip(jobs_, results))

    try:
        results = asyncio.run(everything())
        deadline = time.monotonic() + 60
        while (worker.engine.running or worker.engine.launcher.inflight) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.engine.running == 0, "the cancelled job must leave the batch"
        return results
    finally:
        worker.engine.overlap = False


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, pirate_adapter, robot_adapter, base_model_dir):
    """The two test adapters, the pirate again as "parrot" (its first load comes mid-flight), and
    as "opener", whose chat template opens the thinking (a thinking budget closes it)."""
    folder = tmp_path_factory.mktemp("overlap-adapters")
    for adapter, name in ((pirate_adapter, "pirate"), (robot_adapter, "robot"), (pirate_adapter, "parrot"), (pirate_adapter, "opener")):
        shutil.copytree(adapter, folder / name)
    (folder / "opener" / "chat_template.jinja").write_text(template(base_model_dir, OPENING))
    return folder


def settings(adapter_dir, **more) -> Settings:
    return Settings(dtype="float32", adapter_dir=adapter_dir, max_prefill_tokens=64, kv_cache_tokens=4096, max_batch_size=32, **more)


def serving(worker):
    """``worker`` with NaN logits for the poison prompt, closed at the end."""
    with nan_logits(worker.loaded.model, worker.loaded.tokenizer):
        yield worker
    worker.close()
    gc.collect()  # the next module's workers get this one's memory


@pytest.fixture(scope="module")
def cpu_worker(adapter_dir, base_model_dir):
    yield from serving(Worker.start(settings(adapter_dir)))


@pytest.fixture(scope="module")
def simulated_worker(adapter_dir, base_model_dir):
    """The real model on a simulated GPU whose steps take 30 ms each: the host waits for tokens."""
    yield from serving(Worker.start(settings(adapter_dir), device=SimulatedGpu(StepTimes(weights_ms=30.0))))


def check_coverage(results: dict[str, list]) -> None:
    """The burst did what it claims: each case ended as it should, the second shared prefix was
    found in the prefix cache."""
    assert results["prefix b"][-1]["usage"].get("cached_tokens", 0) > 0
    reason = {name: chunks[-1].get("finish_reason") for name, chunks in results.items()}
    assert reason["stop string"] == "stop" and reason["max_new_tokens"] == "length" and reason["end token"] == "eos"
    assert "non-finite logits" in results["fails alone"][-1]["error"]
    assert len(results["cancelled"]) == CANCEL_AFTER
    assert all("logprobs" in chunk for chunk in results["logprobs"] if chunk.get("delta"))
    assert all(not chunk.get("error") for name, chunks in results.items() if name != "fails alone" for chunk in chunks)


@pytest.mark.parametrize("where", ["cpu", "simulated GPU"])
def test_overlapping_steps_give_every_caller_the_same_chunks(where, cpu_worker, simulated_worker):
    worker = cpu_worker if where == "cpu" else simulated_worker
    inflight = worker.engine.launcher.inflight
    before = inflight.overlapped
    sequential = run_burst(worker, overlap=False)
    assert inflight.overlapped == before, "one step after the other: every launch read back before the next"
    overlapping = run_burst(worker, overlap=True)
    check_coverage(sequential)
    assert uncached(overlapping) == uncached(sequential)  # how much of a prompt was cached depends on timing
    assert inflight.overlapped > before, "no step was launched before the previous one was read"


def test_an_adapter_loaded_while_steps_are_in_flight_changes_no_answer(cpu_worker):
    """The parrot adapter's first job arrives while a base job decodes with its steps in flight:
    loading it changes the model, and the steps in flight are read back before its graphs are
    dropped. It answers as the pirate (the same weights) does without overlap."""
    tasks = [task["instruction"] for task in seed_tasks(2, skip=50)]
    base, parrot = event(tasks[0], max_new_tokens=40), event(tasks[1], max_new_tokens=12, adapter="parrot")
    expected = [asyncio.run(consume(cpu_worker, "base", base)), asyncio.run(consume(cpu_worker, "pirate", {**parrot, "adapter": "pirate"}))]

    async def both():
        chunks = []
        async with contextlib.aclosing(jobs.handle(cpu_worker, base, "base")) as outputs:
            async for chunk in outputs:
                if not chunks:  # decoding now, a step in flight at every moment
                    adapted = asyncio.ensure_future(consume(cpu_worker, "parrot", parrot))
                chunks.append(chunk)
        return [chunks, await adapted]

    cpu_worker.engine.overlap = True
    try:
        overlapped = asyncio.run(both())
    finally:
        cpu_worker.engine.overlap = False
    assert [c.get("adapter") for c in overlapped[1] if "usage" in c] == ["parrot"]
    overlapped[1] = [{**c, "adapter": "pirate"} if "adapter" in c else c for c in overlapped[1]]
    assert uncached(overlapped) == uncached(expected)


def test_the_simulated_gpu_answers_as_the_cpu(cpu_worker, simulated_worker):
    """Its fixed shapes (rows and contexts padded, carried tokens written into the captured step's
    buffers) change no answer in fp32."""
    job = event(seed_tasks(1, skip=30)[0]["instruction"], max_new_tokens=20)
    simulated_worker.engine.overlap = True
    try:
        assert uncached(asyncio.run(consume(simulated_worker, "one", job))) == uncached(asyncio.run(consume(cpu_worker, "one", job)))
    finally:
        simulated_worker.engine.overlap = False


def test_the_http_door_streams_the_same_chat_with_and_without_overlap(simulated_worker):
    questions = [task["instruction"] for task in seed_tasks(4, skip=40)]

    async def chats(url):
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")

        async def one(question, seed):
            stream = await client.chat.completions.create(
                model="base", messages=[{"role": "user", "content": question}], max_tokens=16, stream=True,
                temperature=0.8, seed=seed, logprobs=True, top_logprobs=1,
            )
            return [(c.choices[0].delta.content, c.choices[0].finish_reason) async for c in stream if c.choices]

        async def thinks(question):  # its steps run one after the other until the budget's close is written
            stream = await client.chat.completions.create(model="opener", messages=[{"role": "user", "content": question}], max_tokens=24,
                                                          stream=True, temperature=0, extra_body={"thinking_token_budget": 5})
            return [(getattr(c.choices[0].delta, "reasoning_content", None), c.choices[0].delta.content, c.choices[0].finish_reason)
                    async for c in stream if c.choices]

        async with client:
            return await asyncio.gather(*(one(q, i) for i, q in enumerate(questions)), thinks(questions[0]))

    with running(create_app(simulated_worker, ServerSettings())) as url:
        results = {}
        for overlap in (False, True):
            simulated_worker.engine.overlap = overlap
            try:
                results[overlap] = asyncio.run(chats(url))
            finally:
                simulated_worker.engine.overlap = False
    assert results[True] == results[False]
    assert all(chunks[-1][-1] in ("stop", "length") for chunks in results[True])
    thought = [chunk for chunk in results[True][-1] if chunk[0]]
    assert thought and any(chunk[1] for chunk in results[True][-1][len(thought):])  # it thought, then answered


def test_a_carried_token_is_read_from_the_device_where_the_input_id_points():
    carry = torch.tensor([11, -1, 13])  # -1: a row whose logits were not finite
    ids = torch.tensor([[5], [-1], [-2], [-3]])
    assert with_carried(ids, carry).tolist() == [[5], [11], [0], [13]]
    assert with_carried(ids, None) is ids


def test_the_simulated_gpu_returns_from_a_launch_at_once_and_makes_a_read_wait_for_the_step():
    times = StepTimes(weights_ms=500.0, kv_bytes_per_token=1000, bandwidth_gb_s=1.0)  # 1 us a token of context
    gpu = SimulatedGpu(times)
    step = StepInputs([[1], [2]], [[99], [199]], [0, 0], [[1], [2]])  # contexts of 100 and 200 tokens
    seconds = times.seconds(step)
    assert seconds == pytest.approx(0.5 + 300e-6)
    started = time.perf_counter()
    with gpu.step(step):
        first = gpu.readback(torch.tensor([7, 8]))
    with gpu.step(step):
        second = gpu.readback(torch.tensor([9]))
    assert time.perf_counter() < first.ready_at, "the launches returned before the first step's work was done"
    assert first.ready_at >= started + seconds and second.ready_at >= first.ready_at + seconds, "steps run one after the other"
    assert second.values() == [9]
    assert time.perf_counter() >= second.ready_at, "reading a step's tokens waits for its end"
    assert first.values() == [7, 8]
    assert gpu.busy_seconds() == pytest.approx(2 * seconds)


def test_overlapping_steps_are_a_setting_off_unless_asked_for():
    assert Settings(overlap_steps="on").overlap_steps == "on"
    assert engine_config(Settings(overlap_steps="on"), 4096).overlap_steps
    assert not engine_config(Settings(overlap_steps="auto"), 4096).overlap_steps
    assert not engine_config(Settings(overlap_steps="off"), 4096).overlap_steps


def test_the_http_servers_process_freezes_its_heap_once_the_model_is_loaded_and_a_tests_does_not():
    """A full garbage collection of a loaded worker's heap stalls every stream (~225 ms here); the
    server's own process serves one worker until it exits, so it freezes the heap after the load."""
    from llm_worker.doors.server import build

    assert build(ServerSettings()).state.door.freeze_after_load
    assert not create_app(config=ServerSettings()).state.door.freeze_after_load
