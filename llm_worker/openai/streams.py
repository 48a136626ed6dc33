"""What the streams of the Responses and Messages APIs share: an answer's text, as it streams,
routed to the API's own events. Its thinking goes to ``_thought``, its text to ``_text``, its
calls to ``_call`` (call ``k``'s name first, then its arguments' JSON in pieces; ``CallSplitter``
keeps the tags out); ``_close`` ends the open item or block."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llm_worker.model.reasoning import ReasoningSplitter
from llm_worker.openai.tool_calls import CallSplitter

if TYPE_CHECKING:
    from llm_worker.openai.prepare import Prepared


class AnswerStream:
    def __init__(self, prepared: Prepared) -> None:
        self.splitter = CallSplitter(text=prepared.tool_calls != "required", fmt=prepared.tool_format) if prepared.tool_calls else None
        self.thinking = ReasoningSplitter(prepared.reasoning.opened) if prepared.reasoning else None

    def add(self, piece: str) -> list[str]:
        return self._route(self.thinking.add(piece) if self.thinking else [("content", piece)])

    def end(self, finished: bool) -> list[str]:
        """The rest, once the answer is whole (``finished``: it ended, rather than being cut)."""
        out = self._route(self.thinking.end()) if self.thinking else []
        for item in self.splitter.end(finished) if self.splitter else []:
            out += self._piece(item)
        return out + self._finish()

    def _route(self, pieces: list[tuple[str, str]]) -> list[str]:
        out = []
        for kind, text in pieces:
            if kind == "reasoning":
                out += self._thought(text)
            elif self.splitter is None:
                out += self._text(text) if text else []
            else:
                for item in self.splitter.add(text):
                    out += self._piece(item)
        return out

    def _piece(self, item: tuple) -> list[str]:
        return self._text(item[1]) if item[0] == "text" else self._call(*item[1:])

    def _finish(self) -> list[str]:
        return self._close()

    def _thought(self, piece: str) -> list[str]:
        raise NotImplementedError

    def _text(self, piece: str) -> list[str]:
        raise NotImplementedError

    def _call(self, k: int, name: str | None, arguments: str) -> list[str]:
        raise NotImplementedError

    def _close(self) -> list[str]:
        raise NotImplementedError
