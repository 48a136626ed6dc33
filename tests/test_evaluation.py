"""Evaluation harnesses against the worker: lm-evaluation-harness's ``local-completions``
loglikelihood requests (prompts as token ids, ``echo``, ``logprobs``, ``max_tokens`` 1) get every
prompt token's logprob as the model's own forward computes it, also for prompts that span prefill
chunks and prompts the prefix cache holds; and vLLM's tokenizer routes answer over HTTP and as
RunPod jobs."""

import json

import httpx
import pytest
import torch
from conftest import running, seed_tasks, strictly
from openai.types import Completion
from transformers import AutoModelForCausalLM

from llm_worker.doors import jobs
from llm_worker.doors.app import create_app
from llm_worker.service import Worker
from llm_worker.settings import ServerSettings, Settings

COMPLETIONS = "/v1/completions"
KEY = "sk-eval-1c9d"
TOLERANCE = 2e-4  # fp32: the engine's pool attention against the model's own forward


@pytest.fixture(scope="module")
def scorer(base_model_dir):
    """fp32, prompts prefilled 16 tokens at a time (one KV block), so prompts span chunks."""
    worker = Worker.start(Settings(dtype="float32", max_prefill_tokens=16))
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def reference(base_model_dir):
    return AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()


def model_logprobs(reference, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row i is the model's distribution for token i + 1."""
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def complete(worker, **body):
    return jobs.complete(worker, {"openai_route": COMPLETIONS, "openai_input": body})


def loglikelihood_requests(tokenizer, count: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token ids as lm-eval builds them: an instruction and its answer."""
    tasks = seed_tasks(count, skip=20)
    contexts = [f"Question: {t['instruction']}\n{t['input']}\nAnswer:" for t in tasks]
    return [(tokenizer(context)["input_ids"], tokenizer(" Yes, it is.")["input_ids"]) for context in contexts]


def test_loglikelihood_as_lm_eval_sends_it_is_the_models_own(scorer, reference):
    requests = loglikelihood_requests(scorer.loaded.tokenizer, 3)
    prompts = [context + continuation for context, continuation in requests]
    assert min(map(len, prompts)) > 16 and max(map(len, prompts)) > 32  # two and three prefill chunks of 16
    # lm-eval's local-completions payload for loglikelihood, as is
    body = {"model": scorer.loaded.name, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    # OpenAI's (and vLLM's) echo puts null first, which the openai package's type does not allow: read as JSON, as lm-eval does
    answer = complete(scorer, **body)
    assert [choice["index"] for choice in answer["choices"]] == [0, 1, 2]
    for choice, ids, (context, _) in zip(answer["choices"], prompts, requests):
        logprobs = choice["logprobs"]
        expected = model_logprobs(reference, ids)
        assert len(logprobs["tokens"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        got = torch.tensor(logprobs["token_logprobs"][1 : len(ids)])
        want = expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(got, want, atol=TOLERANCE), (got - want).abs().max()
        for top, row in zip(logprobs["top_logprobs"][1 : len(ids)], expected):  # the most likely token, as a dict
            ((token, value),) = top.items()
            assert token == scorer.token_text(int(row.argmax())) and abs(value - row.max().item()) < TOLERANCE
        assert choice["text"].startswith(scorer.loaded.tokenizer.decode(ids)) and logprobs["text_offset"][0] == 0
        # how lm-eval reads it: the continuation's logprobs, and whether greedy decoding gives it
        continuation = sum(logprobs["token_logprobs"][len(context) : -1])
        assert abs(continuation - want[len(context) - 1 :].sum().item()) < 10 * TOLERANCE
        greedy = all(value == max(top.values()) for value, top in zip(logprobs["token_logprobs"][len(context) : -1], logprobs["top_logprobs"][len(context) : -1]))
        assert greedy == bool((expected[len(context) - 1 :].argmax(-1) == torch.tensor(ids[len(context) :])).all())
    assert answer["usage"]["prompt_tokens"] == sum(map(len, prompts)) and answer["usage"]["completion_tokens"] == 3


def test_prompt_logprobs_are_computed_when_the_prefix_cache_holds_the_prompt(scorer, reference):
    (context, continuation), = loglikelihood_requests(scorer.loaded.tokenizer, 1)
    ids = context + continuation
    complete(scorer, prompt=ids, max_tokens=1, temperature=0)
    again = complete(scorer, prompt=ids, max_tokens=1, temperature=0)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16  # the prompt's blocks are cached now
    scored = complete(scorer, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=0)
    assert scored["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    got = torch.tensor(scored["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)])
    want = model_logprobs(reference, ids).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(got, want, atol=TOLERANCE)
    assert scored["choices"][0]["logprobs"]["top_logprobs"][1] == {}  # logprobs 0: no alternatives


def test_echo_with_max_tokens_zero_is_the_prompt_scored(scorer):
    prompt = "The capital of France is Paris, and the capital of Italy is Rome."
    answer = complete(scorer, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    (choice,) = answer["choices"]
    tokens = scorer.loaded.tokenizer(prompt)["input_ids"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [scorer.token_text(t) for t in tokens] and len(logprobs["token_logprobs"]) == len(tokens)
    assert all(len(top) == 2 for top in logprobs["top_logprobs"][1:])
    assert answer["usage"]["completion_tokens"] == 0 and answer["usage"]["prompt_tokens"] == len(tokens)
    assert strictly(Completion, complete(scorer, prompt=prompt, echo=True, max_tokens=0)).choices[0].text == prompt
    plain = complete(scorer, prompt=prompt, max_tokens=0)
    assert plain["choices"][0]["text"] == "" and plain["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize("logprobs", [None, 1])
def test_an_echoed_stream_joins_to_the_whole_answer(scorer, logprobs):
    body = {"prompt": "Water boils at", "echo": True, "max_tokens": 6, "temperature": 0, "logprobs": logprobs}
    whole = complete(scorer, **body)["choices"][0]
    lines = complete(scorer, stream=True, **body).split("\n\n")
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines if line and line != "data: [DONE]"]
    assert chunks[0]["choices"][0]["text"] == "Water boils at"  # the prompt comes first
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    if logprobs is None:
        assert all(c["choices"][0]["logprobs"] is None for c in chunks) and whole["logprobs"] is None
        return
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    joined = {key: [value for part in parts for value in part[key]] for key in whole["logprobs"]}
    assert joined == whole["logprobs"]
    assert joined["text_offset"] == [len("".join(joined["tokens"][:i])) for i in range(len(joined["tokens"]))]


def test_a_prompt_of_token_ids_answers_as_its_text(scorer):
    text = "Name three primary colors:"
    ids = scorer.loaded.tokenizer(text)["input_ids"]
    by_text = complete(scorer, prompt=[text, text], max_tokens=8, temperature=0)
    by_ids = complete(scorer, prompt=[ids, ids], max_tokens=8, temperature=0)
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    assert by_ids["usage"]["prompt_tokens"] == by_text["usage"]["prompt_tokens"] == 2 * len(ids)


@pytest.mark.parametrize(
    ("prompt", "param", "message"),
    [
        ([], "prompt", "must not be empty"),
        ([[5, 6], []], "prompt[1]", "must not be empty"),
        ([5, 10**9], "prompt", "token id 1000000000 is not in the vocabulary"),
        ([[5], [-1]], "prompt[1]", "token id -1 is not in the vocabulary"),
        ([1.5], "prompt", "prompt"),
    ],
)
def test_bad_prompts_are_refused_naming_the_parameter(scorer, prompt, param, message):
    error = complete(scorer, prompt=prompt, max_tokens=1)["error"]
    assert error["param"] == param and message in error["message"]


@pytest.fixture(scope="module")
def keyed(scorer):
    app = create_app(scorer, ServerSettings(api_key=KEY))
    with running(app) as url:
        yield httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def test_tokenize_and_detokenize_round_trip_as_vllm_shapes_them(keyed, scorer):
    tokenizer = scorer.loaded.tokenizer
    text = "Give three tips for staying healthy."
    answer = keyed.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert answer["tokens"] == tokenizer(text)["input_ids"] and answer["count"] == len(answer["tokens"])
    assert answer["max_model_len"] == scorer.context_length and answer["token_strs"] == tokenizer.convert_ids_to_tokens(answer["tokens"])
    assert keyed.post("/detokenize", json={"tokens": answer["tokens"]}).json() == {"prompt": text}
    # messages count as many tokens as a chat request's prompt
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    counted = keyed.post("/tokenize", json={"messages": messages}).json()
    chat = keyed.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert counted["count"] == chat["usage"]["prompt_tokens"] and counted["token_strs"] is None


def test_tokenizer_info_names_the_special_tokens_and_the_chat_template(keyed, scorer):
    info = keyed.get("/tokenizer_info").json()
    tokenizer = scorer.loaded.tokenizer
    assert (info["eos_token"], info["bos_token"], info["pad_token"]) == (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token)
    assert info["chat_template"] == tokenizer.chat_template and info["model_max_length"] == scorer.context_length
    assert jobs.complete(scorer, {"openai_route": "/tokenizer_info"}) == info  # the same as a RunPod job


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("post", "/detokenize", {"tokens": [5, -3]}, 400, "tokens[1]"),
        ("post", "/tokenize", {"prompt": "hi", "zebra": 1}, 400, "zebra"),
        ("post", "/tokenize", {"messages": []}, 400, "messages"),
        ("post", "/tokenize", {"prompt": "hi", "model": "nope"}, 404, "model"),
    ],
)
def test_tokenizer_routes_refuse_bad_bodies_in_openai_shape(keyed, method, path, body, status, param):
    response = getattr(keyed, method)(path, json=body)
    assert response.status_code == status and response.json()["error"]["param"] == param


def test_tokenizer_routes_need_the_api_key(keyed):
    for method, path in (("post", "/tokenize"), ("post", "/detokenize"), ("get", "/tokenizer_info")):
        response = getattr(httpx, method)(f"{keyed.base_url}{path}", **({"json": {"tokens": [1]}} if method == "post" else {}))
        assert response.status_code == 401, path
