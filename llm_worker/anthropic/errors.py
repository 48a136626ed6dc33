"""Anthropic's error shape: ``{"type": "error", "error": {"type": ..., "message": ...}}``, its
error type read from the HTTP status, as Anthropic documents them. The worker's refusals are made
once (``OpenAIError``, with the parameter they name) and shaped here for this API's routes."""

from __future__ import annotations

from typing import Any

from llm_worker.openai.errors import OpenAIError

TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    503: "overloaded_error", 529: "overloaded_error",
}


def error_type(status: int) -> str:
    return TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(err: OpenAIError) -> dict[str, Any]:
    """``err`` in Anthropic's shape."""
    return shaped(err.status, str(err))


def shaped(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}
