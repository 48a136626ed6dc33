"""The sampling parameters clients send (OpenAI's presence and frequency penalties and logit_bias,
vLLM's min_p, top_k, repetition_penalty, stop_token_ids and ignore_eos), through the OpenAI door
on the real model: greedy answers with OpenAI's penalties equal transformers' ``generate`` with a
processor written from OpenAI's definition, and each other parameter does what it says."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from llm_worker.doors import jobs

PROMPT = "List the days of the week: Monday, Tuesday,"


def complete(worker, **body):
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, **body}
    return jobs.complete(worker, {"openai_route": "/v1/completions", "openai_input": body})


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's documented penalties: logit - count * frequency - (count > 0) * presence, where
    count is how often the token was generated so far (the prompt not included)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).float() * self.presence


@pytest.fixture(scope="module")
def reference(base_model_dir):
    return AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize(("presence", "frequency"), [(0.0, 1.5), (1.2, 0.0), (-0.5, 0.8)])
def test_openai_penalties_answer_as_transformers_with_openais_definition(fp32_worker, reference, presence, frequency):
    ids = fp32_worker.loaded.tokenizer(PROMPT)["input_ids"]
    answer = complete(fp32_worker, presence_penalty=presence, frequency_penalty=frequency, ignore_eos=True)
    processors = LogitsProcessorList([OpenAIPenalties(len(ids), presence, frequency)])
    with torch.no_grad():
        output = reference.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                    logits_processor=processors, pad_token_id=0)
    expected = fp32_worker.loaded.tokenizer.decode(output[0, len(ids) :])
    assert answer["choices"][0]["text"] == expected
    assert answer["choices"][0]["text"] != complete(fp32_worker, ignore_eos=True)["choices"][0]["text"]  # the penalty did something


def test_logit_bias_forces_and_forbids_tokens(fp32_worker):
    plain = complete(fp32_worker, logprobs=0)["choices"][0]
    first = fp32_worker.loaded.tokenizer(plain["logprobs"]["tokens"][0], add_special_tokens=False)["input_ids"][0]
    banned = complete(fp32_worker, logit_bias={str(first): -100}, logprobs=0)["choices"][0]
    assert banned["logprobs"]["tokens"][0] != plain["logprobs"]["tokens"][0]
    star = fp32_worker.loaded.tokenizer("*", add_special_tokens=False)["input_ids"][0]
    forced = complete(fp32_worker, logit_bias={str(star): 100}, max_tokens=4)["choices"][0]
    assert forced["text"] == "****"


def test_stop_token_ids_end_the_answer_without_their_text(fp32_worker):
    plain = complete(fp32_worker, ignore_eos=True, logprobs=0)["choices"][0]
    tokens = plain["logprobs"]["tokens"]
    at = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])  # its first time in the answer
    stop = fp32_worker.loaded.tokenizer(tokens[at], add_special_tokens=False)["input_ids"][0]
    cut = complete(fp32_worker, stop_token_ids=[stop], ignore_eos=True)
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["choices"][0]["text"] == "".join(tokens[:at])


def test_ignore_eos_runs_to_max_tokens(fp32_worker):
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 40, "temperature": 0}
    chat = lambda **extra: jobs.complete(fp32_worker, {"openai_route": "/v1/chat/completions", "openai_input": {**body, **extra}})  # noqa: E731
    short = chat()
    assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 40  # it ended with <|im_end|>
    long = chat(ignore_eos=True)
    assert long["choices"][0]["finish_reason"] == "length" and long["usage"]["completion_tokens"] == 40


def test_min_p_one_and_top_k_one_sample_the_most_likely_token(fp32_worker):
    greedy = complete(fp32_worker)["choices"][0]["text"]
    for extra in ({"min_p": 1.0}, {"top_k": 1}):
        sampled = complete(fp32_worker, temperature=1.5, seed=3, **extra)["choices"][0]["text"]
        assert sampled == greedy, extra
    assert complete(fp32_worker, temperature=1.5, seed=3)["choices"][0]["text"] != greedy  # sampling alone does differ


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logit_bias": {"12": 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"stop_token_ids": [10**8]}, "stop_token_ids"),
        ({"min_p": 1.5}, "min_p"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"ignore_eos": True, "response_format": {"type": "json_object"}}, "ignore_eos"),
    ],
)
def test_bad_sampling_parameters_are_refused_naming_them(fp32_worker, body, param):
    error = complete(fp32_worker, **body)["error"]
    assert (error["param"] or "").startswith(param) or (error["param"] is None and param in error["message"]), error
