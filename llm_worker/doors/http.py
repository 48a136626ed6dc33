"""What the HTTP server's routes share: ``Door`` (the settings, the worker once loaded, the
metrics, overload, shutdown, answers that end when their client leaves), ``Gate`` (the API key
before routing, and every answer counted), ``Failure`` (a refusal shaped by the route's family)
and reading a request's JSON body within its size limit."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, suppress
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_worker import anthropic, openai
from llm_worker.doors.metrics import Metrics
from llm_worker.doors.paths import ANTHROPIC_PATHS, LOADING, OPENAI_PATHS, PUBLIC_PATHS, UNAUTHORIZED
from llm_worker.engine.memory import freeze_heap
from llm_worker.openai import OpenAIError
from llm_worker.parallel import exit_when_a_rank_is_lost
from llm_worker.service import Worker
from llm_worker.settings import ServerSettings

log = logging.getLogger("llm_worker.doors.server")

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
        if path.startswith(ANTHROPIC_PATHS):
            return anthropic.shaped(self.status, str(self))
        if not path.startswith(OPENAI_PATHS):
            return {"error": str(self)}
        if self.openai is not None:
            return self.openai.body
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return OpenAIError(str(self), type=kind, code=CODES.get(self.status)).body


CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 503: "worker_unavailable"}
OVERLOADED = 429


class Door:
    """What the routes share: the settings, the worker once loaded, the metrics, and shutdown."""

    def __init__(self, config: ServerSettings, worker: Worker | None) -> None:
        self.config = config
        self.worker = worker
        self.owns_worker = worker is None
        self.freeze_after_load = False  # the server's own process: the heap frozen once the model is loaded
        self.metrics = Metrics()
        self.draining = False
        self.in_flight = 0  # requests past the gate and not yet answered (health probes aside)
        self.grace = config.shutdown_grace_seconds
        self._expiry: asyncio.TimerHandle | None = None
        if worker is not None:
            self._serve(worker)

    def _serve(self, worker: Worker) -> None:
        if worker.settings.allow_runtime_adapters and self.config.api_key is None:
            log.warning("ALLOW_RUNTIME_ADAPTERS=1 without API_KEY: anyone who reaches this port can load adapters from ADAPTER_DIR")
        worker.watchers.append(self.metrics.record)
        self.metrics.watch(worker.engine)
        self.worker = worker

    def load(self) -> None:
        """On a thread at start: the model loads while ``/health`` already answers. Its settings are
        read from the environment; an invalid one is the reason every request is refused."""
        worker = Worker.start()
        if self.freeze_after_load:  # this process serves this one worker until it exits
            exit_when_a_rank_is_lost(worker)
        self._serve(worker)
        if self.freeze_after_load:
            freeze_heap()

    def unavailable(self) -> str | None:
        """Why generation requests cannot be served now, or None."""
        if self.draining:
            return "the server is shutting down; retry on another instance"
        if self.worker is None:
            return LOADING
        return self.worker.load_error

    def ready(self) -> Worker:
        reason = self.unavailable()
        if reason:
            raise Failure(503, reason, openai=openai.unavailable(reason))
        return self.worker

    def admit(self) -> Worker:
        """The worker, for a request that generates: refused while loading or shutting down, and with
        429 while MAX_WAITING_REQUESTS engine requests wait already."""
        worker = self.ready()
        waiting, limit = worker.engine.stats().waiting, self.config.max_waiting_requests
        if waiting >= limit:
            message = f"the server is overloaded: {waiting} requests are waiting (MAX_WAITING_REQUESTS={limit}); retry after a second"
            refusal = openai.OpenAIError(message, type="server_overloaded", code="too_many_waiting_requests", status=OVERLOADED)
            raise Failure(OVERLOADED, message, openai=refusal, headers={"Retry-After": "1"})
        return worker

    def idle(self) -> bool:
        return self.in_flight == 0

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
            return Response(status_code=CLIENT_GONE)
        return task.result()

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
    if status == CLIENT_GONE:
        return "cancelled"
    if status == OVERLOADED:
        return "overloaded"
    return "success" if status < 400 else "client_error" if status < 500 else "server_error"


class Gate:
    """The server's first step (an ASGI middleware, before routing): with ``API_KEY`` set, any path
    but ``/`` and ``/health`` without the key is 401, known route or not; every answer is counted
    by route (unknown paths as ``unmatched``) and outcome, except streams, which count themselves
    once they end (``Door.stream``); requests in flight are counted for the shutdown's drain."""

    def __init__(self, app: ASGIApp, door: Door, routes: frozenset[str]) -> None:
        self.app, self.door, self.routes = app, door, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else "unmatched"
        status, streamed = 500, False

        async def sending(message: Message) -> None:
            nonlocal status, streamed
            if message["type"] == "http.response.start":
                status = message["status"]
                streamed = any(name == b"content-type" and value.startswith(b"text/event-stream") for name, value in message["headers"])
            await send(message)

        public = path in PUBLIC_PATHS
        self.door.in_flight += not public
        try:
            if public or self.door.config.authorizes(scope["headers"]):
                await self.app(scope, receive, sending)
            else:
                await JSONResponse(Failure(401, UNAUTHORIZED).body(path), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, sending)
        finally:
            self.door.in_flight -= not public
            if not streamed:
                waiting = status == 503 and (self.door.worker is None or self.door.draining)  # loading, or shutting down
                self.door.metrics.request(route, "unavailable" if waiting else outcome(status))


async def native_events(outputs: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """A native job's outputs as server-sent events, one per output."""
    async with aclosing(outputs):
        async for chunk in outputs:
            yield openai.sse(chunk)


def is_error(event: str) -> bool:
    """Whether a server-sent event is an error (native ``{"error": "..."}``, OpenAI's error object, a failed response,
    Anthropic's error event)."""
    return event.startswith(('data: {"error":', "event: response.failed", "event: error"))
