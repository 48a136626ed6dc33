"""Tool-call formats other than Hermes' tags: a chat template that writes calls as Llama 3.1-3.3
do (the answer is ``{"name": ..., "parameters": {...}}``, one call) is served in that format: the
grammar, the streamed splitter and the parser read it, and the embedded model, given such a
template, answers calls that parse into OpenAI's ``tool_calls`` through the ``openai`` client, its
earlier calls written back by the template. Templates in formats not read here are refused."""

import json
import random

import jsonschema
import openai
import pytest
from conftest import running
from test_tool_calls import CLOCK, TOOLS, WEATHER
from transformers import AutoTokenizer

from llm_worker.doors.app import create_app
from llm_worker.openai.errors import OpenAIError
from llm_worker.openai.tool_calls import LLAMA3_JSON, CallSplitter, call_grammar, parse_calls, tool_format
from llm_worker.service import Worker
from llm_worker.settings import ServerSettings, Settings

# Written for this test in the way Llama 3.1's template writes tools and calls (SmolLM2's turn
# markers, so that the embedded model reads it): the functions and the JSON format in a system
# turn, an earlier call as {"name", "parameters"}, a result as an "ipython" turn.
LLAMA_STYLE = (
    "{% if tools %}<|im_start|>system\nTo call a function, answer with JSON in the format "
    '{"name": function name, "parameters": dictionary of argument name and its value}. Functions:\n'
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{% endfor %}<|im_end|>\n'
    "{% elif m.role == 'tool' %}<|im_start|>ipython\n{{ {'output': m.content} | tojson }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_STYLE = (
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | map(attribute='function') | list | tojson }}"
    "{% else %}[INST]{{ m.content }}[/INST]{% endif %}{% endfor %}"
)


def call(city: str) -> str:
    return '{"name": "get_weather", "parameters": {"city": "%s"}}' % city


def test_the_template_says_which_format(base_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    assert tool_format(tokenizer, LLAMA_STYLE) is LLAMA3_JSON
    with pytest.raises(OpenAIError, match="proven: Hermes/Qwen <tool_call> tags, Llama 3.1-3.3's JSON") as refused:
        tool_format(tokenizer, MISTRAL_STYLE)
    assert refused.value.body["error"]["param"] == "tool_choice"


def test_the_grammar_offers_text_that_is_not_json_or_one_valid_call(fp32_worker):
    auto = fp32_worker.grammars.compile_lark("tools", call_grammar(TOOLS, text=True, parallel=True, fmt=LLAMA3_JSON))
    assert auto.accepts("It is sunny in {Paris}.") and auto.accepts(call("Paris"))
    assert auto.accepts('{"name": "get_time", "parameters": {"zone": "CET"}}')
    assert not auto.accepts(" " + call("Paris")) and not auto.accepts("{not a call}")  # text never begins as a call does
    assert not auto.accepts('{"name": "get_weather", "arguments": {"city": "Paris"}}')  # Hermes' key
    assert not auto.accepts('{"name": "get_weather", "parameters": {"town": "Paris"}}')  # not its schema
    assert not auto.accepts(call("Paris") + "; " + call("Rome"))  # one call per answer, as its templates take them
    required = fp32_worker.grammars.compile_lark("tools", call_grammar(TOOLS, text=False, parallel=True, fmt=LLAMA3_JSON))
    assert required.accepts(call("Oslo")) and not required.accepts("Sunny.")


@pytest.mark.parametrize("seed", range(4))
def test_the_splitter_streams_the_text_or_the_call(seed):
    rng = random.Random(seed)
    arguments = {"zone": "Europe/Oslo, \"CET\" {x}"}
    answers = {"text": "Sunny, {about} 21 degrees.", "call": json.dumps({"name": "get_time", "parameters": arguments})}
    for kind, answer in answers.items():
        cuts = sorted(rng.sample(range(1, len(answer)), rng.randint(1, 10)))
        pieces = [answer[i:j] for i, j in zip([0, *cuts], [*cuts, len(answer)])]
        splitter = CallSplitter(text=True, fmt=LLAMA3_JSON)
        events = [event for piece in pieces for event in splitter.add(piece)] + splitter.end(complete=True)
        if kind == "text":
            assert events and all(e[0] == "text" for e in events) and "".join(e[1] for e in events) == answer
            assert parse_calls(answer, LLAMA3_JSON) is None
            continue
        assert all(e[0] == "call" and e[1] == 0 for e in events)
        assert [e[2] for e in events if e[2] is not None] == ["get_time"]
        assert json.loads("".join(e[3] for e in events)) == arguments
        assert parse_calls(answer, LLAMA3_JSON) == [("get_time", arguments)]


@pytest.fixture(scope="module")
def client(base_model_dir):
    worker = Worker.start(Settings(dtype="float32", chat_template=LLAMA_STYLE))
    app = create_app(worker, ServerSettings())
    with running(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120), url
    worker.close()


def test_a_llama_style_template_gets_calls_as_openais_tool_calls(client):
    client, url = client
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    body = {"model": "SmolLM2-135M-Instruct", "messages": messages, "tools": [WEATHER, CLOCK], "max_tokens": 48, "temperature": 0}
    answer = client.chat.completions.create(tool_choice="required", **body).choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    (made,) = answer.message.tool_calls
    schema = {"get_weather": WEATHER, "get_time": CLOCK}[made.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(made.function.arguments), schema)
    streamed, name = "", None
    for chunk in client.chat.completions.create(tool_choice="required", stream=True, **body):
        for piece in chunk.choices[0].delta.tool_calls or []:
            name = piece.function.name or name
            streamed += piece.function.arguments or ""
        assert not chunk.choices[0].delta.content  # never the raw JSON as text
    assert (name, streamed) == (made.function.name, made.function.arguments)
    # "auto": the model decides; either way the answer is whole, and text never begins as a call
    auto = client.chat.completions.create(**body).choices[0]
    if auto.message.tool_calls:
        assert auto.finish_reason == "tool_calls" and len(auto.message.tool_calls) == 1
    else:
        assert auto.finish_reason in ("stop", "length") and not auto.message.content.lstrip().startswith("{")
    # the next turn: the template writes the call back in its own format, then the result
    turn = [*messages, answer.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": made.id, "content": "Sunny, 21 C"}]
    tokens = openai.OpenAI(base_url=url, api_key="unused").post("/tokenize", body={"messages": turn}, cast_to=object)
    written = openai.OpenAI(base_url=url, api_key="unused").post("/detokenize", body={"tokens": tokens["tokens"]}, cast_to=object)["prompt"]
    expected = json.dumps({"name": made.function.name, "parameters": json.loads(made.function.arguments)})
    assert expected in written and '<|im_start|>ipython\n{"output": "Sunny, 21 C"}' in written
    final = client.chat.completions.create(**{**body, "messages": turn}, tool_choice="none").choices[0]
    assert final.message.content and final.message.tool_calls is None
