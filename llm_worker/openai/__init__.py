"""OpenAI's API over the same ``Worker``, shared by both doors.

RunPod's gateway serves ``https://api.runpod.ai/v2/<endpoint>/openai/v1/...`` by handing the
worker a job ``{"openai_route": "/v1/chat/completions", "openai_input": <the request body>}``
(also ``/v1/completions`` and ``/v1/models``); the HTTP server serves the same routes itself. A
plain request gets one output, the response object; a streaming request gets the Server-Sent-Events
lines of OpenAI's streaming format, one ``data: {...}\\n\\n`` string per chunk and ``data: [DONE]\\n\\n``
last, as runpod-workers/worker-vllm yields them (its default ``RAW_OPENAI_OUTPUT``).

- ``requests.py``: the request bodies, parsed strictly, with hints for unknown parameters;
- ``prepare.py``: a request into engine requests (chat prompt, model or adapter, constraint);
- ``tool_calls.py``: the tool-call grammar and the streamed tool-call splitter;
- ``responses.py``: engine events into response objects and stream chunks;
- ``responses_api.py``: the Responses API (``/v1/responses``), stateless, over the chat request it means;
- ``tokenizer.py``: ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``, as vLLM shapes them;
- ``api.py``: the entry points the doors call.
"""

from llm_worker.openai.api import LOAD_ADAPTER, PLAIN_ROUTES, UNLOAD_ADAPTER, open_request, plain_answer
from llm_worker.openai.errors import OpenAIError, server_error, unavailable
from llm_worker.openai.requests import CHAT, COMPLETIONS, MODELS
from llm_worker.openai.responses import Response, models, sse
from llm_worker.openai.responses_api import RESPONSES
from llm_worker.openai.tokenizer import DETOKENIZE, TOKENIZE, TOKENIZER_INFO

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "DETOKENIZE",
    "LOAD_ADAPTER",
    "MODELS",
    "OpenAIError",
    "PLAIN_ROUTES",
    "RESPONSES",
    "Response",
    "TOKENIZE",
    "TOKENIZER_INFO",
    "UNLOAD_ADAPTER",
    "models",
    "open_request",
    "plain_answer",
    "server_error",
    "sse",
    "unavailable",
]
