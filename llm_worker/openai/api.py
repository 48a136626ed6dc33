"""The OpenAI door's entry points over ``Worker``, shared by the RunPod job door (RunPod's gateway
forwards ``/openai/v1/...`` as jobs) and the HTTP server: a chat or completions body checked and
turned into its ``Response``, and the routes answered at once (the model list, the tokenizer's)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from llm_worker.logs import log_refused
from llm_worker.openai.errors import OpenAIError, unavailable
from llm_worker.openai.prepare import prepare
from llm_worker.openai.requests import CHAT, COMPLETIONS, MODELS, check_size
from llm_worker.openai.responses import Response, models
from llm_worker.openai.responses_api import RESPONSES, ResponsesAnswer
from llm_worker.openai.tokenizer import DETOKENIZE, TOKENIZE, TOKENIZER_INFO, detokenize, tokenize, tokenizer_info

if TYPE_CHECKING:
    from llm_worker.service import Worker


def open_request(worker: Worker, route: str, body: Any, job_id: str | None = None) -> Response | ResponsesAnswer:
    """A chat, completions or Responses request body, checked and turned into its answer; raises
    ``OpenAIError`` (and logs the refusal). The logs name the job ``job_id`` (RunPod's), else by
    the response's id."""
    response_id = f"{'chatcmpl' if route == CHAT else 'cmpl' if route == COMPLETIONS else 'resp'}-{uuid.uuid4().hex}"
    try:
        if worker.load_error:
            raise unavailable(worker.load_error)
        check_size(body, worker.limits.max_input_bytes)
        if route == RESPONSES:
            return ResponsesAnswer(worker, body, job_id or response_id)
        prepared = prepare(worker, route, body, job_id or response_id)
    except OpenAIError as err:
        log_refused(job_id or response_id, str(err))
        raise
    return Response(worker, route, prepared, response_id)


# vLLM's routes for adapters while running: the HTTP server's (ALLOW_RUNTIME_ADAPTERS), refused to RunPod jobs.
LOAD_ADAPTER, UNLOAD_ADAPTER = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"

# Routes answered at once, without the engine: GET ones take no body.
PLAIN_ROUTES = {
    MODELS: lambda worker, body: models(worker),
    TOKENIZER_INFO: lambda worker, body: tokenizer_info(worker),
    TOKENIZE: tokenize,
    DETOKENIZE: detokenize,
}


def plain_answer(worker: Worker, route: str, body: Any = None) -> dict[str, Any]:
    """The answer of a route in ``PLAIN_ROUTES``; raises ``OpenAIError``."""
    if worker.load_error:
        raise unavailable(worker.load_error)
    check_size(body, worker.limits.max_input_bytes)
    return PLAIN_ROUTES[route](worker, body)
