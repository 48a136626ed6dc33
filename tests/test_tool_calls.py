"""Tool calls decided by the model (``tool_choice`` "auto", the default of agent frameworks): a
LoRA adapter trained here to call ``get_weather`` for weather questions, and to answer anything else
in text, is served in the generic format (SmolLM2's template ignores tools); its answers come back
as OpenAI's ``tool_calls`` or as text, whole and streamed through the ``openai`` client, a call
always valid for its tool's schema. The grammar, the streamed splitter and the template's format
are checked on their own as well."""

import json
import random

import jsonschema
import openai
import pytest
import torch
from conftest import running
from openai.types.chat import ChatCompletion
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_worker.doors.app import create_app
from llm_worker.openai.errors import OpenAIError
from llm_worker.openai.prepare import chat_prompt
from llm_worker.openai.requests import Message, Tool
from llm_worker.openai.tool_calls import GENERIC, HERMES, CallSplitter, call_grammar, parse_calls, tool_format
from llm_worker.service import Worker
from llm_worker.settings import ServerSettings, Settings

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [Tool.model_validate(WEATHER), Tool.model_validate(CLOCK)]
STEPS, LEARNING_RATE = 12, 3e-3  # measured: at 8 steps it already tells weather questions from the rest
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Berlin", "Sydney"]
WEATHER_QUESTIONS = ["What's the weather in {}?", "Is it raining in {} right now?", "How warm is it in {} today?"]
OTHER = [
    ("Write a haiku about the sea.", "Waves fold into foam, the tide keeps its slow promise."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a primary color.", "Red is a primary color."),
    ("Say hello in French.", "Bonjour!"),
]


def call_text(city: str) -> str:
    return '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>' % city


# ---------------------------------------------------------------------- the parts
def test_the_grammar_offers_text_or_valid_calls_and_nothing_else(fp32_worker):
    auto = fp32_worker.grammars.compile_lark("tools", call_grammar(TOOLS, text=True, parallel=True))
    assert auto.accepts("The weather is fine. <b>bold</b>") and auto.accepts(call_text("Paris"))
    assert auto.accepts(call_text("Paris") + "\n" + call_text("Rome"))
    assert not auto.accepts('<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>')  # not its schema
    assert not auto.accepts('<tool_call>\n{"name": "send_mail", "arguments": {}}\n</tool_call>')  # no such tool
    assert not auto.accepts("Let me check. " + call_text("Paris"))  # text never holds a call's tag
    single = fp32_worker.grammars.compile_lark("tools", call_grammar(TOOLS, text=False, parallel=False))
    assert single.accepts(call_text("Paris")) and not single.accepts(call_text("Paris") + "\n" + call_text("Rome"))
    assert not single.accepts("Sunny.")


def test_a_nested_models_reference_resolves_and_its_object_is_closed_as_the_parameters_are(fp32_worker):
    """pydantic's ``$defs`` (a nested model, an enum) inside a tool's parameters: each reference
    resolves, and the nested object takes no made-up keys (a small model otherwise adds them until
    ``max_tokens``: LlamaIndex's structured_predict found it)."""
    parameters = {"$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                            "Color": {"enum": ["red", "blue"], "type": "string"}},
                  "type": "object", "properties": {"home": {"$ref": "#/$defs/Address"}, "likes": {"$ref": "#/$defs/Color"}},
                  "required": ["home", "likes"]}
    tools = [Tool.model_validate({"type": "function", "function": {"name": "person", "parameters": parameters}})]
    grammar = fp32_worker.grammars.compile_lark("tools", call_grammar(tools, text=False, parallel=False))

    def call(arguments: str) -> str:
        return '<tool_call>\n{"name": "person", "arguments": %s}\n</tool_call>' % arguments

    assert grammar.accepts(call('{"home": {"city": "Paris"}, "likes": "red"}'))
    assert not grammar.accepts(call('{"home": {"city": "Paris"}, "likes": "green"}'))
    assert not grammar.accepts(call('{"home": {"city": "Paris", "zip_code": "75001"}, "likes": "red"}'))


@pytest.mark.parametrize("seed", range(6))
def test_the_splitter_streams_text_or_calls_and_never_the_tags(seed):
    rng = random.Random(seed)
    calls = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "Europe/Oslo, \"CET\""})]
    answers = {
        "text": "Sunny, 21 degrees <maybe>.",
        "almost a tag": "<tool",
        "calls": "\n".join('<tool_call>\n' + json.dumps({"name": n, "arguments": a}) + '\n</tool_call>' for n, a in calls),
    }
    for kind, answer in answers.items():
        cuts = sorted(rng.sample(range(1, len(answer)), min(len(answer) - 1, rng.randint(1, 12))))
        pieces = [answer[i:j] for i, j in zip([0, *cuts], [*cuts, len(answer)])]
        splitter = CallSplitter(text=True)
        events = [event for piece in pieces for event in splitter.add(piece)] + splitter.end(complete=True)
        if kind != "calls":
            assert "".join(e[1] for e in events if e[0] == "text") == answer and all(e[0] == "text" for e in events)
            assert parse_calls(answer) is None
            continue
        assert not [e for e in events if e[0] == "text"]
        names = [(e[1], e[2]) for e in events if e[2] is not None]
        assert names == [(0, "get_weather"), (1, "get_time")]
        for k, (_, arguments) in enumerate(calls):
            assert json.loads("".join(e[3] for e in events if e[1] == k)) == arguments
        assert parse_calls(answer) == calls


HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
OTHER_TEMPLATE = HERMES_TEMPLATE.replace("<tool_call>", "[CALL]").replace("</tool_call>", "[/CALL]")


def test_the_format_comes_from_the_chat_template(base_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    assert tool_format(tokenizer, None) is GENERIC  # SmolLM2's template ignores tools
    assert tool_format(tokenizer, HERMES_TEMPLATE) is HERMES
    with pytest.raises(OpenAIError, match="tool_choice: this model's chat template writes tool calls in a format") as refused:
        tool_format(tokenizer, OTHER_TEMPLATE)
    assert refused.value.body["error"]["param"] == "tool_choice"


# ---------------------------------------------------------------------- a model that decides
def train_tool_adapter(worker: Worker, base_model_dir, folder) -> None:
    """A LoRA adapter that calls get_weather for weather questions and answers the rest in text,
    trained on the very prompts the worker serves (the generic format's system message)."""
    tokenizer = worker.loaded.tokenizer
    examples = [(q.format(city), call_text(city)) for city in CITIES[:6] for q in WEATHER_QUESTIONS] + OTHER * 3
    rows = []
    for question, answer in examples:
        prompt, _ = chat_prompt(worker, [Message(role="user", content=question)], TOOLS, TOOLS)
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt + target, [-100] * len(prompt) + target))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    order = random.Random(0)
    for _ in range(STEPS):
        batch = order.sample(rows, 4)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def client(fp32_worker, base_model_dir, tmp_path_factory):
    """The server over a worker with the tool-calling adapter as the model ``weather``."""
    folder = tmp_path_factory.mktemp("adapters") / "weather"
    train_tool_adapter(fp32_worker, base_model_dir, folder)
    worker = Worker.start(Settings(dtype="float32", lora_adapters=f"weather={folder}"))
    with running(create_app(worker, ServerSettings())) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    worker.close()


def ask(client, question, **body):
    body = {"model": "weather", "messages": [{"role": "user", "content": question}], "tools": [WEATHER, CLOCK],
            "max_tokens": 48, "temperature": 0, **body}
    return client.chat.completions.create(**body)


def streamed(client, question, **body):
    """A stream's text, its calls as (name, arguments text) and its finish_reason."""
    text, calls, finish = "", {}, None
    for chunk in ask(client, question, stream=True, **body):
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for piece in delta.tool_calls or []:
            name, arguments = calls.get(piece.index, (None, ""))
            calls[piece.index] = (piece.function.name or name, arguments + (piece.function.arguments or ""))
        finish = chunk.choices[0].finish_reason or finish
    return text, [calls[k] for k in sorted(calls)], finish


def test_the_model_calls_a_tool_when_it_decides_to(client):
    for city in ("Paris", "Sydney"):  # Sydney was never in its training
        answer = ask(client, f"What's the weather in {city}?")  # no tool_choice: "auto", as agent frameworks send
        assert isinstance(answer, ChatCompletion)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        arguments = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])
        text, calls, finish = streamed(client, f"What's the weather in {city}?")
        assert (text, calls, finish) == ("", [(call.function.name, call.function.arguments)], "tool_calls")


def test_the_model_answers_in_text_when_it_decides_to(client):
    answer = ask(client, "Write a haiku about the sea.", tool_choice="auto")
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None and choice.message.content
    assert "<tool_call>" not in choice.message.content
    assert streamed(client, "Write a haiku about the sea.") == (choice.message.content, [], "stop")


def test_tool_choice_none_and_required_override_the_model(client):
    none = ask(client, "What's the weather in Paris?", tool_choice="none").choices[0]
    assert none.message.tool_calls is None and "<tool_call>" not in (none.message.content or "")
    required = ask(client, "Write a haiku about the sea.", tool_choice="required", parallel_tool_calls=False).choices[0]
    assert required.finish_reason == "tool_calls" and len(required.message.tool_calls) == 1


def test_an_agent_turn_with_the_tools_result_is_answered(client):
    call = ask(client, "What's the weather in Paris?").choices[0].message.tool_calls[0]
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21, "sky": "clear"}'},
    ]
    answer = client.chat.completions.create(model="weather", messages=messages, tools=[WEATHER, CLOCK], max_tokens=24, temperature=0)
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


def test_the_generic_format_writes_tools_calls_and_results_into_the_conversation(fp32_worker):
    messages = [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Weather in Oslo?"),
        Message.model_validate({"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}),
        Message(role="tool", tool_call_id="call_1", content='{"celsius": -3}'),
    ]
    ids, _ = chat_prompt(fp32_worker, messages, TOOLS, TOOLS)
    text = fp32_worker.loaded.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call functions") and json.dumps(CLOCK["function"]) in text
    assert "<|im_start|>assistant\n" + call_text("Oslo") + "<|im_end|>" in text
    assert '<|im_start|>user\n<tool_response>\n{"celsius": -3}\n</tool_response><|im_end|>' in text
    plain, _ = chat_prompt(fp32_worker, messages[:2], TOOLS, [])  # tool_choice "none": nothing described
    assert "You can call functions" not in fp32_worker.loaded.tokenizer.decode(plain)


def test_tools_with_logprobs_or_another_constraint_are_refused(client):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, "Hi", logprobs=True)
    assert refused.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, "Hi", response_format={"type": "json_object"})
    assert refused.value.param == "tools" and "at most one" in refused.value.message


RESPONSES_WEATHER = {"type": "function", **WEATHER["function"]}  # the Responses API's flat tool


def test_the_responses_api_calls_tools_and_takes_their_output(client):
    answer = client.responses.create(model="weather", input="What's the weather in Tokyo?", tools=[RESPONSES_WEATHER],
                                     max_output_tokens=48, temperature=0)
    (item,) = answer.output
    assert item.type == "function_call" and item.name == "get_weather" and json.loads(item.arguments) == {"city": "Tokyo"}
    events = list(client.responses.create(model="weather", input="What's the weather in Tokyo?", tools=[RESPONSES_WEATHER],
                                          max_output_tokens=48, temperature=0, stream=True))
    types = [event.type for event in events]
    assert "response.output_text.delta" not in types and types[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == item.arguments
    assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == [item.arguments]
    followed = client.responses.create(
        model="weather", tools=[RESPONSES_WEATHER], max_output_tokens=24, temperature=0,
        input=[{"role": "user", "content": "What's the weather in Tokyo?"}, item.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": item.call_id, "output": '{"celsius": 18}'}],
    )
    assert followed.status in ("completed", "incomplete") and followed.output


def test_langchain_bind_tools_gets_calls_and_text(client):
    """LangChain's ChatOpenAI as an agent uses it: bind_tools, then invoke and stream, its defaults."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city"""
        return "sunny"

    chat = ChatOpenAI(model="weather", base_url=str(client.base_url), api_key="unused", temperature=0, max_tokens=48, max_retries=0)
    bound = chat.bind_tools([get_weather])
    called = bound.invoke("What's the weather in Paris?")
    assert [(call["name"], call["args"]) for call in called.tool_calls] == [("get_weather", {"city": "Paris"})]
    chunks = list(bound.stream("What's the weather in Paris?"))
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined += chunk
    assert [(call["name"], call["args"]) for call in joined.tool_calls] == [("get_weather", {"city": "Paris"})]
    answered = bound.invoke("Write a haiku about the sea.")
    assert not answered.tool_calls and answered.content and "<tool_call>" not in answered.content


def test_the_openai_agents_sdk_runs_an_agent_with_a_function_tool_whole_and_streamed(client):
    """OpenAI's Agents SDK as it is (the Responses API, its default): the model calls the tool, the
    SDK runs it and sends its result back, the model answers; then a second turn, then a streamed run."""
    import asyncio

    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # no network: nothing is exported
    asked = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city"""
        asked.append(city)
        return "sunny, 21 degrees"

    def weather_agent() -> Agent:  # an async client per event loop (run_sync and asyncio.run each make one)
        sdk_client = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0, timeout=120)
        return Agent(name="weather", tools=[get_weather], model=OpenAIResponsesModel(model="weather", openai_client=sdk_client),
                     model_settings=ModelSettings(temperature=0, max_tokens=48))

    agent = weather_agent()
    result = Runner.run_sync(agent, "What's the weather in Paris?", max_turns=4)
    assert asked == ["Paris"] and isinstance(result.final_output, str) and result.final_output.strip()
    assert [item.type for item in result.new_items][:2] == ["tool_call_item", "tool_call_output_item"]
    again = Runner.run_sync(weather_agent(), result.to_input_list() + [{"role": "user", "content": "Write a haiku about the sea."}], max_turns=4)
    assert asked == ["Paris"] and again.final_output.strip() and "<tool_call>" not in again.final_output

    async def streamed():
        run = Runner.run_streamed(weather_agent(), "What's the weather in Oslo?", max_turns=4)
        kinds = [event.type async for event in run.stream_events()]
        return run, kinds

    run, kinds = asyncio.run(streamed())
    assert asked == ["Paris", "Oslo"] and run.final_output.strip()
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
