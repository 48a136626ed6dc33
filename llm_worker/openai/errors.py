"""The OpenAI door's refusals, in OpenAI's error shape with the HTTP status OpenAI answers them with."""

from __future__ import annotations

from llm_worker.engine import EngineError


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
