"""The tokenizer routes as vLLM shapes them, so that clients (evaluation harnesses, token
counters) need no local copy of the tokenizer: ``POST /tokenize`` (a prompt, or chat messages
through the chat template), ``POST /detokenize`` and ``GET /tokenizer_info``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from llm_worker.model.prompts import file_templates
from llm_worker.openai.errors import OpenAIError
from llm_worker.openai.requests import Message, Tool, _Body, parse_body

if TYPE_CHECKING:
    from llm_worker.service import Worker

TOKENIZE = "/tokenize"
DETOKENIZE = "/detokenize"
TOKENIZER_INFO = "/tokenizer_info"


class TokenizePrompt(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # the tokenizer's own (a BOS token), as a completion's prompt gets them
    return_token_strs: bool = False


class TokenizeMessages(_Body):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the chat template writes them
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def tokenize(worker: Worker, body: Any) -> dict[str, Any]:
    """``{"prompt"}`` or ``{"messages"}`` -> ``{"tokens", "count", "max_model_len", "token_strs"}``;
    messages are rendered as a chat request's prompt is (the chat template, ``CHAT_TEMPLATE``)."""
    from llm_worker.openai.prepare import adapter_for, chat_prompt  # the prompt a chat request gets

    request = parse_body(TokenizeMessages if isinstance(body, dict) and "messages" in body else TokenizePrompt, body)
    adapter = adapter_for(worker, request.model)
    tokenizer = worker.loaded.tokenizer
    if isinstance(request, TokenizePrompt):
        ids = tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
    else:
        if not request.add_generation_prompt:
            raise OpenAIError("add_generation_prompt: only true is supported (a chat request's prompt has it)", "add_generation_prompt")
        ids, _ = chat_prompt(worker, request.messages, request.tools, request.tools, adapter)  # as tool_choice auto
        if request.add_special_tokens and tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
            ids = [tokenizer.bos_token_id, *ids]
    return {
        "count": len(ids),
        "max_model_len": worker.context_length,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None,
    }


def detokenize(worker: Worker, body: Any) -> dict[str, Any]:
    """``{"tokens": [...]}`` -> ``{"prompt": text}``, special tokens included."""
    request = parse_body(DetokenizeRequest, body)
    vocab = worker.engine.vocab
    wrong = next((i for i, token in enumerate(request.tokens) if not 0 <= token < vocab), None)
    if wrong is not None:
        raise OpenAIError(f"tokens[{wrong}]: {request.tokens[wrong]} is not in the vocabulary (0 to {vocab - 1})", f"tokens[{wrong}]")
    return {"prompt": worker.loaded.tokenizer.decode(request.tokens)}


def tokenizer_info(worker: Worker) -> dict[str, Any]:
    """The tokenizer's special tokens, its chat template and the longest sequence the worker serves."""
    tokenizer = worker.loaded.tokenizer
    template = worker.settings.chat_template
    if template in file_templates():  # a named prompt format (alpaca), not a Jinja chat template
        template = None
    elif template is None:
        template = getattr(tokenizer, "chat_template", None)
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "chat_template": template,
        "model_max_length": worker.context_length,
        "vocab_size": worker.engine.vocab,
    }
