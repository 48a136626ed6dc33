"""The OpenAI-compatible door, and native n/logprobs: responses and stream chunks parse into the
``openai`` package's own types, streams join to the whole answer, seeds reproduce, logprobs are the
sampler's distribution, and jobs through the SDK's local server are routed to the door (the ``openai`` client over HTTP: test_server.py)."""

import asyncio
import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import job, post, strictly, uncached
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

from llm_worker.doors import jobs
from llm_worker.service import Worker, collect
from llm_worker.settings import Settings

FRANCE = "What is the capital of France?"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def random_adapter(base_model_dir, tmp_path_factory):
    """A LoRA adapter with random weights: it changes every answer, and costs no training."""
    folder = tmp_path_factory.mktemp("adapters") / "pirate"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(random_adapter):
    """fp32 (greedy answers independent of batching) with one named adapter."""
    worker = Worker.start(Settings(dtype="float32", lora_adapters=f"pirate={random_adapter}"))
    yield worker
    worker.close()


def call(worker, route, **body):
    return jobs.complete(worker, {"openai_route": route, "openai_input": body})


def chat(worker, content=FRANCE, **body):
    return call(worker, CHAT, messages=[{"role": "user", "content": content}], **body)


def events(sse: str) -> list[dict]:
    """The JSON of each ``data:`` line; the stream must end with ``[DONE]``."""
    lines = [block.removeprefix("data: ") for block in sse.split("\n\n") if block]
    assert lines[-1] == "[DONE]" and all(block.startswith("data: ") for block in sse.split("\n\n") if block)
    return [json.loads(line) for line in lines[:-1]]


def test_chat_answer_and_its_stream_parse_and_agree(served):
    body = {"max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    whole = strictly(ChatCompletion, chat(served, **body))
    chunks = [strictly(ChatCompletionChunk, c) for c in events(chat(served, stream=True, stream_options={"include_usage": True}, **body))]
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason == "stop"
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert streamed == choice.logprobs.content and len(streamed) == whole.usage.completion_tokens
    assert chunks[-1].choices == [] and uncached(chunks[-1].usage.model_dump()) == uncached(whole.usage.model_dump())
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].model == whole.model == served.loaded.name
    assert whole.system_fingerprint == chunks[0].system_fingerprint


def test_completions_for_two_prompts_parse_and_their_stream_agrees(served):
    body = {"prompt": ["The capital of France is", "Water boils at"], "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = strictly(Completion, call(served, COMPLETIONS, **body))
    chunks = events(call(served, COMPLETIONS, stream=True, **body))
    for chunk in chunks:
        (choice,) = chunk["choices"]
        if choice["finish_reason"] is None:  # openai's type declares it required; OpenAI's own streams send null
            choice = {**choice, "finish_reason": "stop"}
        strictly(Completion, {**chunk, "choices": [choice]})
    assert [c.index for c in whole.choices] == [0, 1] and whole.choices[0].text.startswith(" Paris")  # as generated: prompt + text reads on
    for choice in whole.choices:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice.index]
        assert "".join(c["text"] for c in mine) == choice.text
        assert mine[-1]["finish_reason"] == choice.finish_reason
        streamed = sum((c["logprobs"]["token_logprobs"] for c in mine), [])
        assert streamed == pytest.approx(choice.logprobs.token_logprobs, abs=1e-4)  # batched differently: rounding
        assert len(choice.logprobs.tokens) == len(choice.logprobs.top_logprobs) == len(choice.logprobs.text_offset)
        assert "".join(choice.logprobs.tokens) == choice.text  # nothing stripped: the tokens join to the text
    single = [call(served, COMPLETIONS, **{**body, "prompt": p})["usage"]["prompt_tokens"] for p in body["prompt"]]
    assert whole.usage.prompt_tokens == sum(single)
    cut = call(served, COMPLETIONS, prompt="The capital of France is", max_tokens=8, temperature=0, stop=["."])["choices"][0]
    assert (cut["text"], cut["finish_reason"]) == (" Paris", "stop")  # a stop string is still cut
    assert chat(served, max_tokens=16, temperature=0)["choices"][0]["message"]["content"][0] != " "  # chat: stripped


def test_completion_logprobs_are_every_generated_token_the_end_token_included(served):
    """vLLM's shape, and what lm-evaluation-harness's echo scoring reads (one entry per generated
    token after the prompt's): the tokens join to the text, then the token that ended it, which
    the text leaves out (the end token ``<|im_end|>``, or the token that completed a stop string)."""
    eos = served.loaded.tokenizer.eos_token
    prompt = served.loaded.tokenizer.apply_chat_template([{"role": "user", "content": FRANCE}], tokenize=False, add_generation_prompt=True)
    cases = [({"prompt": prompt, "max_tokens": 32}, [eos]), ({"prompt": "The capital of France is", "max_tokens": 8, "stop": ["."]}, ["."])]
    for body, ending in cases:
        body = {**body, "temperature": 0, "logprobs": 1}
        whole = call(served, COMPLETIONS, **body)
        (choice,) = whole["choices"]
        tokens = choice["logprobs"]["tokens"]
        assert choice["finish_reason"] == "stop" and "Paris" in choice["text"]
        assert "".join(tokens[: -len(ending)]) == choice["text"] and tokens[-len(ending) :] == ending
        assert len(tokens) == len(choice["logprobs"]["token_logprobs"]) == whole["usage"]["completion_tokens"]
        streamed = [c["choices"][0]["logprobs"] for c in events(call(served, COMPLETIONS, stream=True, **body)) if c["choices"][0]["logprobs"]]
        assert sum((part["tokens"] for part in streamed), []) == tokens


def test_models_are_the_base_model_and_every_adapter(served):
    listing = call(served, "/v1/models")
    assert listing["object"] == "list"
    assert [strictly(Model, m).id for m in listing["data"]] == [served.loaded.name, "base", "pirate"]
    missing = chat(served, model="parrot", max_tokens=2)["error"]
    assert missing["code"] == "model_not_found" and missing["message"].endswith("available: SmolLM2-135M-Instruct, base, pirate")


def test_n_with_a_seed_gives_different_answers_that_reproduce(served):
    body = {"max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 7}
    first, again = (strictly(ChatCompletion, chat(served, **body)) for _ in range(2))
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) == 3 and texts == [c.message.content for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert first.usage.prompt_tokens == chat(served, max_tokens=1)["usage"]["prompt_tokens"]  # counted once
    native = served.complete(
        {"prompt_config": {"instruction": FRANCE, "template": "chat"}, "generation_config": {"max_new_tokens": 12, "temperature": 1.0, "n": 3, "seed": 7}}
    )
    assert [c["output"] for c in native["choices"]] == texts  # the same sampler behind both doors
    streamed = events(chat(served, stream=True, **body))
    joined = ["".join(c["choices"][0]["delta"].get("content", "") for c in streamed if c["choices"][0]["index"] == i) for i in range(3)]
    assert joined == texts


def test_native_n_and_logprobs_stream_folds_to_the_whole_result(served):
    raw = job(FRANCE, max_new_tokens=12, temperature=0.8, seed=3, n=2, logprobs=2)
    whole = served.complete(raw)
    chunks = asyncio.run(_chunks(served, {**raw, "stream": True}))
    assert {c["index"] for c in chunks if "delta" in c} == {0, 1} and "usage" in chunks[-1]
    assert uncached(asyncio.run(collect(_replay(chunks)))) == uncached(whole)
    assert set(whole) == {"choices", "usage", "model", "adapter"} and len(whole["choices"]) == 2
    assert sum(len(answer["logprobs"]) for answer in whole["choices"]) == whole["usage"]["completion_tokens"]
    plain = served.complete(job(FRANCE, max_new_tokens=12))
    assert set(plain) == {"output", "finish_reason", "usage", "model", "adapter"}  # n = 1 without logprobs: as before


async def _chunks(worker, raw):
    return [chunk async for chunk in worker.handle(raw)]


async def _replay(chunks):
    for chunk in chunks:
        yield chunk


def test_greedy_logprobs_are_the_top_and_sum_to_one_over_the_vocabulary(served):
    greedy = served.complete(job(FRANCE, max_new_tokens=10, logprobs=20))
    for token in greedy["logprobs"]:
        assert token["logprob"] == max(top["logprob"] for top in token["top_logprobs"])
        assert token["token_id"] == token["top_logprobs"][0]["token_id"]
    assert "".join(t["token"] for t in greedy["logprobs"]).strip().startswith(greedy["output"])
    request = served.prepare(job(FRANCE, max_new_tokens=3, temperature=0.7, repetition_penalty=1.3, seed=1))[1]
    everything = served.engine.generate(replace(request, logprobs=served.engine.vocab))
    for token in everything.logprobs:
        assert math.isclose(sum(math.exp(logprob) for _, logprob in token.top), 1.0, abs_tol=1e-4)


def test_logprobs_are_after_the_repetition_penalty_and_temperature(served):
    raw = job(FRANCE, max_new_tokens=1, temperature=0.7, repetition_penalty=1.3, seed=1, logprobs=5)
    reported = served.complete(raw)["logprobs"][0]["top_logprobs"]
    ids = served.prepare(raw)[1].prompt_ids
    with torch.inference_mode():
        logits = served.loaded.model(torch.tensor([ids])).logits[:, -1].float()
    expected = torch.log_softmax(RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([ids]), logits) / 0.7, dim=-1)[0]
    values, indices = expected.topk(5)
    assert [t["token_id"] for t in reported] == indices.tolist()
    assert [t["logprob"] for t in reported] == pytest.approx(values.tolist(), abs=1e-3)


def test_an_adapter_chosen_by_model_answers_as_the_native_adapter_field(served):
    for name in ("pirate", "base"):
        native = served.complete({**job(FRANCE, max_new_tokens=16), "adapter": name})
        native_chat = served.complete(
            {"prompt_config": {"instruction": FRANCE, "template": "chat"}, "generation_config": {"max_new_tokens": 16}, "adapter": name}
        )
        answer = strictly(ChatCompletion, chat(served, model=name, max_tokens=16, temperature=0))
        assert answer.choices[0].message.content == native_chat["output"] and answer.model == name
        assert native_chat["adapter"] == (None if name == "base" else name) and native["adapter"] == native_chat["adapter"]
    assert chat(served, model="pirate", max_tokens=16, temperature=0) != chat(served, max_tokens=16, temperature=0)


@pytest.mark.parametrize(
    "route, body, param",
    [
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5}, "frequency_penalty"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -3}, "presence_penalty"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "tools": []}, "tools"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "stream_options"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "model": "nobody"}, "model"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
        (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        (CHAT, {"messages": []}, "messages"),
        (COMPLETIONS, {"prompt": "hi", "echo": "yes"}, "echo"),
        (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, "logprobs"),
        (COMPLETIONS, {"prompt": "hi", "stop": ["x"] * 17}, "stop"),
        (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"),
        ("/v1/embeddings", {"input": "hi"}, "openai_route"),
        ([], {"input": "hi"}, "openai_route"),  # not a string: it could not even be looked up (hypothesis found it)
        ({"path": CHAT}, {"messages": [{"role": "user", "content": "hi"}]}, "openai_route"),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_parameter(served, route, body, param):
    streams = (False,) if param in ("stream_options", "openai_route") else (False, True)
    for stream in streams:
        error = call(served, route, **body, **({"stream": True} if stream else {}))
        assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
        assert error["error"]["param"] == param and error["error"]["type"] == "invalid_request_error"
        assert error["error"]["message"].startswith(param) or param in error["error"]["message"]
    assert "Paris" in chat(served, max_tokens=12, temperature=0)["choices"][0]["message"]["content"]


TEXT_ONLY = 'this model reads text only; send the content as a string or as {"type": "%s", "text": ...} parts'


@pytest.mark.parametrize(
    "route, body, message",
    [
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is in it?"},
                                                          {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
         "messages[0].content: content[1] is a 'image_url' part: " + TEXT_ONLY % "text"),
        ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/cat.png"}]}]},
         "input[0].content: content[0] is a 'input_image' part: " + TEXT_ONLY % "input_text"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
         "response_format.json_schema: Field required"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text: Field required"),
    ],
)
def test_an_error_names_the_real_rule_and_its_parameter_once(served, route, body, message):
    """An image part is refused as what it is (not "Input should be a valid string"); a
    discriminated union's tag is not written into the path (``json_schema.json_schema``); of a
    union's branches, the error that went deepest is the one told."""
    error = call(served, route, **body)["error"]
    assert error["message"] == message and error["param"] == message.split(":")[0]


@pytest.mark.parametrize(
    "route, body, hint",
    [
        (CHAT, {"max_new_tokens": 8}, "max_new_tokens (this worker does not support it; did you mean max_completion_tokens or max_tokens?)"),
        (COMPLETIONS, {"prompt": "hi", "stop_sequences": ["x"]}, "stop_sequences (this worker does not support it; did you mean stop?)"),
        (CHAT, {"prompt": "hi"}, "prompt (this worker does not support it; did you mean messages? a bare prompt goes to /v1/completions)"),
        (COMPLETIONS, {"prompt": "hi", "messages": []}, "did you mean prompt? messages go to /v1/chat/completions"),
        (COMPLETIONS, {"prompt": "hi", "temprature": 1}, "temprature (this worker does not support it; did you mean temperature?)"),
        (CHAT, {"generation_config": {}}, "a native event (prompt_config, generation_config, adapter) goes to POST /generate"),
        (COMPLETIONS, {"prompt": "hi", "zebra": 1}, "zebra (this worker does not support it)"),
    ],
)
def test_an_unknown_parameter_gets_a_hint_when_it_names_one_we_have(served, route, body, hint):
    if route == CHAT:
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
    error = call(served, route, **body)["error"]
    assert error["message"].startswith("Unrecognized request argument supplied: ") and hint in error["message"]
    assert error["param"] == error["message"].removeprefix("Unrecognized request argument supplied: ").split(" ")[0]


@pytest.mark.parametrize("generation, field", [({"n": 0}, "generation_config.n"), ({"logprobs": 21}, "generation_config.logprobs"), ({"logprobs": 1, "num_beams": 2}, "generation_config")])
def test_native_n_and_logprobs_are_bounded(served, generation, field):
    assert served.complete(job(FRANCE, **generation))["error"].startswith(f"{field}: ")


def test_chat_template_setting_and_the_alpaca_fallback(started):
    worker = started(dtype="float32", chat_template="alpaca")
    native = worker.complete(job(FRANCE, max_new_tokens=16))  # the native door's alpaca template
    assert chat(worker, max_tokens=16, temperature=0)["choices"][0]["message"]["content"] == native["output"]
    two_turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]
    assert call(worker, CHAT, messages=two_turns)["error"]["param"] == "messages"
    worker.loaded.tokenizer.chat_template = None  # a base model without a chat template
    worker.settings = Settings(dtype="float32")
    error = chat(worker)["error"]
    assert error["param"] == "messages" and "CHAT_TEMPLATE" in error["message"]


def test_handler_routes_openai_jobs(api_server):
    url, _ = api_server
    body = {"messages": [{"role": "user", "content": FRANCE}], "max_tokens": 16, "temperature": 0}
    (whole,) = post(f"{url}/runsync", {"input": {"openai_route": CHAT, "openai_input": body}})["output"]
    lines = post(f"{url}/runsync", {"input": {"openai_route": CHAT, "openai_input": {**body, "stream": True}}})["output"]
    chunks = [strictly(ChatCompletionChunk, chunk) for chunk in events("".join(lines))]
    content = strictly(ChatCompletion, whole).choices[0].message.content
    assert "Paris" in content and "".join(c.choices[0].delta.content or "" for c in chunks) == content
