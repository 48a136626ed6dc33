"""The OpenAI door's refusals, in OpenAI's error shape with the HTTP status OpenAI answers them with."""

from __future__ import annotations

import re
from collections.abc import Callable

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


def renamed(err: OpenAIError, names: dict[str, str], more: Callable[[str], str] = lambda text: text) -> OpenAIError:
    """A chat request's refusal as another API words it: each chat parameter in ``names`` given
    that API's name, in the parameter and in the fields the message names before its first colon;
    ``more``: that API's other renames."""
    error = err.body["error"]
    head, colon, rest = str(err).partition(": ")

    def ours(text: str) -> str:
        for chat, name in sorted(names.items(), key=lambda item: -len(item[0])):  # the longest first: a.b before a
            text = re.sub(rf"(?<![\w.]){re.escape(chat)}(?![\w])", name, text)
        return more(text)

    param = ours(error["param"]) if error["param"] else None
    return OpenAIError(ours(head) + colon + rest, param, error["code"], error["type"], err.status)
