"""The Responses API (``POST /v1/responses``) through the ``openai`` client: plain and streamed
answers parse into the client's own types and agree with the chat completion the request means;
instructions, conversation items, JSON schema output and max_output_tokens are honoured; the
typed stream events come in order with their sequence numbers; what a stateless worker cannot do
is refused naming the parameter. Tool calls through this API: tests/test_tool_calls.py."""

import json

import openai
import pytest
from conftest import running, strictly
from openai.types.responses import Response

from llm_worker.doors import jobs
from llm_worker.doors.app import create_app
from llm_worker.settings import ServerSettings

MODEL = "SmolLM2-135M-Instruct"
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(fp32_worker):
    with running(create_app(fp32_worker, ServerSettings())) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_an_answer_is_the_chat_answer_the_request_means(client):
    answer = client.responses.create(model=MODEL, input=FRANCE, instructions="Answer in one sentence.", max_output_tokens=24, temperature=0)
    chat = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=24,
        messages=[{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": FRANCE}],
    )
    strictly(Response, answer.model_dump(exclude_unset=True))
    assert answer.status == "completed" and answer.output_text == chat.choices[0].message.content and "Paris" in answer.output_text
    (item,) = answer.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert answer.usage.input_tokens == chat.usage.prompt_tokens and answer.usage.output_tokens == chat.usage.completion_tokens
    assert answer.id.startswith("resp_") and answer.instructions == "Answer in one sentence."


def test_a_stream_sends_the_typed_events_in_order_and_joins_to_the_answer(client):
    body = {"model": MODEL, "input": FRANCE, "max_output_tokens": 24, "temperature": 0}
    whole = client.responses.create(**body)
    events = list(client.responses.create(stream=True, **body))
    types = [event.type for event in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert set(types[4:-4]) == {"response.output_text.delta"} and len(types) > 9
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[0].response.status == "in_progress" and events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_a_conversation_of_items_and_a_json_schema(client):
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}
    answer = client.responses.create(
        model=MODEL, temperature=0, max_output_tokens=40,
        input=[
            {"role": "user", "content": "Remember the name Ada."},
            {"role": "assistant", "content": [{"type": "output_text", "text": "I will remember Ada."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Give me a person as JSON."}]},
        ],
        text={"format": {"type": "json_schema", "name": "person", "schema": person, "strict": True}},
    )
    value = json.loads(answer.output_text)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)


def test_max_output_tokens_makes_an_incomplete_response(client):
    answer = client.responses.create(model=MODEL, input="Tell me a long story about a dragon.", max_output_tokens=5, temperature=0)
    assert answer.status == "incomplete" and answer.incomplete_details.reason == "max_output_tokens"
    assert answer.usage.output_tokens == 5 and answer.output_text
    events = list(client.responses.create(model=MODEL, input="Tell me a long story about a dragon.", max_output_tokens=5, temperature=0, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == answer.output_text


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id", "send the whole conversation"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "does not support"),
        ({"messages": []}, "messages", "did you mean input?"),
        ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
        ({"input": [{"type": "image", "url": "x"}]}, "input[0]", "type must be one of"),
        ({"input": [{"role": "user", "content": 5}]}, "input[0].content", "content"),
        ({"input": [{"role": "user", "content": "hi"}], "model": "nobody"}, "model", "does not exist"),
    ],
)
def test_what_a_stateless_worker_cannot_do_is_refused_naming_the_parameter(client, body, param, words):
    with pytest.raises(openai.APIStatusError) as refused:  # extra_body: as any JSON client may send them
        client.responses.create(model=MODEL, input=body.pop("input", "hi"), extra_body=body)
    assert refused.value.body["param"] == param and words in refused.value.body["message"]


def test_a_runpod_job_takes_the_same_route(fp32_worker, client):
    body = {"model": MODEL, "input": FRANCE, "max_output_tokens": 16, "temperature": 0}
    answer = jobs.complete(fp32_worker, {"openai_route": "/v1/responses", "openai_input": body})
    assert answer["output"][0]["content"][0]["text"] == client.responses.create(**body).output_text
    stream = jobs.complete(fp32_worker, {"openai_route": "/v1/responses", "openai_input": {**body, "stream": True}})
    assert stream.startswith("event: response.created\n") and stream.rstrip().splitlines()[-2] == "event: response.completed"
