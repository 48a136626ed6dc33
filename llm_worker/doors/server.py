"""The HTTP door, for Pods, VMs and workstations: the seed's REST API and OpenAI's over one
``Worker`` (the routes: ``llm_worker.doors.app``), served by uvicorn.

    python -m llm_worker.doors.server --host 127.0.0.1 --port 8000

The port answers at once: until the routes are imported (torch, transformers: seconds) and the
model is loaded, ``/health`` and every route answer 503 ``loading`` (401 first without the key).

On SIGTERM (or Ctrl-C) ``/health`` answers 503 ``shutting_down`` at once and new requests get 503
with a retry hint, while the port stays open and running requests finish; those still running
after ``SHUTDOWN_GRACE_SECONDS`` (default 8, under ``docker stop``'s 10) get an error. Then the
port closes and the process exits 0. A second signal exits without waiting.

This module imports neither torch nor the web framework, so that the port opens first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import uvicorn

from llm_worker.doors.paths import ANTHROPIC_PATHS, LOADING, OPENAI_PATHS, UNAUTHORIZED
from llm_worker.logs import configure_logging
from llm_worker.settings import ServerSettings, SettingsError

if TYPE_CHECKING:
    from llm_worker.doors.http import Door

log = logging.getLogger("llm_worker.doors.server")

# After SIGTERM: the port closes at the latest this long after the grace (a request that ignores the engine's
# end), and the connections left then get this long to close.
OVERDUE_SECONDS = 1.0
CLOSE_SECONDS = 2


def build(config: ServerSettings):
    """The server's app, with the routes' imports (seconds): run on a thread while the port answers."""
    from llm_worker.doors.app import create_app

    app = create_app(config=config)
    app.state.door.freeze_after_load = True  # this process serves this one worker until it exits
    return app


class Starting:
    """The ASGI app uvicorn serves: it answers by itself until the routes are imported, then hands
    every request to them, and runs their app's start and end (the model load, the door's close)."""

    def __init__(self, config: ServerSettings) -> None:
        self.config = config
        self.app = None
        self.failure: str | None = None
        self._ends = AsyncExitStack()

    @property
    def door(self) -> Door | None:
        return self.app.state.door if self.app is not None else None

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        status, body = self._answer(scope)
        headers = [(b"content-type", b"application/json")]
        if status == 503:
            headers.append((b"retry-after", b"2"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    def _answer(self, scope: dict) -> tuple[int, Any]:
        """What the server says before its routes are there: the door's shapes, in brief."""
        path = scope["path"]
        reason = f"the server failed to start: {self.failure}" if self.failure else LOADING
        if path == "/":
            return 200, "Alive"
        if path == "/health":
            return 503, {"status": "failed" if self.failure else "loading", "error": reason}
        if not self.config.authorizes(scope["headers"]):
            message, status, kind, code = UNAUTHORIZED, 401, "invalid_request_error", "invalid_api_key"
        else:
            message, status, kind, code = reason, 503, "server_error", "worker_unavailable"
        if path.startswith(ANTHROPIC_PATHS):
            return status, {"type": "error", "error": {"type": "authentication_error" if status == 401 else "overloaded_error", "message": message}}
        if path.startswith(OPENAI_PATHS):
            return status, {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return status, {"error": message}

    async def _lifespan(self, receive, send) -> None:
        await receive()  # lifespan.startup
        loading = asyncio.ensure_future(self._load())
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        if not loading.done():  # still importing: nothing to close
            loading.cancel()
        await self._ends.aclose()
        await send({"type": "lifespan.shutdown.complete"})

    async def _load(self) -> None:
        started = time.monotonic()
        try:
            app = await asyncio.to_thread(build, self.config)
            await self._ends.enter_async_context(app.router.lifespan_context(app))
        except Exception as err:  # an import that fails: say so on /health, keep the port
            log.exception("The server's routes failed to import")
            self.failure = f"{type(err).__name__}: {err}"
            return
        self.app = app
        log.info("Routes ready in %.1f s; the model loads now", time.monotonic() - started)


class Server(uvicorn.Server):
    """uvicorn, with a drain before it closes the port: on the first SIGTERM or SIGINT the door
    refuses new requests and ``/health`` says ``shutting_down``; the port closes once no request
    is in flight (the door fails those still running after the grace period), or at a second signal."""

    def __init__(self, config: uvicorn.Config, starting: Starting) -> None:
        super().__init__(config)
        self.starting = starting
        self.stopping_since: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        door = self.starting.door
        if self.stopping_since is not None or door is None:
            return super().handle_exit(sig, frame)  # nothing to drain, or asked twice
        self._captured_signals.append(sig)
        self.stopping_since = time.monotonic()
        door.draining = True  # /health says so from now on; the grace's timer starts at the next tick, on the event loop

    async def on_tick(self, counter: int) -> bool:
        door = self.starting.door
        if self.stopping_since is not None and door is not None:
            door.drain()  # once: it starts the grace's timer
            overdue = time.monotonic() - self.stopping_since > door.grace + OVERDUE_SECONDS
            if door.idle() or overdue:
                self.should_exit = True
        return await super().on_tick(counter)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_worker.doors.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface, as in a container)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    server: Server | None = None
    early: list[int] = []

    def on_signal(sig: int, frame) -> None:
        """Before uvicorn takes the signals over (and after it gives them back): a signal that
        came before the server existed stops it as soon as it runs, never one swallowed."""
        if server is None:
            early.append(sig)
        else:
            server.handle_exit(sig, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    configure_logging()
    try:
        config = ServerSettings()
    except SettingsError as err:
        for problem in err.problems:
            log.error("Invalid setting: %s", problem)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        log.warning("Listening on %s without API_KEY: anyone who reaches this port can use the model", args.host)
    starting = Starting(config)
    server_config = uvicorn.Config(
        starting,
        host=args.host,
        port=args.port,
        lifespan="on",
        log_config=None,  # ours (configure_logging): one format for every line
        timeout_graceful_shutdown=CLOSE_SECONDS,  # the drain happened before: this only closes idle connections
        timeout_keep_alive=5,
    )
    server = Server(server_config, starting)
    for sig in early:  # uvicorn re-raises the signal it shut down for once it is done: handled here, the exit is 0
        server.handle_exit(sig, None)
    server.run()
    return 0 if server.started else 1


def exit_now(code: int) -> None:
    """Ends the process without the interpreter's teardown of torch and the model (seconds of the
    shutdown budget here): by then the requests are drained and the worker is closed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
