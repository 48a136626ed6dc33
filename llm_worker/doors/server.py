"""The HTTP door, for Pods, VMs and workstations: the seed's REST API and OpenAI's over one
``Worker``, served by uvicorn.

    python -m llm_worker.doors.server --host 127.0.0.1 --port 8000

- ``GET /``: alive, as the seed. ``GET /health``: 200 once the model is loaded, else 503 and why.
- ``POST /generate``: a native event (the seed's ``generation_config`` + ``prompt_config``, and
  every other field of the job input); with ``"stream": true``, server-sent events.
- ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``: the OpenAI door.
- ``GET /metrics``: Prometheus text.

Many clients share the engine's batches; a client that disconnects cancels its request. With
``API_KEY`` set, every route but ``/`` and ``/health`` needs ``Authorization: Bearer <key>``. On
SIGTERM the server stops accepting, lets running requests finish for ``SHUTDOWN_GRACE_SECONDS``,
fails the rest with an error, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager, suppress
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llm_worker import openai
from llm_worker.engine import EngineError
from llm_worker.errors import InputError
from llm_worker.logs import configure_logging
from llm_worker.doors.metrics import CONTENT_TYPE, Metrics
from llm_worker.openai import OpenAIError
from llm_worker.service import Worker
from llm_worker.settings import ServerSettings, SettingsError

log = logging.getLogger("llm_worker.doors.server")  # also when run as __main__

OPENAI_PREFIX = "/v1/"
PUBLIC_PATHS = ("/", "/health")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection first


class Failure(Exception):
    """A request this door refuses or cannot answer; shaped by the route's family (OpenAI's error
    object under /v1, ``{"error": message}`` elsewhere)."""

    def __init__(self, status: int, message: str, *, openai: OpenAIError | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.openai = openai
        self.headers = headers

    @classmethod
    def of(cls, err: OpenAIError) -> Failure:
        return cls(err.status, str(err), openai=err)

    def body(self, path: str) -> Any:
        if not path.startswith(OPENAI_PREFIX):
            return {"error": str(self)}
        if self.openai is not None:
            return self.openai.body
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return OpenAIError(str(self), type=kind, code=CODES.get(self.status)).body


CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 503: "worker_unavailable"}


class Door:
    """What the routes share: the settings, the worker once loaded, the metrics, and shutdown."""

    def __init__(self, config: ServerSettings, worker: Worker | None) -> None:
        self.config = config
        self.worker = worker
        self.owns_worker = worker is None
        self.metrics = Metrics()
        self.draining = False
        self.grace = config.shutdown_grace_seconds
        self._expiry: asyncio.TimerHandle | None = None
        if worker is not None:
            self._serve(worker)

    def _serve(self, worker: Worker) -> None:
        worker.watchers.append(self.metrics.record)
        self.metrics.watch(worker.engine)
        self.worker = worker

    def load(self) -> None:
        """On a thread at start: the model loads while ``/health`` already answers. Its settings are
        read from the environment; an invalid one is the reason every request is refused."""
        self._serve(Worker.start())

    def unavailable(self) -> str | None:
        """Why generation requests cannot be served now, or None."""
        if self.draining:
            return "the server is shutting down; retry on another instance"
        if self.worker is None:
            return "the model is loading; retry shortly (GET /health answers 200 once it is loaded)"
        return self.worker.load_error

    def ready(self) -> Worker:
        reason = self.unavailable()
        if reason:
            raise Failure(503, reason, openai=openai.unavailable(reason))
        return self.worker

    def authorize(self, request: Request) -> None:
        """``Authorization: Bearer <API_KEY>`` when the key is set, compared in constant time."""
        key = self.config.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        expected = key.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            message = "Incorrect or missing API key: send the header Authorization: Bearer <API_KEY>"
            raise Failure(401, message, headers={"WWW-Authenticate": "Bearer"})

    def engine_status(self) -> int:
        """The status of an answer the engine failed: the shutdown's, or a server error."""
        return 503 if self.draining else 500

    # ------------------------------------------------------------------ shutdown
    def drain(self) -> None:
        """Refuse new requests; after the grace period, fail the running ones (the engine stops)."""
        self.draining = True
        if self.worker is not None and self._expiry is None:
            log.info("Shutting down: running requests have %.0f s to finish (SHUTDOWN_GRACE_SECONDS)", self.grace)
            self._expiry = asyncio.get_running_loop().call_later(self.grace, self._expire)

    def _expire(self) -> None:
        running = self.worker.engine.stats().running if self.worker.engine else 0
        log.warning("Shutdown grace period over: failing %d running request(s)", running)
        asyncio.ensure_future(asyncio.to_thread(self.worker.close))

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self.worker is None:
            return
        self.worker.watchers.remove(self.metrics.record)
        if self.owns_worker:
            await asyncio.to_thread(self.worker.close)

    # ------------------------------------------------------------------ answers
    async def whole(self, route: str, request: Request, answer: Awaitable[Response]) -> Response:
        """A plain answer, unless the client disconnects first: then its request is cancelled."""
        task = asyncio.ensure_future(answer)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        if task not in done:
            self.metrics.request(route, "cancelled")
            return Response(status_code=CLIENT_GONE)
        response = task.result()
        self.metrics.request(route, outcome(response.status_code))
        return response

    def stream(self, route: str, events: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
        """Server-sent events as they come. A client that disconnects cancels the stream, and with
        it the engine requests."""

        async def counted() -> AsyncIterator[str]:
            result = "success"
            try:
                async with aclosing(events):
                    async for event in events:
                        if is_error(event):
                            result = "server_error"
                        yield event
            except (asyncio.CancelledError, GeneratorExit):
                result = "cancelled"
                raise
            finally:
                self.metrics.request(route, result)

        return StreamingResponse(counted(), media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, read no further than ``limit`` bytes (MAX_INPUT_BYTES)."""
    too_big = f"body: the request body is larger than {limit} bytes (MAX_INPUT_BYTES)"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Failure(413, too_big)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise Failure(413, too_big)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Failure(400, f"body: not valid JSON ({err})") from None


def outcome(status: int) -> str:
    return "success" if status < 400 else "client_error" if status < 500 else "server_error"


async def native_events(outputs: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """A native job's outputs as server-sent events, one per output."""
    async with aclosing(outputs):
        async for chunk in outputs:
            yield openai.sse(chunk)


def is_error(event: str) -> bool:
    """Whether a server-sent event is an error (native ``{"error": "..."}`` or OpenAI's error object)."""
    return event.startswith('data: {"error":')


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

    def authorized(request: Request) -> None:
        if request.url.path not in PUBLIC_PATHS:
            door.authorize(request)

    app = FastAPI(
        title="llm-worker",
        lifespan=lifespan,
        dependencies=[Depends(authorized)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.door = door

    @app.exception_handler(Failure)
    async def refused(request: Request, err: Failure) -> JSONResponse:
        route = request.scope.get("route")
        if route is not None:
            door.metrics.request(route.path, outcome(err.status))
        return JSONResponse(err.body(request.url.path), err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def unrouted(request: Request, err: HTTPException) -> JSONResponse:
        known = "; routes: GET /, GET /health, POST /generate, POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /metrics"
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
        worker = door.ready()
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
    async def models() -> JSONResponse:
        return JSONResponse(openai.models(door.ready()))

    async def openai_route(request: Request, route: str) -> Response:
        worker = door.ready()
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

    return app


# ---------------------------------------------------------------------- the process
class Server(uvicorn.Server):
    """uvicorn, with the door drained first on shutdown."""

    def __init__(self, config: uvicorn.Config, door: Door) -> None:
        super().__init__(config)
        self.door = door

    async def shutdown(self, sockets=None) -> None:
        self.door.drain()
        await super().shutdown(sockets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_worker.doors.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface, as in a container)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = ServerSettings()
    except SettingsError as err:
        for problem in err.problems:
            log.error("Invalid setting: %s", problem)
        return 2
    app = create_app(config=config)
    door: Door = app.state.door
    server_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,  # ours (configure_logging): one format for every line
        timeout_graceful_shutdown=door.grace + 30,  # a backstop: the door fails what is left after the grace
        timeout_keep_alive=5,
    )
    server = Server(server_config, door)
    # uvicorn re-raises the signal it shut down for once it is done; handled, it ends the process with 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
