"""The OpenAI-compatible door into the same ``Worker``.

RunPod's gateway serves ``https://api.runpod.ai/v2/<endpoint>/openai/v1/...`` by handing the
worker a job ``{"openai_route": "/v1/chat/completions", "openai_input": <the request body>}``
(also ``/v1/completions`` and ``/v1/models``). A plain request gets one output, the response
object; a streaming request gets the Server-Sent-Events lines of OpenAI's streaming format, one
``data: {...}\\n\\n`` string per chunk and ``data: [DONE]\\n\\n`` last, as runpod-workers/worker-vllm
yields them (its default ``RAW_OPENAI_OUTPUT``).

Parameters are checked as strictly as the native door: an unknown or unsupported parameter is
refused with OpenAI's error shape naming it, except the fields that only label a request
(``user``, ``metadata``, ``store``, ``service_tier``), which are accepted and have no effect.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llm_worker.engine import Completion, Delta, EngineError, GenerationRequest, TokenLogprob
from llm_worker.errors import InputError
from llm_worker.logs import log_refused
from llm_worker.prompts import file_templates, render_prompt
from llm_worker.schema import GenerationConfig

if TYPE_CHECKING:
    from llm_worker.service import Worker

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "time_limit": "length"}
CALL_PREFIX = '{"name": '  # how a tool-call answer begins: {"name": "...", "arguments": {...}}
ARGUMENTS = ', "arguments": '



class OpenAIError(Exception):
    """A request the OpenAI door refuses; ``body`` is OpenAI's error object, ``status`` the HTTP
    status OpenAI answers it with."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        status: int = 400,
    ) -> None:
        super().__init__(message)
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.status = status


def unavailable(reason: str) -> OpenAIError:
    """The worker cannot serve (its model failed to load, is loading, or it is shutting down)."""
    return OpenAIError(reason, type="server_error", code="worker_unavailable", status=503)


def server_error(err: EngineError) -> OpenAIError:
    return OpenAIError(str(err), type="server_error", status=500)


# ---------------------------------------------------------------------- requests
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """As chat templates take a message (transformers' convention: a call's arguments as an object)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": _arguments(call)}}
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


class Function(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: Function


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextFormat(_Body):
    type: Literal["text"]


class JsonObjectFormat(_Body):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


class StreamOptions(_Body):
    include_usage: bool = False


class _Request(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    response_format: TextFormat | JsonObjectFormat | JsonSchemaResponseFormat | None = Field(None, discriminator="type")
    # vLLM's names for the same constraints (guided decoding)
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    # labels only: accepted, no effect on the answer
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, min_length=1)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # an answer makes one call either way


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


def parse(model: type[_Request], body: Any) -> _Request:
    if not isinstance(body, dict):
        raise OpenAIError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        request = model.model_validate(body)
    except ValidationError as err:
        item = err.errors(include_url=False)[0]
        param = _param(item["loc"])
        if item["type"] == "extra_forbidden":
            meant = unknown_hint(model, param)
            raise OpenAIError(
                f"Unrecognized request argument supplied: {param} (this worker does not support it{'; ' + meant if meant else ''})", param
            ) from None
        raise OpenAIError(f"{param}: {item['msg']}", param) from None
    refuse_unsupported(request)
    return request


# Other APIs' names (the native event, transformers, TGI) for a parameter of this door.
ALIASES = {
    "max_new_tokens": "max_tokens",
    "max_length": "max_tokens",
    "stop_sequences": "stop",
    "num_return_sequences": "n",
    "random_seed": "seed",
    "guided_grammar": "guided_regex or response_format",
}
NATIVE = ("prompt_config", "generation_config", "adapter")


def unknown_hint(model: type[_Request], param: str) -> str | None:
    """What an unknown top-level parameter was probably meant to be."""
    if "." in param or "[" in param:
        return None
    chat = model is ChatRequest
    if param in NATIVE:
        return "a native event (prompt_config, generation_config, adapter) goes to POST /generate, or as a RunPod job's input"
    if param == "prompt" and chat:
        return "did you mean messages? a bare prompt goes to /v1/completions"
    if param == "messages" and not chat:
        return "did you mean prompt? messages go to /v1/chat/completions"
    if param in ALIASES:
        return f"did you mean {'max_completion_tokens or ' if chat and ALIASES[param] == 'max_tokens' else ''}{ALIASES[param]}?"
    close = difflib.get_close_matches(param.lower(), list(model.model_fields), n=1, cutoff=0.75)
    return f"did you mean {close[0]}?" if close else None


def _param(loc: Sequence[str | int]) -> str:
    """A pydantic location as OpenAI writes a parameter: ``messages[0].content``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not part.startswith(("str", "list[", "function-")):  # union branch names, not fields
            text += f".{part}" if text else part
    return text or "body"


def refuse_unsupported(request: _Request) -> None:
    """Parameters OpenAI defines that this worker cannot honour exactly: refused, never ignored."""
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            raise OpenAIError(
                f"{name}: not supported (the sampler has only the multiplicative repetition penalty, not OpenAI's "
                "additive count-based penalties); leave it at 0",
                name,
            )
    if request.logit_bias:
        raise OpenAIError("logit_bias: not supported", "logit_bias")
    if request.stream_options is not None and not request.stream:
        raise OpenAIError("stream_options: only allowed when stream is true", "stream_options")
    if isinstance(request, ChatRequest) and request.top_logprobs is not None and not request.logprobs:
        raise OpenAIError("top_logprobs: needs logprobs set to true", "top_logprobs")
    if isinstance(request, CompletionRequest):
        if request.echo:
            raise OpenAIError("echo: not supported (the worker returns only the completion)", "echo")
        if request.suffix:
            raise OpenAIError("suffix: not supported (no fill-in-the-middle)", "suffix")
        if request.best_of not in (None, request.n):
            raise OpenAIError("best_of: not supported other than equal to n", "best_of")


def check_size(body: Any, limit: int) -> None:
    try:
        size = len(json.dumps(body).encode())
    except (TypeError, ValueError, RecursionError):
        raise OpenAIError("the request body must be plain JSON (objects, arrays, strings, numbers, booleans, null)") from None
    if size > limit:
        raise OpenAIError(f"the request is {size} bytes; at most {limit} (MAX_INPUT_BYTES)", code="request_too_large", status=413)


# ---------------------------------------------------------------------- prompts and settings
@dataclass(frozen=True)
class Prepared:
    """A validated request turned into engine requests (``n`` per prompt, flat)."""

    body: _Request
    model: str
    requests: list[GenerationRequest]
    prompts: int
    tool_call: bool = False  # each answer is a call of one of the request's tools


def chat_prompt(worker: Worker, messages: list[Message], tools: list[Tool] | None = None) -> tuple[list[int], tuple[str, ...]]:
    """Token ids of the conversation through the chat template (``CHAT_TEMPLATE``, else the
    model's own), and the stop strings that template implies."""
    tokenizer = worker.loaded.tokenizer
    template = worker.settings.chat_template
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
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(
            f"messages: the model {worker.loaded.name} has no chat template: set CHAT_TEMPLATE (Jinja text, or alpaca "
            "for Alpaca-LoRA adapters), or send the prompt to /v1/completions",
            "messages",
            "no_chat_template",
        )
    conversation = [m.for_template() for m in messages]
    functions = [tool.model_dump(exclude_none=True) for tool in tools] if tools else None
    try:
        text = tokenizer.apply_chat_template(
            conversation, tools=functions, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except TemplateError as err:
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


def tool_call_schema(tools: list[Tool]) -> dict[str, Any]:
    """An answer that is a call of one of ``tools``: ``{"name": ..., "arguments": {...}}``, the
    arguments valid against that tool's parameters."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                "arguments": tool.function.parameters or {"type": "object", "properties": {}},
            },
            "required": ["name", "arguments"],
        }
        for tool in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


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
    if isinstance(request, ChatRequest):
        tools = called_tools(request)
        if tools:
            found.append(("json_schema", "tools", tool_call_schema(tools)))
    if len(found) > 1:
        names = " and ".join(param for _, param, _ in found)
        raise OpenAIError(f"{names}: at most one of them may constrain the answer", found[1][1])
    return found[0] if found else None


def called_tools(request: ChatRequest) -> list[Tool]:
    """The tools an answer must call: all with tool_choice "required", the named one, none with "none"."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none"):
            raise OpenAIError("tool_choice: needs tools", "tool_choice")
        return []
    if choice is None or choice == "auto":
        raise OpenAIError(
            'tool_choice: "auto" (the default when tools are given) is not supported, because this worker '
            'cannot tell a call from text for every chat template: set tool_choice to "required", to '
            '{"type": "function", "function": {"name": ...}}, or to "none"',
            "tool_choice",
        )
    if choice == "none":
        return []
    if choice == "required":
        return request.tools
    named = [tool for tool in request.tools if tool.function.name == choice.function.name]
    if not named:
        raise OpenAIError(f"tool_choice: no tool is named {choice.function.name!r}", "tool_choice")
    return named


def prepare(worker: Worker, route: str, body: Any, job_id: str | None = None) -> Prepared:
    chat = route == CHAT
    request = parse(ChatRequest if chat else CompletionRequest, body)
    adapter = adapter_for(worker, request.model)
    constrained = constraint(request)
    if chat:
        prompts = [chat_prompt(worker, request.messages, request.tools)]
        max_tokens, max_param = request.max_completion_tokens or request.max_tokens, (
            "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        )
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not texts:
            raise OpenAIError("prompt: must not be empty", "prompt")
        tokenizer = worker.loaded.tokenizer
        prompts = [(tokenizer(text)["input_ids"], ()) for text in texts]
        max_tokens, max_param, logprobs = request.max_tokens, "max_tokens", request.logprobs
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    requests = []
    for ids, template_stop in prompts:
        generation: dict[str, Any] = {
            "max_new_tokens": max_tokens or default_max_tokens(worker, len(ids)),
            "stop": stop,
            "n": request.n,
            "logprobs": logprobs,
        }
        if request.temperature > 0:  # temperature 0 is greedy: top_p and seed have no effect, as in OpenAI's API
            generation.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, seed=request.seed)
        params = {"max_new_tokens": max_param, "stop": "stop", "prompt_config": "messages" if chat else "prompt", "adapter": "model"}
        if constrained:
            field, param, value = constrained
            generation[field] = value
            params[field] = param
        try:
            config = GenerationConfig.model_validate(generation, context={"limits": worker.limits})
            base = worker.request(ids, config, tuple(stop) + template_stop, adapter, job_id)
            if not chat:  # a completion is the text exactly as generated, leading space included (OpenAI, vLLM)
                base = replace(base, strip=False)
        except ValidationError as err:
            item = err.errors(include_url=False)[0]
            param = params.get(str(item["loc"][0]), str(item["loc"][0])) if item["loc"] else None
            raise OpenAIError(f"{param}: {item['msg'].removeprefix('Value error, ')}", param) from None
        except InputError as err:
            field, _, rest = str(err).partition(": ")
            param = params.get(field.removeprefix("generation_config."), field)
            raise OpenAIError(f"{param}: {rest}", param) from None
        requests += worker.choices(base)
    tool_call = constrained is not None and constrained[1] == "tools"
    return Prepared(request, request.model or worker.loaded.name, requests, len(prompts), tool_call)


def default_max_tokens(worker: Worker, prompt_tokens: int) -> int:
    """Without ``max_tokens``: as many as fit, up to ``MAX_NEW_TOKENS_LIMIT`` (OpenAI's own default is the context)."""
    room = min(worker.context_length, worker.engine.capacity_tokens) - prompt_tokens
    return max(1, min(worker.limits.max_new_tokens, room))


# ---------------------------------------------------------------------- responses
class Response:
    """Turns engine events into OpenAI objects and stream chunks for one prepared request."""

    def __init__(self, worker: Worker, route: str, prepared: Prepared, response_id: str) -> None:
        self.worker = worker
        self.chat = route == CHAT
        self.prepared = prepared
        self.id = response_id
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self.with_logprobs = prepared.requests[0].logprobs is not None

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object + (".chunk" if self.chat and self.prepared.body.stream else ""),
            "created": self.created,
            "model": self.prepared.model,
            "system_fingerprint": fingerprint(self.worker),
            "choices": choices,
            **extra,
        }

    def usage(self, completions: list[Completion]) -> dict[str, Any]:
        n = self.prepared.body.n
        prompt = sum(done.prompt_tokens for done in completions[::n])  # each prompt counts once
        cached = sum(done.cached_tokens for done in completions[::n])
        generated = sum(done.completion_tokens for done in completions)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": generated,
            "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def logprobs(self, items: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if not self.with_logprobs:
            return None
        text = self.worker.token_text
        if self.chat:
            return {
                "content": [
                    {
                        **_token(text(item.token_id)),
                        "logprob": item.logprob,
                        "top_logprobs": [{**_token(text(token)), "logprob": logprob} for token, logprob in item.top],
                    }
                    for item in items
                ]
            }
        tokens = [text(item.token_id) for item in items]
        offsets = [sum(len(token) for token in tokens[:i]) for i in range(len(tokens))]
        return {
            "tokens": tokens,
            "token_logprobs": [item.logprob for item in items],
            "top_logprobs": [{text(token): logprob for token, logprob in item.top} for item in items],
            "text_offset": offsets,
        }

    def whole(self, completions: list[Completion]) -> dict[str, Any]:
        choices = []
        for index, done in enumerate(completions):
            choice: dict[str, Any] = {"index": index}
            finish_reason = FINISH_REASONS[done.finish_reason]
            if self.prepared.tool_call and finish_reason == "stop":
                call = json.loads(done.text)
                message = {"role": "assistant", "content": None, "tool_calls": [self.tool_call(index, call["name"], call["arguments"])]}
                choice["message"], finish_reason = message, "tool_calls"
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": done.text}
            else:
                choice["text"] = done.text
            choice["logprobs"] = self.logprobs(done.logprobs or [])
            choice["finish_reason"] = finish_reason
            choices.append(choice)
        return self.envelope(choices, usage=self.usage(completions))

    def tool_call(self, index: int, name: str, arguments: Any = None, stream_index: int | None = None) -> dict[str, Any]:
        """A tool call of choice ``index``; its id is the same in the stream and in the whole answer."""
        call: dict[str, Any] = {} if stream_index is None else {"index": stream_index}
        call.update(id=f"call_{self.id.split('-')[-1][:16]}{index}", type="function")
        call["function"] = {"name": name, "arguments": "" if arguments is None else json.dumps(arguments, ensure_ascii=False)}
        return call

    def call_chunk(self, index: int, name: str | None, arguments: str) -> str:
        """A streamed piece of choice ``index``'s tool call: its first names the function, as OpenAI's."""
        if name is not None:
            call = self.tool_call(index, name, stream_index=0)
        else:
            call = {"index": 0, "function": {"arguments": arguments}}
        choice = {"index": index, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
        extra = {"usage": None} if self.include_usage else {}
        return sse(self.envelope([choice], **extra))

    def chunk(
        self, index: int, text: str | None, logprobs: Sequence[TokenLogprob], finish_reason: str | None = None, first: bool = False
    ) -> str:
        """One stream chunk; ``text`` None: the choice's closing chunk; ``first``: the chat chunk that names the role."""
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        choice["logprobs"] = None if first else self.logprobs(logprobs)
        choice["finish_reason"] = finish_reason and FINISH_REASONS.get(finish_reason, finish_reason)
        extra = {"usage": None} if self.include_usage else {}
        return sse(self.envelope([choice], **extra))

    @property
    def include_usage(self) -> bool:
        options = self.prepared.body.stream_options
        return bool(options and options.include_usage)

    @property
    def streaming(self) -> bool:
        return self.prepared.body.stream

    async def whole_answer(self) -> dict[str, Any]:
        """The response object; raises ``EngineError`` when the engine fails the request."""
        completions: dict[int, Completion] = {}
        async for index, event in self.worker.events(self.prepared.requests):
            if isinstance(event, Completion):
                completions[index] = event
        return self.whole([completions[index] for index in range(len(completions))])

    async def sse(self) -> AsyncIterator[str]:
        """The stream's server-sent events, ``data: [DONE]`` last; a failure in the engine is one
        more event, OpenAI's error object, before it."""
        try:
            async for line in self.stream():
                yield line
        except EngineError as err:
            yield sse(server_error(err).body)
        yield sse("[DONE]")

    async def stream(self) -> AsyncIterator[str]:
        requests = self.prepared.requests
        sent = [0] * len(requests)  # logprobs already streamed, per choice
        finished: dict[int, Completion] = {}
        calls = [CallStream() for _ in requests] if self.prepared.tool_call else None
        if self.chat:  # OpenAI's first chunk of each choice names the role
            for index in range(len(requests)):
                yield self.chunk(index, "", (), first=True)
        async for index, event in self.worker.events(requests):
            if isinstance(event, Delta):
                if calls is not None:
                    for piece in calls[index].add(event.text):
                        yield self.call_chunk(index, *piece)
                elif event.text or event.logprobs:
                    sent[index] += len(event.logprobs)
                    yield self.chunk(index, event.text, event.logprobs)
                continue
            finished[index] = event
            if calls is not None:
                complete = FINISH_REASONS[event.finish_reason] == "stop"
                for piece in calls[index].end(complete):
                    yield self.call_chunk(index, *piece)
                yield self.chunk(index, None, (), "tool_calls" if complete else event.finish_reason)
                continue
            yield self.chunk(index, None, (event.logprobs or [])[sent[index] :], event.finish_reason)
        if self.include_usage:
            completions = [finished[index] for index in range(len(requests))]
            yield sse(self.envelope([], usage=self.usage(completions)))


class CallStream:
    """Turns a tool-call answer's text, as it streams, into OpenAI's tool-call deltas: the name once
    it is whole, then the arguments' JSON piece by piece (the answer's last character, the call's
    closing brace, is held back until the end)."""

    def __init__(self) -> None:
        self.text = ""
        self.name: str | None = None
        self.sent = 0  # characters of the arguments already sent

    def add(self, piece: str) -> list[tuple[str | None, str]]:
        self.text += piece
        out = []
        if self.name is None:
            head, found, _ = self.text.partition(ARGUMENTS)
            if not found:
                return []
            self.name = json.loads(head.removeprefix(CALL_PREFIX))
            out.append((self.name, ""))
        start = self.text.index(ARGUMENTS) + len(ARGUMENTS)
        arguments = self.text[start:-1]  # the last character may be the call's closing brace
        if len(arguments) > self.sent:
            out.append((None, arguments[self.sent :]))
            self.sent = len(arguments)
        return out

    def end(self, complete: bool) -> list[tuple[str | None, str]]:
        """The rest, once the answer is over: a complete call still holds back its closing brace,
        a cut one sends what it has."""
        if self.name is None or complete:
            return []
        rest = self.text[self.text.index(ARGUMENTS) + len(ARGUMENTS) + self.sent :]
        return [(None, rest)] if rest else []


def _token(text: str) -> dict[str, Any]:
    """OpenAI's token and its UTF-8 bytes; a token that is part of a character has no whole text, so no bytes."""
    return {"token": text, "bytes": None if "\ufffd" in text else list(text.encode("utf-8"))}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def fingerprint(worker: Worker) -> str:
    """Changes when the weights' source, dtype or device does (what can change an answer for a seed)."""
    loaded = worker.loaded
    identity = f"{loaded.name}|{loaded.dtype}|{loaded.device}|{worker.settings.lora_weights}|{loaded.merged_adapter}"
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]


def model_names(worker: Worker) -> list[str]:
    names = [worker.loaded.name, *worker.adapters.known()]
    if worker.adapters.merged and worker.adapters.merged not in names:
        names.append(worker.adapters.merged)
    return names


def models(worker: Worker) -> dict[str, Any]:
    created = int(time.time())
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "llm-worker"} for name in model_names(worker)],
    }


# ---------------------------------------------------------------------- the door
def open_request(worker: Worker, route: str, body: Any, job_id: str | None = None) -> Response:
    """A chat or completions request body, checked and turned into its ``Response``; raises
    ``OpenAIError`` (and logs the refusal). The logs name the job ``job_id`` (RunPod's), else by
    the response's id."""
    response_id = f"{'chatcmpl' if route == CHAT else 'cmpl'}-{uuid.uuid4().hex}"
    try:
        if worker.load_error:
            raise unavailable(worker.load_error)
        check_size(body, worker.limits.max_input_bytes)
        prepared = prepare(worker, route, body, job_id or response_id)
    except OpenAIError as err:
        log_refused(job_id or response_id, str(err))
        raise
    return Response(worker, route, prepared, response_id)


async def handle(worker: Worker, job: dict[str, Any], job_id: str | None = None) -> AsyncIterator[dict[str, Any] | str]:
    """A gateway job's outputs: the response object, or the stream's SSE lines; errors in
    OpenAI's error shape (an error after a stream began is one more ``data:`` line)."""
    route = job.get("openai_route")
    try:
        if worker.load_error:
            raise unavailable(worker.load_error)
        if route == MODELS:
            yield models(worker)
            return
        if route not in (CHAT, COMPLETIONS):
            raise OpenAIError(
                f"openai_route: unknown route {route!r}; this worker serves {CHAT}, {COMPLETIONS} and {MODELS}",
                "openai_route",
                "unknown_route",
                status=404,
            )
        response = open_request(worker, route, job.get("openai_input"), job_id)
    except OpenAIError as err:
        yield err.body
        return
    if response.streaming:
        async for line in response.sse():
            yield line
        return
    try:
        yield await response.whole_answer()
    except EngineError as err:
        yield server_error(err).body
