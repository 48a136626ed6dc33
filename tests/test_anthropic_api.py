"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``), driven by the real
``anthropic`` SDK over real sockets: each answer is the chat completion the same conversation gets
(greedy), whole and streamed in Anthropic's event order; forced tool use and a tool_result turn;
stop sequences; a prefill; token counts; Anthropic's error shapes and ``x-api-key``; RunPod jobs."""

import contextlib
import io
import json
import re
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from conftest import doc_blocks, running, seed_tasks

from llm_worker.doors import jobs
from llm_worker.doors.app import create_app
from llm_worker.service import Worker
from llm_worker.settings import ServerSettings, Settings

KEY = "sk-ant-test-5e0a"
GREEDY = {"temperature": 0}  # the SDK (2.x) has no sampling parameters of its own any more; the API still takes them
WEATHER = {
    "name": "get_weather", "description": "The weather in a city now",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def served(fp32_worker):
    """(the server's URL, an Anthropic client, an OpenAI client), both with the key."""
    with running(create_app(fp32_worker, ServerSettings(api_key=KEY))) as url:
        yield (url, anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=120),
               openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120))


def model(fp32_worker) -> str:
    return fp32_worker.loaded.name


def chat_answer(chat, fp32_worker, messages, **body):
    return chat.chat.completions.create(model=model(fp32_worker), messages=messages, temperature=0, **body)


def test_a_message_is_the_chat_completion_of_the_same_conversation(served, fp32_worker):
    _, client, chat = served
    for task in seed_tasks(2, skip=30):
        message = client.messages.create(
            model=model(fp32_worker), max_tokens=24, extra_body=GREEDY, system="Answer briefly.",
            messages=[{"role": "user", "content": task["instruction"]}],
        )
        expected = chat_answer(chat, fp32_worker, [{"role": "system", "content": "Answer briefly."},
                                                   {"role": "user", "content": task["instruction"]}], max_tokens=24)
        choice = expected.choices[0]
        assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
        assert [block.type for block in message.content] == ["text"] and message.content[0].text == choice.message.content
        assert message.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[choice.finish_reason]
        assert message.usage.output_tokens == expected.usage.completion_tokens
        assert message.usage.input_tokens + message.usage.cache_read_input_tokens == expected.usage.prompt_tokens


def sse_events(url: str, body: dict) -> list[tuple[str, dict]]:
    with httpx.stream("POST", f"{url}/v1/messages", json={**body, "stream": True}, headers={"x-api-key": KEY}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    events = []
    for name, data in zip(lines[::2], lines[1::2]):
        assert name.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == name.removeprefix("event: ")
        events.append((payload["type"], payload))
    return events


def test_a_stream_sends_anthropic_s_events_in_order_and_the_same_text(served, fp32_worker):
    url, client, _ = served
    body = {"model": model(fp32_worker), "max_tokens": 20, "messages": [{"role": "user", "content": "Name three colours."}]}
    whole = client.messages.create(**body, extra_body=GREEDY)
    kinds = [kind for kind, _ in sse_events(url, {**body, **GREEDY})]
    deltas = kinds.count("content_block_delta")
    assert kinds == ["message_start", "ping", "content_block_start", *["content_block_delta"] * deltas, "content_block_stop",
                     "message_delta", "message_stop"] and deltas >= 2
    with client.messages.stream(**body, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)


def test_forced_tool_use_then_a_tool_result_turn(served, fp32_worker):
    url, client, chat = served
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    called = client.messages.create(model=model(fp32_worker), max_tokens=60, extra_body=GREEDY, tools=[WEATHER],
                                    tool_choice={"type": "tool", "name": "get_weather"}, messages=[ask])
    assert called.stop_reason == "tool_use" and [block.type for block in called.content] == ["tool_use"]
    use = called.content[0]
    assert use.name == "get_weather" and isinstance(use.input.get("city"), str) and use.id.startswith("toolu_")
    events = sse_events(url, {"model": model(fp32_worker), "max_tokens": 60, "temperature": 0, "tools": [WEATHER],
                              "tool_choice": {"type": "any", "disable_parallel_tool_use": True}, "messages": [ask]})
    start = next(payload for kind, payload in events if kind == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "get_weather"
    pieces = [p["delta"]["partial_json"] for kind, p in events if kind == "content_block_delta"]
    assert all(p["delta"]["type"] == "input_json_delta" for kind, p in events if kind == "content_block_delta")
    assert json.loads("".join(pieces)) == use.input
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    result = [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 degrees"}]
    answer = client.messages.create(model=model(fp32_worker), max_tokens=24, extra_body=GREEDY, tools=[WEATHER],
                                    tool_choice={"type": "none"},
                                    messages=[ask, {"role": "assistant", "content": called.content}, {"role": "user", "content": result}])
    expected = chat_answer(chat, fp32_worker, [
        {"role": "user", "content": ask["content"]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": use.id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "Sunny, 21 degrees"},
    ], max_tokens=24, tools=[{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                               "parameters": WEATHER["input_schema"]}}], tool_choice="none")
    assert answer.content[0].text == expected.choices[0].message.content


def test_a_stop_sequence_ends_the_answer_and_is_named(served, fp32_worker):
    _, client, _ = served
    body = {"model": model(fp32_worker), "max_tokens": 30, "extra_body": GREEDY, "messages": [{"role": "user", "content": "Describe the sea."}]}
    text = client.messages.create(**body).content[0].text
    word = text.split()[len(text.split()) // 2]
    stopped = client.messages.create(**body, stop_sequences=["never-there", word])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", word)
    assert text.startswith(stopped.content[0].text) and word not in stopped.content[0].text


def test_a_trailing_assistant_message_is_a_prefill_the_answer_continues(served, fp32_worker):
    _, client, chat = served
    messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is"}]
    message = client.messages.create(model=model(fp32_worker), max_tokens=12, extra_body=GREEDY, messages=messages)
    expected = chat_answer(chat, fp32_worker, messages, max_tokens=12, extra_body={"continue_final_message": True})
    assert message.content[0].text == expected.choices[0].message.content
    assert message.content[0].text.startswith(" ")  # it continues the prefill: the space between is kept
    with pytest.raises(anthropic.BadRequestError, match="cannot end with whitespace"):
        client.messages.create(model=model(fp32_worker), max_tokens=5, messages=[messages[0], {"role": "assistant", "content": "It is "}])


def test_output_config_format_gives_json_under_the_schema(served, fp32_worker):
    _, client, _ = served
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer"}}, "required": ["city", "year"],
              "additionalProperties": False}
    located = client.messages.create(model=model(fp32_worker), max_tokens=64, messages=[{"role": "user", "content": "Where and when?"}],
                                     output_config={"format": {"type": "json_schema", "schema": schema}}, extra_body=GREEDY)
    assert located.stop_reason == "end_turn"
    answer = json.loads(located.content[0].text)
    assert set(answer) == {"city", "year"} and isinstance(answer["year"], int)
    with pytest.raises(anthropic.BadRequestError, match="output_config.format and tools: at most one"):
        client.messages.create(model=model(fp32_worker), max_tokens=8, messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER],
                               output_config={"format": {"type": "json_schema", "schema": schema}})


def test_count_tokens_is_the_prompt_a_message_is_given(served, fp32_worker):
    _, client, _ = served
    body = {"model": model(fp32_worker), "system": "Be brief.", "tools": [WEATHER],
            "messages": [{"role": "user", "content": "Weather in Oslo and in Rome, please?"}]}
    counted = client.messages.count_tokens(**body).input_tokens
    plain = client.messages.count_tokens(model=model(fp32_worker), messages=body["messages"]).input_tokens
    sent = client.messages.create(**body, max_tokens=1)  # the same tool_choice (auto): the same prompt
    assert counted == sent.usage.input_tokens + sent.usage.cache_read_input_tokens and counted > plain


def error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}
    return response.status_code, body["error"]["type"], body["error"]["message"]


def test_refusals_come_in_anthropic_s_shape_naming_the_field(served, fp32_worker):
    url, client, _ = served
    post = lambda body, **headers: httpx.post(f"{url}/v1/messages", json=body, headers={"x-api-key": KEY, **headers}, timeout=60)  # noqa: E731
    hello = [{"role": "user", "content": "Hi"}]
    status, kind, message = error(post({"model": model(fp32_worker), "messages": hello}))
    assert (status, kind) == (400, "invalid_request_error") and message.startswith("max_tokens:")
    status, kind, message = error(post({"model": model(fp32_worker), "max_tokens": 5, "messages": hello, "top_q": 1}))
    assert status == 400 and "top_q" in message
    image = [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]
    status, kind, message = error(post({"model": model(fp32_worker), "max_tokens": 5, "messages": image}))
    assert status == 400 and message.startswith("messages[0].content[0]: image blocks are not supported")
    status, kind, message = error(post({"model": "nope", "max_tokens": 5, "messages": hello}))
    assert (status, kind) == (404, "not_found_error") and model(fp32_worker) in message
    status, kind, message = error(post({"model": model(fp32_worker), "max_tokens": 5, "messages": hello, "tools": [WEATHER],
                                        "tool_choice": {"type": "tool"}}))
    assert (status, message) == (400, "tool_choice.name: needed with type tool")
    status, kind, message = error(httpx.post(f"{url}/v1/messages", json={"model": "x", "max_tokens": 1, "messages": hello}))
    assert (status, kind) == (401, "authentication_error") and "x-api-key" in message
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(model="x", max_tokens=1, messages=hello)
    status, kind, _ = error(post({"model": model(fp32_worker), "max_tokens": 5, "messages": hello, "padding": "x" * 2_000_000}))
    assert (status, kind) == (413, "request_too_large")


def test_x_api_key_and_bearer_both_open_every_route(served):
    url, _, _ = served
    for headers in ({"x-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"x-api-key": "wrong"}).status_code == 401


def test_a_worker_that_cannot_serve_answers_503_in_anthropic_s_shape(base_model_dir, tmp_path):
    broken = Worker.start(Settings(base_model=str(tmp_path / "missing")))
    assert broken.load_error
    with running(create_app(broken, ServerSettings())) as url:
        status, kind, _ = error(httpx.post(f"{url}/v1/messages", json={"model": "x", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}))
    assert (status, kind) == (503, "overloaded_error")


def test_runpod_jobs_reach_the_messages_api(fp32_worker):
    body = {"model": model(fp32_worker), "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Say hello."}]}
    message = jobs.complete(fp32_worker, {"openai_route": "/v1/messages", "openai_input": body})
    assert message["type"] == "message" and message["content"][0]["type"] == "text"
    streamed = jobs.complete(fp32_worker, {"openai_route": "/v1/messages", "openai_input": {**body, "stream": True}})
    assert streamed.startswith("event: message_start") and "event: message_stop" in streamed
    counted = jobs.complete(fp32_worker, {"openai_route": "/v1/messages/count_tokens",
                                          "openai_input": {"model": body["model"], "messages": body["messages"]}})
    assert counted == {"input_tokens": message["usage"]["input_tokens"] + message["usage"]["cache_read_input_tokens"]}
    refused = jobs.complete(fp32_worker, {"openai_route": "/v1/messages", "openai_input": {**body, "max_tokens": 0}})
    assert refused["type"] == "error" and refused["error"]["type"] == "invalid_request_error" and refused["error"]["message"].startswith("max_tokens")


CLIENTS = ["Anthropic's Messages API", "OpenAI's Agents SDK", "instructor", "LlamaIndex"]


def test_every_client_on_the_clients_page_has_its_snippet_run():
    page = (Path(__file__).parent.parent / "docs" / "clients.md").read_text()
    assert re.findall(r"^## (.+)$", page, re.MULTILINE) == CLIENTS


@pytest.mark.parametrize("section", CLIENTS)
def test_each_clients_snippet_runs_as_written_against_a_local_server(served, section):
    url, _, _ = served
    (language, code), = doc_blocks("docs/clients.md", section)
    assert language == "python" and "http://localhost:8000" in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # in this process, as a script: its own module namespace
        exec(compile(code.replace("http://localhost:8000", url).replace('api_key="unused"', f'api_key="{KEY}"'), f"clients.md: {section}", "exec"),
             {"__name__": "__main__"})
    lines = printed.getvalue().splitlines()
    if section == "Anthropic's Messages API":
        assert any(line.startswith("get_weather {'city': ") for line in lines) and int(lines[-1]) > 0
        assert lines[-2].startswith("{'city': ") and "'country': " in lines[-2]  # the structured answer
    elif section == "OpenAI's Agents SDK":
        assert lines[0] == "['tool_call_item', 'tool_call_output_item', 'message_output_item']" and "".join(lines[1:]).strip()
    else:  # instructor, LlamaIndex: the answer parsed into the model
        assert re.fullmatch(r"name='.+' country='.+'", lines[-1]), lines