"""The HTTP server's routes (``python -m llm_worker.doors.server`` serves them): the seed's REST
API and OpenAI's over one ``Worker``.

- ``GET /``: alive, as the seed. ``GET /health``: 200 once the model is loaded, else 503 and why.
- ``POST /generate``: a native event (the seed's ``generation_config`` + ``prompt_config``, and
  every other field of the job input); with ``"stream": true``, server-sent events.
- ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``, ``GET /v1/models``: the OpenAI door;
  ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``: the tokenizer, as vLLM serves it;
  ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``: adapters while running, as vLLM's
  (with ``ALLOW_RUNTIME_ADAPTERS=1``).
- ``GET /metrics``: Prometheus text.

Many clients share the engine's batches; a client that disconnects cancels its request. With
``API_KEY`` set, every path but ``/`` and ``/health`` needs ``Authorization: Bearer <key>``.
Past ``MAX_WAITING_REQUESTS`` waiting, generation requests get 429; ``CORS_ORIGINS`` lets
browsers call it.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from llm_worker import anthropic, openai
from llm_worker.doors.http import Door, Failure, Gate, native_events, read_json
from llm_worker.doors.metrics import CONTENT_TYPE
from llm_worker.engine import EngineError
from llm_worker.errors import InputError
from llm_worker.model.adapters import AdapterError
from llm_worker.openai import OpenAIError
from llm_worker.service import Worker
from llm_worker.settings import ServerSettings


# ---------------------------------------------------------------------- the app
def create_app(worker: Worker | None = None, config: ServerSettings | None = None) -> FastAPI:
    """The server's app. ``worker``: serve this started worker (tests, notebooks; the caller closes
    it) instead of loading one at start. ``config``: default, read from the environment."""
    door = Door(config or ServerSettings(), worker)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if door.worker is None:
            threading.Thread(target=door.load, name="model-load", daemon=True).start()
        yield
        await door.close()

    app = FastAPI(title="llm-worker", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.door = door

    @app.exception_handler(Failure)
    async def refused(request: Request, err: Failure) -> JSONResponse:
        return JSONResponse(err.body(request.url.path), err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def unrouted(request: Request, err: HTTPException) -> JSONResponse:
        known = (
            "; routes: GET /, GET /health, POST /generate, POST /v1/chat/completions, POST /v1/completions, POST /v1/responses, GET /v1/models, "
            "POST /v1/messages, POST /v1/messages/count_tokens, "
            "POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter, POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /metrics"
        )
        failure = Failure(err.status_code, f"{request.method} {request.url.path}: {err.detail}{known}")
        return JSONResponse(failure.body(request.url.path), err.status_code, headers=err.headers)

    @app.get("/")
    async def alive() -> str:
        return "Alive"

    @app.get("/health")
    async def health() -> JSONResponse:
        reason = door.unavailable()
        if reason:
            state = "shutting_down" if door.draining else "loading" if door.worker is None else "failed"
            return JSONResponse({"status": state, "error": reason}, 503)
        return JSONResponse({"status": "ok", "model": door.worker.loaded.name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(door.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        worker = door.admit()
        body = await read_json(request, worker.limits.max_input_bytes)
        if not isinstance(body, dict):
            raise Failure(400, f"body: must be a JSON object, got {type(body).__name__}")
        job_id = f"gen-{uuid.uuid4().hex}"  # names the job in the logs, and in the X-Request-Id header
        named = {"X-Request-Id": job_id}
        try:
            job, prepared = worker.prepare(body, job_id)
        except InputError as err:
            raise Failure(422, str(err), headers=named) from None
        except EngineError as err:
            raise Failure(503, str(err), headers=named) from None
        outputs = worker.outputs(job, prepared)
        if prepared is not None and job.stream:
            return door.stream("/generate", native_events(outputs), named)

        async def answer() -> JSONResponse:
            async with aclosing(outputs):
                result = await anext(outputs)
            status = door.engine_status() if "error" in result else 200
            return JSONResponse(result, status, headers=named)

        return await door.whole("/generate", request, answer())

    @app.get(openai.MODELS)
    @app.get(openai.TOKENIZER_INFO)
    async def plain_get(request: Request) -> JSONResponse:
        return plain(request.url.path, door.ready(), None)

    @app.post(openai.TOKENIZE)
    @app.post(openai.DETOKENIZE)
    async def plain_post(request: Request) -> JSONResponse:
        worker = door.ready()
        return plain(request.url.path, worker, await read_json(request, worker.limits.max_input_bytes))

    def plain(route: str, worker: Worker, body: Any) -> JSONResponse:
        try:
            answer = openai.plain_answer(worker, route, body)
        except OpenAIError as err:
            raise Failure.of(err) from None
        return JSONResponse(answer)

    async def openai_route(request: Request, route: str) -> Response:
        worker = door.admit()
        body = await read_json(request, worker.limits.max_input_bytes)
        try:
            response = openai.open_request(worker, route, body)
        except OpenAIError as err:
            raise Failure.of(err) from None
        if response.streaming:
            return door.stream(route, response.sse())

        async def answer() -> JSONResponse:
            try:
                return JSONResponse(await response.whole_answer())
            except EngineError as err:
                failure = openai.server_error(err)
                return JSONResponse(failure.body, door.engine_status())

        return await door.whole(route, request, answer())

    @app.post(openai.CHAT)
    async def chat_completions(request: Request) -> Response:
        return await openai_route(request, openai.CHAT)

    @app.post(openai.COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await openai_route(request, openai.COMPLETIONS)

    @app.post(openai.LOAD_ADAPTER)
    @app.post(openai.UNLOAD_ADAPTER)
    async def runtime_adapter(request: Request) -> PlainTextResponse:
        """vLLM's routes: ``{"lora_name", "lora_path"}`` loads, ``{"lora_name"}`` unloads (ALLOW_RUNTIME_ADAPTERS)."""
        worker, route = door.ready(), request.url.path
        loading = route == openai.LOAD_ADAPTER
        body = adapter_body(LoadAdapter if loading else UnloadAdapter, await read_json(request, worker.limits.max_input_bytes))
        try:
            if loading:
                await asyncio.to_thread(worker.load_adapter, body.lora_name, body.lora_path)
            else:
                worker.unload_adapter(body.lora_name)
        except (InputError, AdapterError) as err:
            status = 403 if "ALLOW_RUNTIME_ADAPTERS" in str(err) else 400
            raise Failure(status, str(err)) from None
        done = "added" if loading else "removed"
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' {done} successfully.")

    @app.post(openai.RESPONSES)
    async def responses(request: Request) -> Response:
        return await openai_route(request, openai.RESPONSES)

    @app.post(anthropic.MESSAGES)
    async def messages(request: Request) -> Response:
        worker = door.admit()
        body = await read_json(request, worker.limits.max_input_bytes)
        try:
            answer = anthropic.open_messages(worker, body)
        except OpenAIError as err:
            raise Failure.of(err) from None
        if answer.streaming:
            return door.stream(anthropic.MESSAGES, answer.sse())

        async def whole() -> JSONResponse:
            try:
                return JSONResponse(await answer.whole_answer())
            except EngineError as err:
                status = door.engine_status()
                return JSONResponse(anthropic.shaped(status, str(err)), status)

        return await door.whole(anthropic.MESSAGES, request, whole())

    @app.post(anthropic.COUNT_TOKENS)
    async def count_tokens(request: Request) -> JSONResponse:
        worker = door.ready()
        body = await read_json(request, worker.limits.max_input_bytes)
        try:
            return JSONResponse(anthropic.count_tokens(worker, body))
        except OpenAIError as err:
            raise Failure.of(err) from None

    app.add_middleware(Gate, door=door, routes=frozenset(route.path for route in app.routes))
    if door.config.cors_origin_list:  # outermost: preflights are answered before the API key is asked for
        app.add_middleware(
            CORSMiddleware,
            allow_origins=door.config.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],  # the openai clients send their own x-stainless-* headers
            expose_headers=["X-Request-Id", "Retry-After"],
            max_age=600,
        )
    return app


# ---------------------------------------------------------------------- runtime adapters' bodies
class UnloadAdapter(BaseModel):
    """vLLM's body for /v1/unload_lora_adapter (``lora_int_id`` is accepted and unused)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_int_id: int | None = None


class LoadAdapter(UnloadAdapter):
    """vLLM's body for /v1/load_lora_adapter (``base_model_name`` is accepted and unused)."""

    lora_path: str
    base_model_name: str | None = None


def adapter_body(model: type[UnloadAdapter], body: Any) -> UnloadAdapter:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(map(str, first["loc"])) or "body"
        raise Failure(400, f"{field}: {first['msg']}", openai=OpenAIError(f"{field}: {first['msg']}", param=field)) from None
