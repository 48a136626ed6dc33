"""A validated request turned into ``Worker`` calls: the prompt (the chat template, or the
completion's text), the served model or adapter it names, its constraint (``response_format``,
vLLM's ``guided_*``, tools) and its native generation settings, ``n`` engine requests per prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError
from pydantic import ValidationError

from llm_worker.engine import GenerationRequest
from llm_worker.engine.constraints import JSON_LAYOUT, closed_objects
from llm_worker.engine.thinking import FORCED_CLOSE, ThinkingBudget
from llm_worker.errors import InputError
from llm_worker.model.adapters import AdapterError
from llm_worker.model.prompts import file_templates, render_prompt
from llm_worker.openai.errors import OpenAIError
from llm_worker.openai.requests import (
    CHAT,
    ChatRequest,
    CompletionRequest,
    JsonObjectFormat,
    JsonSchemaResponseFormat,
    Message,
    NamedToolChoice,
    Tool,
    _Request,
    parse,
)
from llm_worker.model.reasoning import Reasoning, choice_body, detect, wrap_lark
from llm_worker.openai.tool_calls import HERMES, ToolFormat, call_grammar, describe_tools, offered_tools, tool_format
from llm_worker.schema import GenerationConfig
from llm_worker.settings import BASE_ADAPTER_NAME

if TYPE_CHECKING:
    from llm_worker.service import Worker


@dataclass(frozen=True)
class Prepared:
    """A validated request turned into engine requests (``n`` per prompt, flat)."""

    body: _Request
    model: str
    requests: list[GenerationRequest]
    prompts: int
    tool_calls: str | None = None  # auto: each answer is text or calls of the request's tools; required: calls
    tool_format: ToolFormat = HERMES  # how the answers write their calls
    echo: tuple[Echo, ...] | None = None  # completions with echo: each prompt, to begin its answers
    prompt_only: bool = False  # max_tokens 0: the engine's one token is not part of the answer
    reasoning: Reasoning | None = None  # the answers think first (``reasoning.py``)


@dataclass(frozen=True)
class Echo:
    """A completion's prompt as its answer begins with it: the text as sent (token ids: decoded), and its tokens."""

    text: str
    ids: list[int]


def completion_prompts(worker: Worker, prompt: str | list[str] | list[int] | list[list[int]]) -> list[Echo]:
    """A completion's prompts: one text, several, one prompt of token ids, or several."""
    tokenizer = worker.loaded.tokenizer
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise OpenAIError("prompt: must not be empty", "prompt")
    prompts = []
    for i, item in enumerate(prompt):
        param = f"prompt[{i}]" if len(prompt) > 1 else "prompt"
        if isinstance(item, str):
            prompts.append(Echo(item, tokenizer(item)["input_ids"]))
            continue
        if not item:
            raise OpenAIError(f"{param}: a prompt of token ids must not be empty", param)
        vocab = worker.engine.vocab
        wrong = next((token for token in item if not 0 <= token < vocab), None)
        if wrong is not None:
            raise OpenAIError(f"{param}: token id {wrong} is not in the vocabulary (0 to {vocab - 1})", param)
        prompts.append(Echo(tokenizer.decode(item), list(item)))
    return prompts


def chat_template(worker: Worker, adapter: str | None) -> str | None:
    """The chat template a request gets: ``CHAT_TEMPLATE``, else the one its adapter's folder
    ships, else (None) the model's own."""
    if worker.settings.chat_template is not None:
        return worker.settings.chat_template
    name = worker.adapters.choose(adapter)  # the default adapter (LORA_WEIGHTS) too
    if name is None or name == worker.adapters.merged:  # a merged adapter's folder is not served as one
        return None
    try:
        return worker.adapters.chat_template(name)
    except AdapterError as err:
        raise OpenAIError(f"model: {err}", "model") from None


def chat_prompt(
    worker: Worker, messages: list[Message], tools: list[Tool] | None = None, offered: list[Tool] | None = None,
    adapter: str | None = None, continued: bool = False, template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[int], tuple[str, ...]]:
    """Token ids of the conversation through the chat template (``chat_template``), and the stop
    strings that template implies. ``offered``: the tools the answer may call; a template that
    ignores tools gets them described (``tool_calls.describe_tools``). ``continued``: the answer
    continues the last message (a prefill), left open."""
    tokenizer = worker.loaded.tokenizer
    template = chat_template(worker, adapter)
    if template not in file_templates() and offered and tool_format(tokenizer, template).describe:
        return _render(worker, describe_tools(messages, offered), None, template, continued, template_kwargs)
    if template in file_templates():
        if tools or any(m.role == "tool" for m in messages):
            raise OpenAIError(f"tools: CHAT_TEMPLATE={template} has no place for tools or their results", "tools")
        if [m.role for m in messages if m.role == "assistant"] or sum(m.role == "user" for m in messages) != 1:
            raise OpenAIError(
                f"messages: CHAT_TEMPLATE={template} holds one instruction: send one user message "
                "(system messages are put before it)",
                "messages",
            )
        instruction = "\n\n".join(m.text for m in messages if m.role != "user") + "\n\n" if len(messages) > 1 else ""
        prompt = render_prompt(tokenizer, template, instruction + next(m.text for m in messages if m.role == "user"))
        ids = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        return ids, prompt.stop
    functions = [tool.model_dump(exclude_none=True) for tool in tools] if tools else None
    return _render(worker, [m.for_template() for m in messages], functions, template, continued, template_kwargs)


def _render(
    worker: Worker, conversation: list[dict[str, Any]], functions: list[dict[str, Any]] | None, template: str | None,
    continued: bool = False, template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[int], tuple[str, ...]]:
    tokenizer = worker.loaded.tokenizer
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(
            f"messages: the model {worker.loaded.name} has no chat template: set CHAT_TEMPLATE (Jinja text, or alpaca "
            "for Alpaca-LoRA adapters), or send the prompt to /v1/completions",
            "messages",
            "no_chat_template",
        )
    try:
        text = tokenizer.apply_chat_template(
            conversation, tools=functions, chat_template=template, tokenize=False, add_generation_prompt=not continued,
            continue_final_message=continued, **(template_kwargs or {}),
        )
    except (TemplateError, ValueError) as err:
        raise OpenAIError(f"messages: the chat template refused them: {err}", "messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"], ()


def adapter_for(worker: Worker, model: str | None) -> str | None:
    """``model`` as the native ``adapter`` field: the served model's name (or none) is no adapter field."""
    if model is None or model == worker.loaded.name:
        return None
    try:
        worker.adapters.choose(model)
    except InputError:
        raise OpenAIError(
            f"The model {model!r} does not exist; available: {', '.join(model_names(worker))}",
            "model",
            "model_not_found",
            status=404,
        ) from None
    return model


def constraint(request: _Request) -> tuple[str, str, Any] | None:
    """The request's constraint as (native field, the parameter that asked for it, value)."""
    found = []
    format_ = request.response_format
    if isinstance(format_, JsonObjectFormat):
        found.append(("json_schema", "response_format", {"type": "object"}))
    elif isinstance(format_, JsonSchemaResponseFormat):
        found.append(("json_schema", "response_format", format_.json_schema.schema_ or {"type": "object"}))
    for field, param in (("json_schema", "guided_json"), ("regex", "guided_regex"), ("choice", "guided_choice")):
        if getattr(request, param) is not None:
            found.append((field, param, getattr(request, param)))
    if isinstance(request, ChatRequest) and offered_tools(request)[0]:
        found.append(("tools", "tools", None))
    if len(found) > 1:
        names = " and ".join(param for _, param, _ in found)
        raise OpenAIError(f"{names}: at most one of them may constrain the answer", found[1][1])
    return found[0] if found else None


def prepare(worker: Worker, route: str, body: Any, job_id: str | None = None) -> Prepared:
    chat = route == CHAT
    request = parse(ChatRequest if chat else CompletionRequest, body)
    adapter = adapter_for(worker, request.model)
    constrained = constraint(request)
    offered, text = offered_tools(request) if chat else ([], True)
    if offered and request.logprobs:
        raise OpenAIError("logprobs: not available with tools (an answer may be calls, whose tokens are not text)", "logprobs")
    if chat:
        prompts = [chat_prompt(worker, request.messages, request.tools, offered, adapter, request.continue_final_message,
                               request.chat_template_kwargs)]
        reasoning = thinking(worker, adapter, prompts[0][0])
        fmt = tool_format(worker.loaded.tokenizer, chat_template(worker, adapter)) if offered else HERMES  # read by chat_prompt
        max_tokens, max_param = request.max_completion_tokens or request.max_tokens, (
            "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        )
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        echoes = completion_prompts(worker, request.prompt)
        prompts = [(echo.ids, ()) for echo in echoes]
        reasoning = None  # a completion is the text as generated
        max_tokens, max_param, logprobs = request.max_tokens, "max_tokens", request.logprobs
        prompt_only = max_tokens == 0
        if prompt_only:  # the engine answers at least one token: it is left out of the answer
            max_tokens = 1
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    requests = []
    for ids, template_stop in prompts:
        generation: dict[str, Any] = {
            "max_new_tokens": max_tokens or default_max_tokens(worker, len(ids)),
            "stop": stop,
            "n": request.n,
            "logprobs": logprobs,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "repetition_penalty": request.repetition_penalty,
            "logit_bias": request.logit_bias,
            "stop_token_ids": request.stop_token_ids or [],
            "ignore_eos": request.ignore_eos,
        }
        if request.temperature > 0:  # temperature 0 is greedy: top_p, top_k, min_p and seed have no effect, as in OpenAI's API
            generation.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, seed=request.seed)
            generation.update({name: getattr(request, name) for name in ("top_k", "min_p") if getattr(request, name) is not None})
        params = {
            "max_new_tokens": max_param, "stop": "stop", "prompt_config": "messages" if chat else "prompt", "adapter": "model", "tools": "tools",
        }
        if constrained and not offered and not reasoning:
            field, param, value = constrained
            generation[field] = value
            params[field] = param
        try:
            config = GenerationConfig.model_validate(generation, context={"limits": worker.limits})
            base = worker.request(ids, config, tuple(stop) + template_stop, adapter, job_id)
            if offered:
                parallel = request.parallel_tool_calls is not False and not isinstance(request.tool_choice, NamedToolChoice)
                grammar = call_grammar(offered, text, parallel, fmt)  # a named function: that one call
                strict = any(tool.function.strict for tool in offered)
                if reasoning:  # the calls come after the thinking
                    grammar = reasoning.grammar("answer_start") + "\n" + wrap_lark(grammar)
                base = replace(base, grammar=worker.grammars.compile_lark("tools", grammar, strict))
            elif reasoning and constrained:
                base = replace(base, grammar=thinking_grammar(worker, reasoning, constrained, request))
            elif isinstance(request.response_format, JsonSchemaResponseFormat) and request.response_format.json_schema.strict:
                worker.grammars.compile("json_schema", generation["json_schema"], strict=True)  # OpenAI's strict: all enforced
            if chat and request.thinking_token_budget is not None:
                base = replace(base, thinking=thinking_budget(worker, reasoning, request.thinking_token_budget))
            if chat and request.continue_final_message:  # the text goes on from the prefill: its leading space is kept
                base = replace(base, strip=False)
            if not chat:  # a completion is the text exactly as generated, leading space included (OpenAI, vLLM)
                scored = logprobs if request.echo else None
                base = replace(base, strip=False, prompt_logprobs=scored)
        except ValidationError as err:
            item = err.errors(include_url=False)[0]
            param = params.get(str(item["loc"][0]), str(item["loc"][0])) if item["loc"] else None
            raise OpenAIError(f"{param}: {item['msg'].removeprefix('Value error, ')}", param) from None
        except InputError as err:
            field, _, rest = str(err).partition(": ")
            name = field.removeprefix("generation_config.")
            param = params.get(name, name)
            raise OpenAIError(f"{param}: {rest}", param) from None
        requests += worker.choices(base)
    if chat:
        calls = None if not offered else "auto" if text else "required"
        return Prepared(request, request.model or worker.loaded.name, requests, len(prompts), calls, fmt, reasoning=reasoning)
    echo = tuple(echoes) if request.echo else None
    return Prepared(request, request.model or worker.loaded.name, requests, len(prompts), echo=echo, prompt_only=prompt_only)


def thinking(worker: Worker, adapter: str | None, ids: list[int]) -> Reasoning | None:
    """How the answer to this prompt thinks (``reasoning.detect``); None: it does not."""
    tokenizer = worker.loaded.tokenizer
    template = chat_template(worker, adapter) or getattr(tokenizer, "chat_template", None)
    if template in file_templates():
        template = None
    return detect(template, tokenizer.decode(ids[-16:], skip_special_tokens=False))


def thinking_budget(worker: Worker, reasoning: Reasoning | None, tokens: int) -> ThinkingBudget:
    """The engine's bound on the thinking (``engine/thinking.py``); refused where the answer does not think."""
    if reasoning is None:
        raise OpenAIError("thinking_token_budget: this model does not think here (its chat template writes no <think> block, "
                          "or this prompt closes it); leave it out", "thinking_token_budget")
    close = worker.loaded.tokenizer.encode(FORCED_CLOSE, add_special_tokens=False)
    return ThinkingBudget(tokens, reasoning.opened, tuple(close))


def thinking_grammar(worker: Worker, reasoning: Reasoning, constrained: tuple[str, str, Any], request: _Request):
    """The grammar of thinking, then the answer as the request constrains it (a schema, choices)."""
    field, param, value = constrained
    if field == "regex":
        raise OpenAIError(f"{param}: not available with a model that thinks; constrain the answer with a JSON schema or choices", param)
    strict = isinstance(request.response_format, JsonSchemaResponseFormat) and bool(request.response_format.json_schema.strict)
    if field == "json_schema":  # laid out as every compiled answer is (``constraints.py``)
        body = "%json " + json.dumps({"x-guidance": {**JSON_LAYOUT, "lenient": not strict}, **closed_objects(value)}, ensure_ascii=False)
    else:
        body = choice_body(value)
    return worker.grammars.compile_lark(field, reasoning.grammar(body), strict)


def default_max_tokens(worker: Worker, prompt_tokens: int) -> int:
    """Without ``max_tokens``: as many as fit, up to ``MAX_NEW_TOKENS_LIMIT`` (OpenAI's own default is the context)."""
    room = min(worker.context_length, worker.engine.capacity_tokens) - prompt_tokens
    return max(1, min(worker.limits.max_new_tokens, room))


def model_names(worker: Worker) -> list[str]:
    """What ``model`` may name: the served model, ``base`` (the base model without any adapter,
    unless one is merged into its weights) and every adapter."""
    names = [worker.loaded.name, *([] if worker.adapters.merged else [BASE_ADAPTER_NAME]), *worker.adapters.known()]
    if worker.adapters.merged and worker.adapters.merged not in names:
        names.append(worker.adapters.merged)
    return list(dict.fromkeys(names))
