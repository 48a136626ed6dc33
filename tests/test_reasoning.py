"""Models that think: a LoRA adapter trained here to think in ``<think>`` tags before it answers,
served with a chat template that says so, and an R1-style template whose generation prompt opens
the tag. Their thinking comes back apart from the answer on all three APIs, whole and streamed
alike; a schema and a tool apply to the answer only; Anthropic's ``thinking: disabled`` reaches the
template; answers without thinking are unchanged."""

import json
import logging
import shutil
from dataclasses import replace

import anthropic
import openai
import pytest
from conftest import OPENING, THINKING, built_once, job, running, template
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_worker.doors.app import create_app
from llm_worker.engine.thinking import FORCED_CLOSE, ThinkingBudget
from llm_worker.model.finetune import LoraTraining, train_lora
from llm_worker.model.reasoning import Reasoning, ReasoningSplitter, choice_body, detect
from llm_worker.service import Worker
from llm_worker.settings import ServerSettings, Settings

THOUGHT = "The user wants a short reply. I will greet them."
ANSWER = "Hello there, friend!"
SCHEMA = {"type": "object", "properties": {"greeting": {"type": "string", "maxLength": 24}}, "required": ["greeting"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# ---------------------------------------------------------------------- the splitter
@settings(max_examples=200, deadline=None)
@given(thought=st.text(alphabet="ab <>/thinkc\n", max_size=30), answer=st.text(alphabet="xy <>/\n", max_size=20),
       opened=st.booleans(), tagged=st.booleans(), cuts=st.lists(st.integers(0, 80), max_size=8))
def test_streamed_pieces_join_to_the_whole_split_however_the_text_is_cut(thought, answer, opened, tagged, cuts):
    thought = thought.replace("</think>", "")
    text = ("" if opened else "<think>") + thought + "</think>\n\n" + answer if tagged else answer
    reasoning = Reasoning(opened=opened)
    whole = reasoning.split(text)
    splitter, pieces, start = ReasoningSplitter(opened), [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        pieces += splitter.add(text[start:cut])
        start = max(start, cut)
    pieces += splitter.end()
    streamed = ("".join(p for kind, p in pieces if kind == "reasoning"), "".join(p for kind, p in pieces if kind == "content"))
    assert (whole[0] or "", whole[1]) == streamed
    if tagged and (opened or not answer.startswith(" ")):
        assert whole == (thought, answer.lstrip())
    if not tagged and not opened and not "<think>".startswith(answer.lstrip()[:7] or "x"):
        assert whole == (None, answer)


def test_which_prompts_think():
    assert detect(None, "anything") is None and detect("no tags here", "x") is None
    assert detect("... <think> ...", "<|im_start|>assistant\n") == Reasoning(opened=False)
    assert detect("... <think> ...", "<|im_start|>assistant\n<think>\n") == Reasoning(opened=True)
    assert detect("... <think> ...", "<|im_start|>assistant\n<think>\n\n</think>\n\n") is None  # enable_thinking false


# ---------------------------------------------------------------------- a model that thinks
@pytest.fixture(scope="module")
def served(base_model_dir, tmp_path_factory, pirate_adapter):
    """(the server's URL, its worker): the thinking adapter as ``thinker``, an adapter whose
    template opens the tag as ``opener``."""
    def build(folder):
        examples = [{"instruction": task, "output": f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"}
                    for task in ("Say hello.", "Greet me.", "Hi!", "Welcome me.", "Say hi to me.", "Hello?")]
        train_lora(base_model_dir, examples, folder, LoraTraining(steps=20, batch_size=3, learning_rate=3e-3, template="chat"))

    trained = built_once(tmp_path_factory, "thinker", build)
    adapters = tmp_path_factory.mktemp("thinking-adapters")
    shutil.copytree(trained, adapters / "thinker")
    (adapters / "thinker" / "chat_template.jinja").write_text(template(base_model_dir, THINKING))
    shutil.copytree(pirate_adapter, adapters / "opener")
    (adapters / "opener" / "chat_template.jinja").write_text(template(base_model_dir, OPENING))
    worker = Worker.start(Settings(dtype="float32", adapter_dir=adapters, kv_cache_tokens=4096))
    assert worker.load_error is None, worker.load_error
    with running(create_app(worker, ServerSettings())) as url:
        yield url, worker
    worker.close()


def chat(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(**body):
    return {"model": "thinker", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 60, "temperature": 0, **body}


def test_chat_completions_return_the_thinking_apart_whole_and_streamed(served):
    url, _ = served
    message = chat(url).chat.completions.create(**ask()).choices[0].message
    assert message.reasoning_content.strip() == THOUGHT and message.content == ANSWER
    thought, answer = "", ""
    for chunk in chat(url).chat.completions.create(**ask(stream=True)):
        delta = chunk.choices[0].delta if chunk.choices else None
        thought += getattr(delta, "reasoning_content", None) or "" if delta else ""
        answer += (delta.content or "") if delta else ""
    assert (thought, answer) == (message.reasoning_content, message.content)


def test_a_schema_and_a_tool_apply_to_the_answer_after_the_thinking(served):
    url, _ = served
    format_ = {"type": "json_schema", "json_schema": {"name": "greeting", "schema": SCHEMA}}
    answer = chat(url).chat.completions.create(**ask(response_format=format_, max_tokens=160)).choices[0]
    message = answer.message
    assert message.reasoning_content.strip() == THOUGHT and answer.finish_reason == "stop", answer
    assert set(json.loads(message.content)) == {"greeting"}
    called = chat(url).chat.completions.create(**ask(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=120)).choices[0]
    assert called.message.reasoning_content.strip() == THOUGHT and called.finish_reason == "tool_calls"
    assert called.message.tool_calls[0].function.name == "get_weather"


def test_the_responses_api_returns_a_reasoning_item_then_the_message(served):
    url, _ = served
    body = {"model": "thinker", "input": "Say hello.", "max_output_tokens": 60, "temperature": 0}
    response = chat(url).responses.create(**body)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text.strip() == THOUGHT and response.output_text == ANSWER
    events = list(chat(url).responses.create(**body, stream=True))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thought == response.output[0].content[0].text
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]


def test_messages_return_a_thinking_block_and_thinking_disabled_reaches_the_template(served, fp32_worker):
    url, _ = served
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120)
    body = {"model": "thinker", "max_tokens": 60, "messages": [{"role": "user", "content": "Say hello."}], "extra_body": {"temperature": 0}}
    message = client.messages.create(**body)
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking.strip() == THOUGHT and message.content[1].text == ANSWER
    with client.messages.stream(**body) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == [
        (b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in message.content]
    off = client.messages.create(**body, thinking={"type": "disabled"})
    assert [block.type for block in off.content] == ["text"]  # the template wrote an empty block: nothing to split


def test_a_prompt_that_opens_the_thinking_and_a_model_that_does_not_think(served):
    url, worker = served
    plain = chat(url).chat.completions.create(model="opener", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
                                              temperature=0).choices[0].message
    assert plain.content == "" and plain.reasoning_content  # opened and never closed: all of it is thinking
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(anthropic.BadRequestError, match="thinking: this model does not think here"):
        client.messages.create(model=worker.loaded.name, max_tokens=8, messages=[{"role": "user", "content": "Hi"}],
                               thinking={"type": "enabled", "budget_tokens": 4})
    with pytest.raises(openai.BadRequestError, match="thinking_token_budget: this model does not think here"):
        chat(url).chat.completions.create(model=worker.loaded.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                          extra_body={"thinking_token_budget": 4})


# ---------------------------------------------------------------------- a thinking budget
def test_the_engine_closes_the_thinking_when_its_budget_is_spent_and_the_answer_goes_on(fp32_worker):
    """Token for token: the answer's first ``budget`` tokens are the free answer's, then the close
    the engine writes, then the model's own tokens again; an answer that never opens the thinking
    is untouched; under a grammar the forced close is the grammar's too."""
    tokenizer = fp32_worker.loaded.tokenizer
    close = tuple(tokenizer.encode(FORCED_CLOSE, add_special_tokens=False))
    _, request = fp32_worker.prepare(job("Tell me about the moon.", max_new_tokens=24))
    free = fp32_worker.engine.generate(request).token_ids
    assert not any(token in close[1:4] for token in free)  # the model does not close a thinking by itself here
    bounded = fp32_worker.engine.generate(replace(request, thinking=ThinkingBudget(5, True, close))).token_ids
    assert bounded[:5] == free[:5] and tuple(bounded[5 : 5 + len(close)]) == close and len(bounded) > 5 + len(close)
    assert fp32_worker.engine.generate(replace(request, thinking=ThinkingBudget(5, False, close))).token_ids == free
    grammar = fp32_worker.grammars.compile_lark("choice", Reasoning(opened=True).grammar(choice_body(["yes", "no"])))
    chosen = fp32_worker.engine.generate(replace(request, grammar=grammar, thinking=ThinkingBudget(4, True, close)))
    assert chosen.finish_reason != "length" and tuple(chosen.token_ids[4 : 4 + len(close)]) == close
    assert Reasoning(opened=True).split(chosen.text)[1] in ("yes", "no")


def test_a_thinking_budget_bounds_the_thinking_on_each_api_and_the_answer_still_comes(served):
    url, worker = served
    free = chat(url).chat.completions.create(**ask()).choices[0].message
    thoughts = []
    for budget in (3, 6):
        message = chat(url).chat.completions.create(**ask(max_tokens=40, extra_body={"thinking_token_budget": budget})).choices[0].message
        thought = message.reasoning_content.strip()
        assert free.reasoning_content.strip().startswith(thought) and len(worker.loaded.tokenizer.encode(thought)) <= budget
        assert message.content  # the answer comes after the close the engine wrote
        thoughts.append(thought)
    streamed = "".join(getattr(chunk.choices[0].delta, "reasoning_content", None) or "" for chunk in chat(url).chat.completions.create(
        **ask(stream=True, extra_body={"thinking_token_budget": 3})) if chunk.choices)
    assert streamed.strip() == thoughts[0]
    assert len(thoughts[0]) < len(thoughts[1]) < len(free.reasoning_content.strip())
    format_ = {"type": "json_schema", "json_schema": {"name": "greeting", "schema": SCHEMA}}
    shaped = chat(url).chat.completions.create(**ask(response_format=format_, max_tokens=160, extra_body={"thinking_token_budget": 3}))
    assert shaped.choices[0].message.reasoning_content.strip() == thoughts[0] and set(json.loads(shaped.choices[0].message.content)) == {"greeting"}
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120)
    body = {"model": "thinker", "max_tokens": 60, "messages": [{"role": "user", "content": "Say hello."}], "extra_body": {"temperature": 0},
            "thinking": {"type": "enabled", "budget_tokens": 3}}
    message = client.messages.create(**body)
    assert [block.type for block in message.content] == ["thinking", "text"] and message.content[0].thinking.strip() == thoughts[0]
    with pytest.raises(anthropic.BadRequestError, match=r"thinking.budget_tokens: must be less than max_tokens \(60\)"):
        client.messages.create(**{**body, "thinking": {"type": "enabled", "budget_tokens": 60}})


def test_answers_without_thinking_have_no_reasoning_field(served):
    url, worker = served
    message = chat(url).chat.completions.create(model=worker.loaded.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                                temperature=0).choices[0].message
    assert "reasoning_content" not in message.model_dump(exclude_unset=True)


def test_the_start_log_says_whether_the_chat_template_thinks(base_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="llm_worker"):
        worker = Worker.start(Settings(dtype="float32", chat_template=template(base_model_dir, THINKING), kv_cache_tokens=1024))
    worker.close()
    assert "The chat template thinks (<think> ... </think>): the thinking comes back apart from the answer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llm_worker"):
        worker = Worker.start(Settings(dtype="float32", kv_cache_tokens=1024))
    worker.close()
    assert "The chat template does not think" in caplog.text
