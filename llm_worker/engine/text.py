"""Token ids to answer text, one token at a time, with stop strings and safe streaming.

Incremental detokenisation: with a fast tokenizer, the tokenizers library's own ``DecodeStream``
(about 2 µs a token here); otherwise TGI's and vLLM's offsets: decode only a short window of
tokens (from ``prefix_offset``) and keep the part past what was already read (about 24 µs). A
token that ends inside a multi-byte character gives no text yet; its text waits for the next
token, and if the answer ends there the incomplete character is dropped. Each token costs work
bounded by the window, not by the answer's length; the answer is the concatenation of the pieces,
so streamed deltas join exactly to the final text.

Streaming rules: leading and trailing whitespace are not part of the answer (unless ``strip`` is
false: OpenAI's completions return the text exactly as generated, leading space included); a tail
that could still grow into a stop string is held back; nothing at or past a stop string is ever sent. An
answer under a constraint ends at a stop string only where the text before it satisfies the
constraint (``may_stop``).
"""

from __future__ import annotations

from collections.abc import Callable

from tokenizers.decoders import DecodeStream

REPLACEMENT = "\ufffd"


class AnswerText:
    """The text of one answer as its tokens arrive."""

    def __init__(
        self,
        tokenizer,
        stops: tuple[str, ...] = (),
        use_decode_stream: bool = True,
        may_stop: Callable[[str], bool] | None = None,
        strip: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.strip = strip
        self.may_stop = may_stop
        backend = getattr(tokenizer, "_tokenizer", None)  # the Rust tokenizer of a fast tokenizer
        self._stream = DecodeStream(skip_special_tokens=True) if use_decode_stream and backend is not None else None
        self.stops = stops
        self.longest_stop = max((len(s) for s in stops), default=0)
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.stopped = False
        self.stop: str | None = None  # the stop string that ended the text, once one has
        self.sent = 0  # characters of the stripped answer already streamed
        self._lead = None if strip else 0  # leading whitespace to skip, known once a visible character arrives

    def add(self, token: int) -> None:
        """Take one token; sets ``stopped`` (and cuts the text) when a stop string appears."""
        self.tokens.append(token)
        piece = self._stream.step(self.tokenizer._tokenizer, token) if self._stream is not None else self._window()
        if not piece:
            return  # nothing new yet, or an incomplete multi-byte character: wait for the rest
        before = len(self.text)
        self.text += piece
        if self.stops:
            start = max(0, before - self.longest_stop + 1)
            found = [at for at in (self.text.find(stop, start) for stop in self.stops) if at >= 0]
            if found and (self.may_stop is None or self.may_stop(self.text[: min(found)])):
                at = min(found)
                self.stop = next(stop for stop in self.stops if self.text.find(stop, start) == at)
                self.text = self.text[:at]
                self.stopped = True

    def _window(self) -> str:
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        window = self._decode(self.tokens[self.prefix_offset :])
        if len(window) <= len(prefix) or window.endswith(REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return window[len(prefix) :]

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @property
    def answer(self) -> str:
        return self.text.strip() if self.strip else self.text

    def delta(self, final: bool = False) -> str:
        """What may be streamed now that was not sent yet (everything that is left, when ``final``)."""
        if self._lead is None:
            stripped = self.text.lstrip()
            if not stripped:
                return ""
            self._lead = len(self.text) - len(stripped)
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        if self.strip:
            end = len(self.text[:end].rstrip())  # trailing whitespace waits for what follows
        end -= self._lead
        if end <= self.sent:
            return ""
        piece = self.text[self._lead + self.sent : self._lead + end]
        self.sent = end
        return piece

    def _held_back(self) -> int:
        """Length of the tail that could still become the start of a stop string. Such a tail ends
        with the text's last character: only the stops' prefixes that end with it are tried."""
        held, last = 0, self.text[-1:]
        if not last:
            return 0
        for stop in self.stops:
            end = stop.rfind(last, 0, min(len(stop) - 1, len(self.text)))
            while end + 1 > held:
                if self.text.endswith(stop[: end + 1]):
                    held = end + 1
                    break
                end = stop.rfind(last, 0, end)
        return held
