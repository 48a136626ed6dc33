"""Constrained decoding: every answer that ends with eos or stop follows its JSON schema (checked
with jsonschema), regex or choice list, greedy and sampled, mixed in one burst with free jobs;
refusals name the field; streaming, n, seeds, logprobs, adapters and stop strings keep working;
the OpenAI door's response_format and tool calls through the openai client."""

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys

import jsonschema
import llguidance
import llguidance.torch
import openai
import pytest
import torch
from conftest import ROOT, doc_blocks, job, running, uncached
from openai.types.chat import ChatCompletion
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from llm_worker.engine.constraints import MaskComputer
from llm_worker.doors.app import create_app
from llm_worker.service import Worker, collect
from llm_worker.settings import ServerSettings, Settings

S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(required=None, **properties):
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required}


# (what to ask for, the schema): nested objects, arrays with bounds, enums, anyOf, numbers with
# bounds, strings with pattern and format, required and optional fields.
SCHEMAS = [
    ("a person", obj(name=S, age=I)),
    ("a city and its country", obj(city=S, country=S)),
    ("a book", obj(title=S, author=S, year={"type": "integer", "minimum": 1450, "maximum": 2030})),
    ("a yes/no verdict", obj(verdict=B)),
    ("a temperature reading", obj(celsius={"type": "number", "minimum": -90, "maximum": 60})),
    ("a sentiment label", obj(sentiment={"enum": ["positive", "negative", "neutral"]})),
    ("a list of three colors", obj(colors={"type": "array", "items": S, "minItems": 3, "maxItems": 3})),
    ("a shopping list", obj(items={"type": "array", "items": obj(name=S, quantity={"type": "integer", "minimum": 1}), "maxItems": 3})),
    ("an address", obj(address=obj(street=S, city=S, zip={"type": "string", "pattern": "^[0-9]{5}$"}))),
    ("a date", obj(date={"type": "string", "format": "date"})),
    ("an email contact", obj(email={"type": "string", "format": "email"})),
    ("a product code", obj(sku={"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"})),
    ("a score or nothing", obj(score={"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10}, {"type": "null"}]})),
    ("an id, a number or a word", obj(id={"anyOf": [I, S]})),
    ("a movie with optional rating", obj(required=["title"], title=S, rating={"type": "number", "minimum": 0, "maximum": 5})),
    ("a user with optional nickname", obj(required=["name"], name=S, nickname=S)),
    ("a point", obj(x=N, y=N)),
    ("a rectangle", obj(top_left=obj(x=I, y=I), bottom_right=obj(x=I, y=I))),
    ("tags", obj(tags={"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 4})),
    ("a matrix", obj(rows={"type": "array", "items": {"type": "array", "items": I, "maxItems": 2}, "maxItems": 2})),
    ("a weekday", obj(day={"enum": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]})),
    ("a priority", obj(priority={"type": "integer", "enum": [1, 2, 3]})),
    ("a fixed version", obj(version={"const": "v1"}, name=S)),
    ("a short word", obj(word={"type": "string", "minLength": 2, "maxLength": 8})),
    ("a percentage", obj(percent={"type": "integer", "minimum": 0, "maximum": 100})),
    ("a price", obj(amount={"type": "number", "exclusiveMinimum": 0}, currency={"enum": ["USD", "EUR"]})),
    ("a flag and a count", obj(enabled=B, count={"type": "integer", "minimum": 0, "maximum": 9})),
    ("a recipe", obj(name=S, steps={"type": "array", "items": S, "minItems": 1, "maxItems": 2})),
    ("an event", obj(name=S, when=obj(date={"type": "string", "format": "date"}, time={"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}))),
    ("a pet", {"anyOf": [obj(kind={"const": "dog"}, barks=B), obj(kind={"const": "cat"}, lives={"type": "integer", "maximum": 9})]}),
    ("a list of numbers", {"type": "array", "items": I, "minItems": 2, "maxItems": 4}),
    ("a name", {"type": "string", "maxLength": 20}),
    ("a referenced person", {"$defs": {"person": obj(name=S)}, "type": "object", "properties": {"boss": {"$ref": "#/$defs/person"}}, "required": ["boss"]}),
]
REGEXES = [
    ("a phone number", r"\d{3}-\d{4}"),
    ("a time of day", r"([01][0-9]|2[0-3]):[0-5][0-9]"),
    ("a hex color", r"#[0-9a-f]{6}"),
    ("a yes or no, capitalised", r"(Yes|No)\.?"),
    ("an uppercase code", r"[A-Z]{2,4}[0-9]{1,3}"),
]
CHOICES = [
    ("Is water wet?", ["yes", "no"]),
    ("Pick a primary color.", ["red", "green", "blue"]),
    ("What is the capital of France?", ["Paris", "Lyon", "Marseille"]),
    ("Rate this: 'great product'.", ["positive", "negative", "neutral"]),
]
FINISHED = ("eos", "stop")


def ask(what: str, **generation) -> dict:
    return {
        "prompt_config": {"instruction": f"Answer with {what}.", "template": "chat"},
        "generation_config": {"max_new_tokens": 64, **generation},
    }


def follows(output: str, field: str, spec) -> bool:
    if field == "json_schema":
        jsonschema.validate(json.loads(output), spec, format_checker=jsonschema.FormatChecker())
        return True
    if field == "regex":
        return re.fullmatch(spec, output) is not None
    return output in spec


def burst(worker, jobs: list[dict]) -> list[dict]:
    async def everyone():
        return await asyncio.gather(*(collect(worker.handle(j)) for j in jobs))

    return asyncio.run(everyone())


def test_schemas_regexes_and_choices_hold_in_a_mixed_burst(fp32_worker):
    """All in one burst: every schema greedy and sampled, the regexes, the choices, and free jobs."""
    cases = [("json_schema", spec, ask(f"JSON: {what}", json_schema=spec)) for what, spec in SCHEMAS]
    cases += [
        ("json_schema", spec, ask(f"JSON: {what}", json_schema=spec, do_sample=True, temperature=0.9, seed=i))
        for i, (what, spec) in enumerate(SCHEMAS)
    ]
    cases += [("regex", spec, ask(what, regex=spec, max_new_tokens=16)) for what, spec in REGEXES]
    cases += [("regex", spec, ask(what, regex=spec, max_new_tokens=16, do_sample=True, seed=5)) for what, spec in REGEXES]
    cases += [("choice", spec, {**job(q, choice=spec, max_new_tokens=8), "prompt_config": {"instruction": q, "template": "chat"}}) for q, spec in CHOICES]
    free = [job("Name a fruit.", max_new_tokens=12), job("Count to five.", max_new_tokens=12, do_sample=True, seed=1)]
    results = burst(fp32_worker, [case[2] for case in cases] + free)
    answered = results[: len(cases)]
    assert all("error" not in r for r in results), [r for r in results if "error" in r]
    for (field, spec, _), result in zip(cases, answered):
        if result["finish_reason"] in FINISHED:
            assert follows(result["output"], field, spec), (field, spec, result["output"])
        else:
            assert result["finish_reason"] == "length" and result["usage"]["completion_tokens"] == 64, result
    finished = sum(result["finish_reason"] in FINISHED for result in answered)
    assert finished >= 0.9 * len(cases), f"only {finished} of {len(cases)} constrained answers finished"
    assert all(free_answer["output"] for free_answer in results[len(cases) :])
    # each constrained answer is the one it gets alone (fp32: batching changes nothing)
    for index in (0, 5, len(SCHEMAS) + 3, len(cases) - 1):
        assert uncached(fp32_worker.complete(cases[index][2])) == uncached(answered[index])


def test_a_schema_compiles_once(fp32_worker):
    spec = obj(unique_field_for_this_test=S)
    before = fp32_worker.grammars.compiled
    first = fp32_worker.complete(ask("JSON", json_schema=spec, max_new_tokens=24))
    second = fp32_worker.complete(ask("JSON", json_schema=dict(reversed(list(spec.items()))), max_new_tokens=24))
    assert fp32_worker.grammars.compiled == before + 1 and uncached(first) == uncached(second)


@pytest.mark.parametrize(
    "generation, field, reason",
    [
        ({"json_schema": {"type": "objectx"}}, "generation_config.json_schema", "Invalid type"),
        ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "generation_config.json_schema", "Unsatisfiable"),
        ({"json_schema": {"$ref": "#/$defs/missing"}}, "generation_config.json_schema", "missing"),
        ({"json_schema": "{}"}, "generation_config.json_schema", "dictionary"),
        ({"regex": r"(a)\1"}, "generation_config.regex", "backreferences"),
        ({"regex": r"(?=a)a"}, "generation_config.regex", "look-around"),
        ({"regex": "("}, "generation_config.regex", "regex"),
        ({"choice": []}, "generation_config.choice", "at least 1"),
        ({"choice": ["a", ""]}, "generation_config.choice.1", "at least 1"),
        ({"choice": [f"option {i}" for i in range(9000)]}, "generation_config.choice", "at most 65536"),
        ({"json_schema": {"enum": [f"value {i:05}" for i in range(7000)]}}, "generation_config.json_schema", "at most 65536"),
        ({"json_schema": {"type": "object", "properties": {"a": I}}, "regex": "a"}, "generation_config", "exclusive"),
        ({"regex": "a", "num_beams": 2}, "generation_config", "num_beams"),
        ({"regex": "a", "min_new_tokens": 2}, "generation_config", "min_new_tokens"),
        ({"choice": ["a"], "no_repeat_ngram_size": 2}, "generation_config", "no_repeat_ngram_size"),
    ],
)
def test_what_cannot_be_compiled_is_refused_naming_the_field(worker, generation, field, reason):
    error = worker.complete(ask("x", **generation))["error"]
    assert error.startswith(f"{field}: ") and reason in error, error
    assert "\n" not in error


def test_hostile_constraints_are_bounded(fp32_worker):
    """Deep nesting is refused; a pathological regex compiles lazily and its steps stay bounded."""
    deep = {"type": "string"}
    for _ in range(40):
        deep = obj(x=deep)
    error = fp32_worker.complete(ask("JSON", json_schema=deep))["error"]
    assert error.startswith("generation_config.json_schema: nested") and "at most 32" in error
    for pattern in (r"(a*)*b", r"(a|aa)*c", r"a{1000}{1000}", r"(x+x+)+y"):
        result = fp32_worker.complete(ask("letters", regex=pattern, max_new_tokens=12))
        assert "error" not in result or result["error"].startswith("generation failed"), result
        if result.get("finish_reason") in FINISHED:
            assert re.fullmatch(pattern, result["output"])
    assert fp32_worker.complete(job("Name a fruit.", max_new_tokens=4))["finish_reason"] == "length"  # still serving


def test_an_answer_cut_by_max_new_tokens_says_length(fp32_worker):
    result = fp32_worker.complete(ask("JSON: a book", json_schema=SCHEMAS[2][1], max_new_tokens=5))
    assert result["finish_reason"] == "length" and result["usage"]["completion_tokens"] == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(result["output"])


def test_a_stop_string_does_not_end_a_constrained_answer_early(fp32_worker):
    spec = obj(city=S, country=S)
    plain = fp32_worker.complete(ask("JSON: a city and its country", json_schema=spec))
    assert plain["finish_reason"] == "eos" and ", " in plain["output"]
    stopped = fp32_worker.complete(ask("JSON: a city and its country", json_schema=spec, stop=[", ", '"}']))
    assert uncached(stopped) == uncached(plain)  # both stop strings occur inside the JSON: neither may cut it
    free = fp32_worker.complete(ask("a city and its country", stop=[" "], max_new_tokens=16))
    assert free["finish_reason"] == "stop"  # stop strings still end unconstrained answers
    choice = fp32_worker.complete({**job("Pick", choice=["red dog", "blue"], stop=["red"]), "prompt_config": {"instruction": "Say red dog.", "template": "chat"}})
    assert choice["output"] in ("red dog", "blue")


def test_streaming_n_seeds_and_logprobs_work_with_constraints(fp32_worker):
    spec = obj(name=S, age=I)
    plain = fp32_worker.complete(ask("JSON: a person", json_schema=spec))
    chunks = asyncio.run(_chunks(fp32_worker, {**ask("JSON: a person", json_schema=spec), "stream": True}))
    assert "".join(c["delta"] for c in chunks) == plain["output"] and chunks[-1]["finish_reason"] == plain["finish_reason"]

    sampled = ask("JSON: a person", json_schema=spec, do_sample=True, temperature=1.0, seed=11, n=3, logprobs=2)
    first, again = fp32_worker.complete(sampled), fp32_worker.complete(sampled)
    assert uncached(first) == uncached(again)  # seeded
    outputs = [choice["output"] for choice in first["choices"]]
    assert len(set(outputs)) > 1
    for choice in first["choices"]:
        if choice["finish_reason"] in FINISHED:
            jsonschema.validate(json.loads(choice["output"]), spec)
        assert len(choice["logprobs"]) >= 1 and all(item["logprob"] <= 0 for item in choice["logprobs"])
        forced = [item for item in choice["logprobs"] if item["token"] in ('{"', "name")]
        assert all(item["logprob"] > -1e-3 for item in forced)  # the grammar left one possible token


async def _chunks(worker, raw):
    return [chunk async for chunk in worker.handle(raw)]


def test_an_adapter_answers_under_a_constraint(base_model_dir, tmp_path):
    folder = tmp_path / "noisy"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(folder)
    worker = Worker.start(Settings(dtype="float32", lora_adapters=f"noisy={folder}"))
    try:
        spec = obj(name=S, age=I)
        base, adapted = burst(worker, [ask("JSON: a person", json_schema=spec), {**ask("JSON: a person", json_schema=spec), "adapter": "noisy"}])
        assert adapted["adapter"] == "noisy" and adapted["output"] != base["output"]
        for result in (base, adapted):
            if result["finish_reason"] in FINISHED:
                jsonschema.validate(json.loads(result["output"]), spec)
    finally:
        worker.close()


def test_masks_unpack_as_llguidance_applies_them(fp32_worker):
    grammar = fp32_worker.grammars.compile("choice", ["yes", "no"])
    vocab = fp32_worker.engine.vocab
    masks = MaskComputer(vocab, torch.device("cpu"))
    banned = masks.banned(masks.start([None, grammar.start(), None]))
    logits = torch.zeros(3, vocab)
    bitmask = llguidance.torch.allocate_token_bitmask(3, vocab)
    llguidance.torch.fill_next_token_bitmask(grammar.start(), bitmask, 1)
    llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
    assert torch.equal(banned, torch.isinf(logits))
    assert not banned[0].any() and not banned[2].any() and 0 < (~banned[1]).sum() < 100
    masks.close()
    assert isinstance(grammar.matcher, llguidance.LLMatcher)


# ---------------------------------------------------------------------- the OpenAI door
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": obj(city=S, unit={"enum": ["celsius", "fahrenheit"]}),
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": obj(timezone={"type": "string", "maxLength": 30})}}
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server_url(fp32_worker):
    with running(create_app(fp32_worker, ServerSettings())) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=120)


def page_examples() -> list[tuple[str, str]]:
    """The structured-output page: each command with the output shown after it."""
    blocks = doc_blocks("docs/structured-output.md")
    assert [lang for lang, _ in blocks] == ["bash", "json"] * 4
    return [(blocks[i][1], blocks[i + 1][1]) for i in range(0, len(blocks), 2)]


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's commands use curl")
@pytest.mark.parametrize("index", range(4))
def test_the_pages_examples_print_what_it_shows(server_url, index):
    command, shown = page_examples()[index]
    script = command.replace("http://localhost:8000", server_url).replace(".venv/bin/python", shlex.quote(sys.executable))
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert uncached(json.loads(done.stdout)) == uncached(json.loads(shown))


def test_response_format_through_the_openai_client(client):
    messages = [{"role": "user", "content": "Give me a person as JSON."}]
    spec = obj(name=S, age={"type": "integer", "minimum": 0, "maximum": 120})
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": spec, "strict": True}},
    )
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), spec)
    anything = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0, response_format={"type": "json_object"})
    content = anything.choices[0].message.content  # any object: this small model may go on past 48 tokens
    assert content.startswith("{") and (anything.choices[0].finish_reason == "length" or isinstance(json.loads(content), dict))
    completion = client.completions.create(model=MODEL, prompt="Is fire hot? Answer:", max_tokens=4, extra_body={"guided_choice": ["yes", "no"]})
    assert completion.choices[0].text in ("yes", "no")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=messages, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
        )
    assert refused.value.param == "response_format" and "nope" in refused.value.message


def test_tool_calls_plain_and_streamed_through_the_openai_client(client):
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False, max_tokens=64, temperature=0
    )
    assert isinstance(answer, ChatCompletion) and answer.choices[0].finish_reason == "tool_calls"
    (call,) = answer.choices[0].message.tool_calls
    assert answer.choices[0].message.content is None and call.type == "function" and call.id.startswith("call_")
    parameters = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), parameters)

    stream = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False, max_tokens=64,
        temperature=0, stream=True,
    )
    name, arguments, pieces, finish = None, "", 0, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            name = piece.function.name or name
            arguments += piece.function.arguments or ""
            pieces += 1
        finish = chunk.choices[0].finish_reason or finish
    assert (name, arguments, finish) == (call.function.name, call.function.arguments, "tool_calls") and pieces > 3

    named = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER, CLOCK], max_tokens=64, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"
    followed = client.chat.completions.create(
        model=MODEL, max_tokens=24, temperature=0,
        messages=messages + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'},
        ],
    )
    assert followed.choices[0].message.content
    auto = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=64, temperature=0).choices[0]
    assert auto.message.tool_calls or (auto.message.content and "<tool_call>" not in auto.message.content)  # the model's choice
