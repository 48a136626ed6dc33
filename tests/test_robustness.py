"""Robustness: adversarial input, injected faults, a burst of load, and secrets."""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ROOT, concurrently, job, post, seed_tasks, serve_api, uncached
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_worker.model.prompts import template_names
from llm_worker.schema import InputError, JobInput, Limits, ListAdaptersInput, parse_job_input
from llm_worker.service import Worker
from llm_worker.settings import Settings

FRANCE = "What is the capital of France?"
OUTPUT_KEYS = {"output", "finish_reason", "usage", "model", "adapter"}
FINISH_REASONS = {"eos", "length", "stop", "time_limit"}
DEFAULTS = Settings()
HANDLER_LIMITS = Limits(  # the handler's worker runs with the default settings
    max_input_bytes=DEFAULTS.max_input_bytes,
    max_new_tokens=DEFAULTS.max_new_tokens_limit,
    max_stop_strings=DEFAULTS.max_stop_strings,
    max_stop_chars=DEFAULTS.max_stop_chars,
)
# Refusals that need the model (prompt length in tokens, adapters): the only errors a job that the
# schema accepts may get. Anything else, "generation failed: ..." or "engine error: ..." above
# all, is the worker failing a valid job.
MODEL_CHECKS = ("prompt_config: the prompt is ", "adapter: ")


@pytest.fixture(scope="module")
def handler_module():
    """The real handler module, as RunPod imports it (it loads its own worker)."""
    import handler

    return handler


def run_job(handler_module, event) -> list:
    async def consume():
        return [chunk async for chunk in handler_module.handler({"id": "fuzz", "input": event})]

    return asyncio.run(consume())


def check_outcome(event, chunks: list) -> None:
    """An input the schema refuses gets exactly the schema's one-line error naming the field; an
    input it accepts gets a well-formed answer, or one of the refusals that need the model."""
    assert chunks and all(isinstance(chunk, dict) for chunk in chunks)
    if isinstance(event, dict) and "openai_route" in event:  # the OpenAI door answers in OpenAI's error shape
        if "error" in chunks[0]:
            error = chunks[0]["error"]
            assert len(chunks) == 1 and error["type"] and len(error["message"].splitlines()) == 1, error
        return
    try:
        job, refusal = parse_job_input(event, HANDLER_LIMITS), None
    except InputError as err:
        job, refusal = None, str(err)
    if "error" in chunks[0]:
        assert len(chunks) == 1
        error = chunks[0]["error"]
        assert len(error.splitlines()) == 1, error
        if refusal is None:
            assert error.startswith(MODEL_CHECKS), f"a valid input failed: {error}"
        else:
            assert error == refusal
        return
    assert refusal is None, f"answered an input the schema refuses ({refusal})"
    if isinstance(job, ListAdaptersInput):
        assert len(chunks) == 1
        return
    check_answer(job, chunks)


def check_answer(job: JobInput, chunks: list) -> None:
    """The shapes of the README: one result, or deltas and a closing chunk; ``choices`` with n > 1."""
    config = job.generation_config
    final = chunks[-1]
    assert set(final["usage"]) == {"prompt_tokens", "completion_tokens"}
    assert {"model", "adapter"} <= set(final)
    extra = {"logprobs"} if config.logprobs is not None else set()
    if config.n == 1:
        assert final["finish_reason"] in FINISH_REASONS
        if job.stream:
            assert all(set(chunk) == {"delta"} | extra for chunk in chunks[:-1])
        else:
            assert len(chunks) == 1 and set(final) == OUTPUT_KEYS | extra
        return
    if job.stream:
        endings = {chunk["index"]: chunk["finish_reason"] for chunk in chunks[:-1] if "finish_reason" in chunk}
    else:
        assert len(chunks) == 1
        endings = {choice["index"]: choice["finish_reason"] for choice in final["choices"]}
    assert sorted(endings) == list(range(config.n)), "every answer ends exactly once"
    assert set(endings.values()) <= FINISH_REASONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=24,
)
adversarial = st.one_of(
    json_values,
    st.sampled_from(
        [
            float("nan"), float("inf"), -float("inf"), -1, 0, 10**30, -(10**30), 2**63, "", "\ud800", "a\udfffb",
            "x" * 1_100_000, "word " * 30_000, [], {}, [[[[[[[]]]]]]], True, "12", 1e308,
        ]
    ),
)
GENERATION_FIELDS = [
    "temperature", "top_p", "top_k", "num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty",
    "no_repeat_ngram_size", "do_sample", "seed", "stop",
]


@st.composite
def near_valid_events(draw):
    """A valid small event with one or two parts replaced by something adversarial."""
    event = {
        "prompt_config": {"instruction": draw(st.sampled_from([FRANCE, "Name a color.", "Count to 3."]))},
        "generation_config": {"max_new_tokens": draw(st.integers(1, 4))},
        "stream": draw(st.booleans()),
    }
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(["prompt", "generation", "top", "adapter"]))
        if where == "prompt" and isinstance(event["prompt_config"], dict):
            event["prompt_config"][draw(st.sampled_from(["instruction", "input", "template", "extra"]))] = draw(adversarial)
        elif where == "generation" and isinstance(event["generation_config"], dict):
            event["generation_config"][draw(st.sampled_from([*GENERATION_FIELDS, "bogus"]))] = draw(adversarial)
        elif where == "top":
            event[draw(st.sampled_from(["prompt_config", "generation_config", "stream", "extra"]))] = draw(adversarial)
        elif where == "adapter":
            event["adapter"] = draw(adversarial)
    if isinstance(event.get("generation_config"), dict):
        tokens = event["generation_config"].get("max_new_tokens")
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 4:
            event["generation_config"]["max_new_tokens"] = 4  # keep accepted jobs short: the schema bounds are tested elsewhere
    return event


utf8_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
positive = {"allow_nan": False, "allow_infinity": False, "exclude_min": True, "min_value": 0.0}


@st.composite
def valid_events(draw):
    """Any input the schema accepts, with few new tokens (they all cost model time)."""
    tokens = draw(st.integers(1, 4))
    generation = {
        "max_new_tokens": tokens,
        "min_new_tokens": draw(st.integers(0, tokens)),
        "num_beams": draw(st.integers(1, 8)),
        "repetition_penalty": draw(st.floats(max_value=10.0, **positive)),
        "no_repeat_ngram_size": draw(st.integers(0, 64)),
        "stop": draw(st.lists(utf8_text.filter(lambda text: 1 <= len(text) <= 200), max_size=3)),
    }
    if draw(st.booleans()):
        generation["temperature"] = draw(st.floats(max_value=5.0, **positive))
        generation["top_p"] = draw(st.floats(max_value=1.0, **positive))
        generation["top_k"] = draw(st.integers(0, 100_000))
        generation["seed"] = draw(st.integers(0, 2**63 - 1))
        generation["do_sample"] = True
    if draw(st.booleans()):
        generation["n"] = draw(st.integers(1, 16))
    if generation["num_beams"] == 1 and draw(st.booleans()):
        generation["logprobs"] = draw(st.integers(0, 20))
    prompt = {
        "instruction": draw(utf8_text.filter(str.strip)),
        "input": draw(utf8_text),
        "template": draw(st.sampled_from(template_names())),
        "stop_at_section": draw(st.booleans()),
    }
    optional = {"stream": st.booleans(), "adapter": st.just("base")}
    return {"prompt_config": prompt, "generation_config": generation} | {
        key: draw(value) for key, value in optional.items() if draw(st.booleans())
    }


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(event=json_values)
def test_any_json_input_gets_an_answer_or_a_named_error(handler_module, event):
    check_outcome(event, run_job(handler_module, event))


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(event=near_valid_events())
def test_adversarial_variations_of_valid_events(handler_module, event):
    check_outcome(event, run_job(handler_module, event))


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(event=valid_events())
def test_every_valid_input_gets_an_answer(handler_module, event):
    chunks = run_job(handler_module, event)
    assert "error" not in chunks[0], chunks[0]
    check_outcome(event, chunks)


def test_no_state_is_corrupted_by_the_fuzzing(handler_module, worker):
    """Runs after the fuzz tests (file order): the same greedy answer as a fresh worker of the same settings."""
    event = job(FRANCE, max_new_tokens=24)
    assert uncached(run_job(handler_module, event)) == uncached([worker.complete(event)])


def test_payload_size_is_bounded(worker):
    error = worker.complete(job("x" * (worker.settings.max_input_bytes + 1)))["error"]
    assert re.fullmatch(r"input: \d+ bytes exceeds MAX_INPUT_BYTES=1000000", error)


@pytest.mark.parametrize("field", ["instruction", "input"])
def test_lone_surrogates_are_refused_with_the_field(worker, field):
    event = {"prompt_config": {"instruction": "hello", field: "\ud800"}}
    assert worker.complete(event)["error"].startswith(f"prompt_config.{field}: ")


def test_concurrency_limit_comes_from_the_environment():
    env = {**os.environ, "MAX_CONCURRENCY": "5", "BASE_MODEL": "/nonexistent"}
    code = "import handler; print(handler.concurrency_modifier(1))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "5"


# ----------------------------------------------------------------------------------- faults
@pytest.fixture
def faulty_forward(fp32_worker):
    """Make the model's forward raise out-of-memory when ``trigger(input_ids)`` says so."""
    model = fp32_worker.engine.model
    original = model.forward
    triggers = []

    def forward(*args, **kwargs):
        input_ids = kwargs.get("input_ids")
        if any(trigger(input_ids) for trigger in triggers):
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return original(*args, **kwargs)

    model.forward = forward
    yield triggers
    del model.forward


def test_out_of_memory_in_one_prefill_fails_only_that_job(fp32_worker, faulty_forward):
    poison = fp32_worker.loaded.tokenizer("Zebra-quokka-poison", add_special_tokens=False)["input_ids"]

    def poisoned_prompt(input_ids):
        size = len(poison)
        rows = input_ids.tolist() if input_ids.shape[1] > 1 else []
        return any(row[i : i + size] == poison for row in rows for i in range(len(row) - size + 1))

    requests = [job(t["instruction"], max_new_tokens=24) for t in seed_tasks(4)] + [job("Zebra-quokka-poison", max_new_tokens=24)]
    solo = [fp32_worker.complete(r) for r in requests[:4]]
    faulty_forward.append(poisoned_prompt)
    results = concurrently(fp32_worker, requests, stagger=0.05)
    assert uncached(results[:4]) == uncached(solo)
    assert "OutOfMemoryError" in results[4]["error"]
    faulty_forward.clear()
    assert uncached(fp32_worker.complete(requests[0])) == uncached(solo[0])


def test_out_of_memory_in_a_step_drops_the_newest_and_the_rest_finish(fp32_worker, faulty_forward):
    requests = [job(t["instruction"], max_new_tokens=24, min_new_tokens=24) for t in seed_tasks(4, skip=10)]
    solo = [fp32_worker.complete(r) for r in requests]
    fired = []

    def fourth_row_once(input_ids):
        if input_ids.shape == (4, 1) and not fired:
            fired.append(True)
            return True
        return False

    faulty_forward.append(fourth_row_once)
    results = concurrently(fp32_worker, requests, stagger=0.05)
    assert fired
    assert uncached(results[:3]) == uncached(solo[:3])
    assert results[3] == {"error": "out of memory: the batch could not hold this request; retry it"}


def test_cancelling_the_handler_task_frees_the_slot_at_once(handler_module):
    async def scenario():
        chunks = []

        async def consume():
            event = {**job("Tell me a long story about dragons.", max_new_tokens=500), "stream": True}
            async for chunk in handler_module.handler({"id": "cancel-me", "input": event}):
                chunks.append(chunk)

        task = asyncio.create_task(consume())
        while not chunks:
            await asyncio.sleep(0.01)
        task.cancel()  # what the RunPod SDK does to cancel a job
        cancelled_at = time.monotonic()
        while handler_module.worker.engine.running:
            await asyncio.sleep(0.01)
            assert time.monotonic() - cancelled_at < 2.0, "the slot was not freed"
        return chunks

    assert asyncio.run(scenario())


def test_job_over_the_time_limit_ends_with_its_partial_text(worker):
    # The limit is what this machine took for 16 tokens of the same job, four times over: a slow
    # machine gets more time, so the answer has text whatever the machine's speed.
    # The raw prompt (template none) has no stop string: only the time limit may end the story.
    story = {"instruction": "Tell me a long story about dragons.", "template": "none"}
    began = time.monotonic()
    worker.complete({"prompt_config": story, "generation_config": {"max_new_tokens": 16, "min_new_tokens": 16}})
    limited = Worker.start(Settings(max_job_seconds=4 * (time.monotonic() - began)))
    try:
        result = limited.complete({"prompt_config": story, "generation_config": {"max_new_tokens": 2000, "min_new_tokens": 2000}})
    finally:
        limited.close()
    assert result["finish_reason"] == "time_limit"
    assert 0 < result["usage"]["completion_tokens"] < 2000
    assert len(result["output"]) > 10


# ----------------------------------------------------------------------------------- load
def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.fixture(scope="module")
def fp32_api_server():
    """The local API server in fp32, where a batch must not change a greedy answer."""
    yield from serve_api(DTYPE="float32")


def test_burst_of_64_jobs_32_at_a_time_answers_each_job_with_its_own_answer(fp32_api_server, fp32_worker):
    """64 jobs, 32 at a time (two full batches), each answered once with exactly the answer it
    gets alone. 16 tasks each sent 4 times keep the solo runs affordable; their answers all differ,
    so an answer that reaches another job's caller shows."""
    url, pid = fp32_api_server
    tasks = [{"prompt_config": task, "generation_config": {"max_new_tokens": 6}} for task in seed_tasks(16)]
    alone = [fp32_worker.complete(task) for task in tasks]
    assert len({answer["output"] for answer in alone}) == len(tasks), "precondition: the answers tell the tasks apart"
    events, alone = tasks * 4, alone * 4
    for event in events[:4]:  # warm up, so that the baseline includes the loaded model and first buffers
        post(f"{url}/runsync", {"input": event})
    before = rss_mb(pid)
    with ThreadPoolExecutor(max_workers=32) as pool:
        replies = list(pool.map(lambda event: post(f"{url}/runsync", {"input": event}, timeout=300), events))
    limit = before * 1.25 + 150
    deadline = time.monotonic() + 10  # the engine frees its buffers just after the last answer leaves
    while (after := rss_mb(pid)) >= limit and time.monotonic() < deadline:
        time.sleep(0.5)

    assert len({reply["id"] for reply in replies}) == 64
    for event, reply, expected in zip(events, replies, alone):
        assert reply["status"] == "COMPLETED", reply
        assert uncached(reply["output"]) == uncached([expected]), f"{event['prompt_config']['instruction']!r} got another answer"
    assert after < limit, f"memory grew from {before:.0f} MB to {after:.0f} MB"


# ----------------------------------------------------------------------------------- security
def test_remote_code_is_not_run_unless_allowed(base_model_dir, tmp_path):
    assert Settings().trust_remote_code is False
    model_dir = tmp_path / "model-with-code"
    shutil.copytree(base_model_dir, model_dir)
    marker = tmp_path / "remote-code-ran"
    (model_dir / "evil_modeling.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_modeling.EvilConfig", "AutoModelForCausalLM": "evil_modeling.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    worker = Worker.start(Settings(base_model=str(model_dir)))
    try:
        assert not marker.exists()
        assert "Paris" in worker.complete(job(FRANCE, max_new_tokens=24))["output"]
    finally:
        worker.close()


def test_hub_token_never_appears_in_logs_errors_or_outputs():
    token = "hf_FAKEtokenNEVERtoBEprinted1234567890"
    env = {
        **{k: v for k, v in os.environ.items() if k != "RUNPOD_WEBHOOK_GET_JOB"},
        "HF_TOKEN": token,
        "BASE_MODEL": "someone/private-model",
        "HF_HUB_OFFLINE": "1",
        "RUNPOD_DEBUG_LEVEL": "DEBUG",
    }
    event = json.dumps({"input": job(FRANCE)})
    done = subprocess.run(
        [sys.executable, "handler.py", "--test_input", event], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    printed = done.stdout + done.stderr
    assert "the model failed to load" in printed and "someone/private-model" in printed
    assert token not in printed
    assert token[3:15] not in printed
