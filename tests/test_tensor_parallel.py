"""Tensor parallel (``TENSOR_PARALLEL_SIZE``) on the CPU, over gloo: the worker starts its other
ranks itself, each keeps its shard, and rank 0's answers equal one device's.

The embedded model (9 heads, 3 KV heads) split over 3 ranks, through both doors, with mixed
adapters, sampling, structured output and the prefix cache (small models over 2 and 4 ranks, and
the faults of ranks: ``test_tensor_parallel_faults.py``). fp32: a different summation order can
only break a near tie, and where an answer differs the test shows it was one.
"""

import asyncio
import contextlib
import shutil
import time

import psutil
import pytest
import torch
from conftest import running, seed_tasks, uncached
from openai import AsyncOpenAI

from llm_worker.doors import jobs
from llm_worker.doors.app import create_app
from llm_worker.schema import InputError
from llm_worker.service import Worker
from llm_worker.settings import ServerSettings, Settings

SMALL = dict(dtype="float32", max_prefill_tokens=64, kv_cache_tokens=4096, max_batch_size=32)
SHARED = "You are the help desk of a large library. Answer briefly and kindly, in plain words. " * 5
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30}}, "required": ["answer"]}
NEAR_TIE = 1e-4


def ranks_alive() -> list[psutil.Process]:
    """This process's tensor-parallel ranks still running."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "llm_worker.parallel" in " ".join(child.cmdline()):
                found.append(child)
    return found


def no_rank_left(seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while ranks_alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, pirate_adapter, robot_adapter):
    folder = tmp_path_factory.mktemp("tp-adapters")
    for adapter, name in ((pirate_adapter, "pirate"), (robot_adapter, "robot")):
        shutil.copytree(adapter, folder / name)
    return folder


@pytest.fixture(scope="module")
def one_device(adapter_dir, base_model_dir):
    worker = Worker.start(Settings(adapter_dir=adapter_dir, **SMALL))
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def three_ranks(adapter_dir, base_model_dir):
    worker = Worker.start(Settings(adapter_dir=adapter_dir, tensor_parallel_size=3, **SMALL))
    assert worker.load_error is None, worker.load_error
    yield worker
    worker.close()
    assert no_rank_left(), "closing the worker ends every rank"


def greedy_tokens(worker, prompts: list[str], max_new_tokens: int = 24) -> list[list[int]]:
    """Each instruction's greedy tokens (the Alpaca template), all in flight together."""
    requests = [prompt_request(worker, p, max_new_tokens) for p in prompts]

    async def everything():
        return await asyncio.gather(*(collect(worker, request) for request in requests))

    return asyncio.run(everything())


def prompt_request(worker, instruction: str, max_new_tokens: int, adapter: str | None = None):
    job = {"prompt_config": {"instruction": instruction}, "generation_config": {"max_new_tokens": max_new_tokens}}
    return worker.prepare({**job, "adapter": adapter} if adapter else job)[1]


async def collect(worker, request) -> list[int]:
    async for event in worker.engine.stream(request):
        if hasattr(event, "token_ids"):
            return event.token_ids
    raise AssertionError("no completion")


def assert_same_or_near_tie(model, tokenizer, prompt: str, mine: list[int], reference: list[int], prompt_ids: list[int] | None = None) -> None:
    """Equal tokens, or at the first difference the reference model's two best logits are within
    ``NEAR_TIE``: a near tie broken by another summation order."""
    if mine == reference:
        return
    first = next(i for i, (a, b) in enumerate(zip(mine, reference)) if a != b)
    ids = (prompt_ids or tokenizer(prompt)["input_ids"]) + reference[:first]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    best = logits.topk(2).values
    assert {mine[first], reference[first]} <= set(logits.topk(2).indices.tolist())
    assert float(best[0] - best[1]) < NEAR_TIE, f"{prompt!r}: token {first} differs with a gap of {float(best[0] - best[1])}"


def test_three_ranks_answer_16_seed_tasks_as_one_device_does(three_ranks, one_device):
    prompts = [task["instruction"] for task in seed_tasks(16, skip=60)]
    split, whole = greedy_tokens(three_ranks, prompts, 16), greedy_tokens(one_device, prompts, 16)
    for prompt, mine, reference in zip(prompts, split, whole):
        ids = prompt_request(one_device, prompt, 16).prompt_ids
        assert_same_or_near_tie(one_device.loaded.model, one_device.loaded.tokenizer, prompt, mine, reference, ids)
    assert sum(a == b for a, b in zip(split, whole)) >= 14
    assert sum(len(tokens) for tokens in whole) > 16 * 8, "real answers, not an end token at once"


def event(instruction: str, adapter: str | None = None, **generation) -> dict:
    job = {"prompt_config": {"instruction": instruction}, "generation_config": generation, "stream": True}
    return {**job, "adapter": adapter} if adapter else job


def burst() -> dict[str, dict]:
    """Jobs that use what rank 0 keeps to itself (sampler, grammar, prefix cache, stop strings,
    logprobs) beside rows of two adapters and of none, in one batch."""
    tasks = [task["instruction"] for task in seed_tasks(6, skip=90)]
    return {
        "greedy": event(tasks[0], max_new_tokens=20),
        "seeded": event(tasks[1], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=11),
        "stop string": event(tasks[2], max_new_tokens=20, stop=["e"]),
        "logprobs": event(tasks[3], max_new_tokens=12, logprobs=2),
        "json schema": event(tasks[4], max_new_tokens=12, json_schema=ANSWER),
        "pirate": event(tasks[5], max_new_tokens=16, adapter="pirate"),
        "robot": event(tasks[0], max_new_tokens=16, adapter="robot"),
        "prefix a": event(SHARED + "Where are the maps?", max_new_tokens=12),
        "prefix b": event(SHARED + "When do you open?", max_new_tokens=12),
    }


def run_burst(worker) -> dict[str, list]:
    async def consume(name, job):
        async with contextlib.aclosing(jobs.handle(worker, job, f"tp-{name}")) as outputs:
            return [chunk async for chunk in outputs]

    async def everything():
        jobs_ = burst()
        return dict(zip(jobs_, await asyncio.gather(*(consume(name, job) for name, job in jobs_.items()))))

    return asyncio.run(everything())


def test_sampling_grammar_prefix_cache_and_mixed_adapters_through_the_runpod_door(three_ranks, one_device):
    split, whole = run_burst(three_ranks), run_burst(one_device)
    assert not [chunk for chunks in split.values() for chunk in chunks if chunk.get("error")]
    assert split["prefix b"][-1]["usage"].get("cached_tokens", 0) > 0
    assert split["stop string"][-1]["finish_reason"] == "stop"
    assert all("logprobs" in chunk for chunk in split["logprobs"] if chunk.get("delta"))
    assert_close(uncached(split), uncached(whole))  # logprobs summed in another order: equal within 1e-4
    assert uncached(run_burst(three_ranks))["seeded"] == uncached(split)["seeded"], "seeded sampling is the same run after run"


def assert_close(mine, reference, path: str = "") -> None:
    """Equal structures, numbers within 1e-4."""
    if isinstance(reference, float):
        assert mine == pytest.approx(reference, abs=1e-4), path
    elif isinstance(reference, dict):
        assert mine.keys() == reference.keys(), path
        for key in reference:
            assert_close(mine[key], reference[key], f"{path}.{key}")
    elif isinstance(reference, list):
        assert len(mine) == len(reference), path
        for i, (a, b) in enumerate(zip(mine, reference)):
            assert_close(a, b, f"{path}[{i}]")
    else:
        assert mine == reference, path


def test_mixed_adapters_answer_as_peft_does_on_one_model(three_ranks, adapter_dir, base_model_dir):
    """Each adapter's rows, in one batch with the other's, give the tokens of PEFT's own greedy
    ``generate`` on the whole model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = three_ranks.loaded.tokenizer
    instruction = seed_tasks(1, skip=120)[0]["instruction"]
    requests = [prompt_request(three_ranks, instruction, 16, name) for name in ("pirate", "robot")]
    ids = requests[0].prompt_ids
    prompt = tokenizer.decode(ids)

    async def both():
        return await asyncio.gather(*(collect(three_ranks, request) for request in requests))

    split = asyncio.run(both())
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir / "pirate", adapter_name="pirate")
    model.load_adapter(str(adapter_dir / "robot"), adapter_name="robot")
    for name, mine in zip(("pirate", "robot"), split):
        model.set_adapter(name)
        with torch.inference_mode():
            output = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        reference = output[0, len(ids):].tolist()
        assert_same_or_near_tie(model, tokenizer, prompt, mine, reference[: len(mine)], ids)
    assert split[0] != split[1], "the two adapters answer differently"


def test_the_http_door_streams_the_same_chat_and_prompt_logprobs_under_tensor_parallel(three_ranks, one_device):
    questions = [task["instruction"] for task in seed_tasks(3, skip=140)]

    async def chats(url):
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")

        async def one(question):
            stream = await client.chat.completions.create(
                model="base", messages=[{"role": "user", "content": question}], max_tokens=16, stream=True, temperature=0,
            )
            return [(c.choices[0].delta.content, c.choices[0].finish_reason) async for c in stream if c.choices]

        async def echoed():  # the prompt's own logprobs: a forward that keeps every position's logits
            answer = await client.completions.create(model="base", prompt=questions[0], max_tokens=4, echo=True, logprobs=1, temperature=0)
            return answer.choices[0].logprobs.model_dump()

        async with client:
            return await asyncio.gather(*(one(q) for q in questions)), await echoed()

    results = []
    for worker in (three_ranks, one_device):
        with running(create_app(worker, ServerSettings())) as url:
            results.append(asyncio.run(chats(url)))
    assert results[0][0] == results[1][0]
    assert results[0][1]["tokens"][:5] == results[1][1]["tokens"][:5] and len(results[0][1]["tokens"]) > 8
    assert_close(results[0][1], results[1][1])


def test_beam_search_is_refused_under_tensor_parallel_naming_the_field(three_ranks):
    with pytest.raises(InputError, match=r"generation_config.num_beams: beam search is not served with TENSOR_PARALLEL_SIZE=3"):
        three_ranks.prepare({"prompt_config": {"instruction": "Hi"}, "generation_config": {"num_beams": 2}})


def test_an_adapter_that_cannot_be_split_is_refused_when_loaded(three_ranks, adapter_dir, base_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)).save_pretrained(adapter_dir / "dora")
    chunks = run_job(three_ranks, event("Say hi.", adapter="dora", max_new_tokens=4))
    assert "DoRA (its magnitude normalises each whole weight) cannot be split over TENSOR_PARALLEL_SIZE=3 ranks" in chunks[-1]["error"]
    assert not run_job(three_ranks, event("Say hi.", max_new_tokens=4))[-1].get("error"), "the worker keeps serving"


def run_job(worker, job: dict) -> list:
    async def consume():
        async with contextlib.aclosing(jobs.handle(worker, job, "tp")) as outputs:
            return [chunk async for chunk in outputs]

    return asyncio.run(consume())
