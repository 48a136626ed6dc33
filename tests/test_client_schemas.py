"""Schemas as clients generate them: pydantic models of common shapes (LangChain's
``with_structured_output``, the Agents SDK's typed outputs) are served, natively and through the
OpenAI door, and each answer parses into its model. What the engine cannot enforce
(``uniqueItems``, which pydantic writes for a ``set``) is left out with an INFO line, unless the
request says OpenAI's ``strict: true``: then it is refused, as OpenAI refuses it."""

import datetime
import enum
import logging
from typing import Annotated, Literal

import pytest
from conftest import job
from pydantic import BaseModel, Field

from llm_worker.doors import jobs


class Color(enum.Enum):
    red = "red"
    blue = "blue"


class Address(BaseModel):
    city: str
    zip_code: str | None = None


class Person(BaseModel):
    name: str
    kind: Literal["customer", "supplier"]
    favourite: Color
    address: Address
    nickname: str | None = None


class Event(BaseModel):
    title: str
    starts: datetime.datetime
    day: datetime.date


class Tagged(BaseModel):
    tags: Annotated[set[str], Field(max_length=3)]  # without a bound, nothing stops a small model repeating a tag
    scores: Annotated[frozenset[int], Field(max_length=3)]


@pytest.mark.parametrize(
    ("model", "instruction"),
    [
        (Person, "Describe a customer who lives in Paris and likes red."),
        (Event, "Give me a meeting next Monday at 10 in the morning."),
        (Tagged, "Give three tags for a blog post about gardening and a few scores."),
    ],
)
def test_a_pydantic_models_schema_gets_an_answer_that_parses_into_it(fp32_worker, model, instruction, caplog):
    with caplog.at_level(logging.INFO, logger="llm_worker.engine.constraints"):
        answer = fp32_worker.complete(job(instruction, json_schema=model.model_json_schema(), max_new_tokens=96))
    assert "error" not in answer, answer
    model.model_validate_json(answer["output"])
    left_out = "served without what the engine cannot enforce" in caplog.text
    assert left_out == (model is Tagged) and ("uniqueItems" in caplog.text) == (model is Tagged)


def chat(worker, **body):
    body = {"messages": [{"role": "user", "content": "Three tags for a gardening post."}], "max_tokens": 64, "temperature": 0, **body}
    return jobs.complete(worker, {"openai_route": "/v1/chat/completions", "openai_input": body})


def test_openai_strict_refuses_what_cannot_be_enforced_and_the_rest_is_served(fp32_worker):
    schema = Tagged.model_json_schema()
    strict = chat(fp32_worker, response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}})
    assert strict["error"]["param"] == "response_format" and "uniqueItems" in strict["error"]["message"]
    lenient = chat(fp32_worker, response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    Tagged.model_validate_json(lenient["choices"][0]["message"]["content"])
    tool = {"type": "function", "function": {"name": "tag", "parameters": schema, "strict": True}}
    refused = chat(fp32_worker, tools=[tool], tool_choice="required")
    assert refused["error"]["param"] == "tools" and "uniqueItems" in refused["error"]["message"]
    served = chat(fp32_worker, tools=[{**tool, "function": {**tool["function"], "strict": False}}], tool_choice="required",
                  parallel_tool_calls=False)
    Tagged.model_validate_json(served["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])


def test_instructor_in_its_default_mode_gets_answers_that_parse_into_its_models(fp32_worker):
    """instructor as it is: ``from_openai`` in its default mode (one forced tool call under the model's
    schema), whole and as a streamed partial, through the server."""
    import instructor
    import openai
    from conftest import running

    from llm_worker.doors.app import create_app
    from llm_worker.settings import ServerSettings

    with running(create_app(fp32_worker, ServerSettings())) as url:
        client = instructor.from_openai(openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120))
        assert client.mode == instructor.Mode.TOOLS
        messages = [{"role": "user", "content": "Describe a customer who lives in Paris and likes red."}]
        person = client.chat.completions.create(model=fp32_worker.loaded.name, response_model=Person, messages=messages,
                                                temperature=0, max_tokens=120, max_retries=0)
        assert isinstance(person, Person) and person.kind in ("customer", "supplier")
        event = client.chat.completions.create(model=fp32_worker.loaded.name, response_model=Event, max_retries=0, temperature=0,
                                               max_tokens=120, messages=[{"role": "user", "content": "A meeting next Monday at 10."}])
        assert isinstance(event.starts, datetime.datetime) and isinstance(event.day, datetime.date)
        where = [{"role": "user", "content": "Where is the Louvre? Give its city."}]
        whole = client.chat.completions.create(model=fp32_worker.loaded.name, response_model=Address, messages=where, temperature=0,
                                               max_tokens=60, max_retries=0)
        partials = list(client.chat.completions.create_partial(model=fp32_worker.loaded.name, response_model=Address, messages=where,
                                                                temperature=0, max_tokens=60, max_retries=0))
        assert isinstance(whole, Address) and whole.city
        # the partial's schema (every field optional) is not the whole's: its answer may differ, it grows and ends valid
        assert len(partials) > 1 and Address.model_validate(partials[-1].model_dump()).city


def test_llamaindex_openailike_chats_as_the_openai_client_does_and_its_default_structured_predict_is_refused(fp32_worker):
    """LlamaIndex's ``OpenAILike`` as it is (docs/clients.md's example, run by
    tests/test_anthropic_api.py, streams and predicts into a model as a function-calling model):
    its chat is the ``openai`` client's answer; left a plain chat model, its ``structured_predict``
    sends ``tool_choice`` without tools, refused as OpenAI refuses it, saying what it needs."""
    import openai
    from conftest import running
    from llama_index.core.llms import ChatMessage
    from llama_index.core.prompts import PromptTemplate
    from llama_index.llms.openai_like import OpenAILike

    from llm_worker.doors.app import create_app
    from llm_worker.settings import ServerSettings

    name = fp32_worker.loaded.name
    with running(create_app(fp32_worker, ServerSettings())) as url:
        llm = OpenAILike(model=name, api_base=f"{url}/v1", api_key="unused", temperature=0, max_tokens=24, timeout=120, max_retries=0,
                         is_chat_model=True)
        whole = llm.chat([ChatMessage(role="user", content="Name three colours.")])
        expected = openai.OpenAI(base_url=f"{url}/v1", api_key="unused").chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Name three colours."}], temperature=0, max_tokens=24)
        assert whole.message.content == expected.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="tool_choice: 'required' needs tools, and this request has none"):
            llm.structured_predict(Address, PromptTemplate("Where is the {place}?"), place="Louvre")
