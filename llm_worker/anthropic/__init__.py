"""Anthropic's Messages API over the same ``Worker``, for both doors: ``POST /v1/messages`` (whole
or streamed) and ``POST /v1/messages/count_tokens``. The HTTP server serves them; RunPod jobs reach
them as ``{"openai_route": "/v1/messages", "openai_input": <the request body>}``.

- ``requests.py``: the request, parsed strictly, and the chat request it means;
- ``answer.py``: its message object, or its stream of events;
- ``errors.py``: Anthropic's error shape.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from llm_worker.anthropic.answer import MessagesAnswer
from llm_worker.anthropic.errors import error_body, shaped
from llm_worker.anthropic.requests import (
    COUNT_TOKENS,
    MESSAGES,
    CountTokensRequest,
    thinking_body,
    conversation,
    renamed,
    tools_body,
)
from llm_worker.logs import log_refused
from llm_worker.openai.errors import OpenAIError, unavailable
from llm_worker.openai.prepare import adapter_for, chat_prompt
from llm_worker.openai.requests import ChatRequest, check_size, parse, parse_body
from llm_worker.openai.tool_calls import offered_tools

if TYPE_CHECKING:
    from llm_worker.service import Worker

def open_messages(worker: Worker, body: Any, job_id: str | None = None) -> MessagesAnswer:
    """A Messages body, checked and turned into its answer; raises ``OpenAIError`` (shaped for this
    API by ``error_body``) and logs the refusal."""
    name = job_id or f"msg-{uuid.uuid4().hex}"
    try:
        if worker.load_error:
            raise unavailable(worker.load_error)
        check_size(body, worker.limits.max_input_bytes)
        return MessagesAnswer(worker, body, name)
    except OpenAIError as err:
        log_refused(name, str(err))
        raise


def count_tokens(worker: Worker, body: Any) -> dict[str, int]:
    """The prompt's tokens, as ``/v1/messages`` would send it to the model (tools included)."""
    if worker.load_error:
        raise unavailable(worker.load_error)
    check_size(body, worker.limits.max_input_bytes)
    request = parse_body(CountTokensRequest, body)
    messages, prefill = conversation(request)
    try:
        thinking = thinking_body(request)
        chat = parse(ChatRequest, {"model": request.model, "messages": messages, "continue_final_message": prefill, **tools_body(request),
                                   **({"chat_template_kwargs": thinking["chat_template_kwargs"]} if "chat_template_kwargs" in thinking else {})})
        adapter = adapter_for(worker, request.model)
        offered, _ = offered_tools(chat)
        ids, _ = chat_prompt(worker, chat.messages, chat.tools, offered, adapter, prefill, chat.chat_template_kwargs)
    except OpenAIError as err:
        raise renamed(err) from None
    return {"input_tokens": len(ids)}


__all__ = ["COUNT_TOKENS", "MESSAGES", "MessagesAnswer", "count_tokens", "error_body", "open_messages", "shaped"]
