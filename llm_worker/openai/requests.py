"""OpenAI's request bodies as strict pydantic models (with vLLM's extra sampling parameters),
parsed with OpenAI's error for the first problem; an unknown parameter gets a hint (another API's
name for it, a field of the native event, a close spelling), and a parameter this worker cannot
honour exactly is refused, never ignored, except the fields that only label a request (``user``,
``metadata``, ``store``, ``service_tier``)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from llm_worker.openai.errors import OpenAIError

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"


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


def text_parts_only(content: Any, kinds: tuple[str, ...] = ("text",)) -> Any:
    """A message's content as sent, refused by name when a part is not text (an image, audio, a
    file): pydantic would only say the content is not a string."""
    if isinstance(content, list):
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in kinds:
                raise PydanticCustomError("media", f"content[{i}] is a {kind!r} part: this model reads text only; send the content "
                                                   f'as a string or as {{"type": "{kinds[0]}", "text": ...}} parts', {})
    return content


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        return text_parts_only(content)

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
    logit_bias: dict[str, float] | None = None  # token id (as text) -> -100..100, added to its logit
    # vLLM's sampling parameters
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
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
    parallel_tool_calls: bool | None = None  # false: at most one call per answer
    continue_final_message: bool = False  # vLLM's: the answer continues the last (assistant) message, a prefill
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: passed to the chat template (Qwen3's enable_thinking)
    thinking_token_budget: int | None = Field(None, ge=1)  # vLLM's: the thinking's tokens at most, then the engine closes it


class CompletionRequest(_Request):
    # text, several texts, token ids, or several prompts of token ids (evaluation harnesses send ids)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: no answer, the prompt only (with echo, scored)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the answer begins with the prompt (with logprobs: each prompt token's, the first null)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


def parse(model: type[_Request], body: Any) -> _Request:
    """A chat or completions body, checked: OpenAI's error for its first problem."""
    request = parse_body(model, body)
    refuse_unsupported(request)
    return request


def parse_body(model: type[_Body], body: Any, prefix: str = "") -> _Body:
    """A body of this door (any route) as ``model``, or OpenAI's error naming the first problem;
    ``prefix``: where ``body`` sits in the request (``input[2]``)."""
    if not isinstance(body, dict):
        raise OpenAIError(f"{prefix or 'the request body'} must be a JSON object, got {type(body).__name__}", prefix or None)
    try:
        request = model.model_validate(body)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        # the first field at fault; of its union's branches, the one whose error is inside an object (a
        # part's missing text), not the first branch's (not a string)
        first = _param(errors[0]["loc"], model)
        item = max((e for e in errors if _param(e["loc"], model).startswith(first)), key=lambda e: _param(e["loc"], model).count("."))
        param = _param(item["loc"], model)
        if prefix:
            param = prefix if param == "body" else f"{prefix}.{param}"
        if item["type"] == "extra_forbidden":
            meant = unknown_hint(model, param)
            raise OpenAIError(
                f"Unrecognized request argument supplied: {param} (this worker does not support it{'; ' + meant if meant else ''})", param
            ) from None
        raise OpenAIError(f"{param}: {item['msg']}", param) from None
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


def unknown_hint(model: type[_Body], param: str) -> str | None:
    """What an unknown top-level parameter was probably meant to be."""
    if "." in param or "[" in param:
        return None
    chat = model is ChatRequest
    if param in NATIVE and issubclass(model, _Request):
        return "a native event (prompt_config, generation_config, adapter) goes to POST /generate, or as a RunPod job's input"
    if param == "prompt" and chat:
        return "did you mean messages? a bare prompt goes to /v1/completions"
    if param == "messages" and "input" in model.model_fields:
        return "did you mean input? (the Responses API takes the conversation as input, and instructions)"
    if param == "messages" and model is CompletionRequest:
        return "did you mean prompt? messages go to /v1/chat/completions"
    if param in ALIASES and issubclass(model, _Request):
        return f"did you mean {'max_completion_tokens or ' if chat and ALIASES[param] == 'max_tokens' else ''}{ALIASES[param]}?"
    close = difflib.get_close_matches(param.lower(), list(model.model_fields), n=1, cutoff=0.75)
    return f"did you mean {close[0]}?" if close else None


def _param(loc: Sequence[str | int], model: type[BaseModel] | None = None) -> str:
    """A pydantic location as OpenAI writes a parameter: ``messages[0].content``. Union branch
    names are left out, and so is the tag of a discriminated union (``response_format``'s
    ``json_schema``), which ``model``'s fields tell apart from a field of the same name."""
    text, current, tagged = "", model, False
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif tagged:  # the discriminator's value: which member the rest of the path is in
            tagged, current = False, _member(current, part)
        elif not part.startswith(("str", "list[", "function-")):  # union branch names, not fields
            text += f".{part}" if text else part
            field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
            tagged = field is not None and field.discriminator is not None
            current = field.annotation if tagged else _model_in(field.annotation) if field is not None else None
    return text or "body"


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (through unions, optionals and lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        return [model for arg in typing.get_args(annotation) for model in _models(arg)]
    return []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    models = _models(annotation)
    return models[0] if len(models) == 1 else None


def _member(union: Any, tag: str) -> type[BaseModel] | None:
    """The member of a discriminated union whose ``type`` is ``tag``."""
    for model in _models(union):
        field = model.model_fields.get("type")
        if field is not None and tag in typing.get_args(field.annotation):
            return model
    return None


def refuse_unsupported(request: _Request) -> None:
    """Parameters OpenAI defines that this worker cannot honour exactly: refused, never ignored."""
    if request.stream_options is not None and not request.stream:
        raise OpenAIError("stream_options: only allowed when stream is true", "stream_options")
    if isinstance(request, ChatRequest) and request.top_logprobs is not None and not request.logprobs:
        raise OpenAIError("top_logprobs: needs logprobs set to true", "top_logprobs")
    if isinstance(request, ChatRequest) and request.continue_final_message:
        last = request.messages[-1]
        if last.role != "assistant" or last.tool_calls:
            raise OpenAIError(
                "continue_final_message: the last message must be an assistant's text, which the answer continues", "continue_final_message"
            )
        if last.text != last.text.rstrip():
            raise OpenAIError("messages: the final assistant message, which the answer continues, cannot end with whitespace", "messages")
    if isinstance(request, CompletionRequest):
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
