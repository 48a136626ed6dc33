"""Constrained decoding: answers that follow a JSON schema, a regular expression or a list of
choices, on llguidance (Microsoft's grammar engine, also behind vLLM's and SGLang's structured
output).

A constraint compiles once into a ``Grammar`` (cached by its text), and each request gets its own
matcher, a copy of the grammar's. Each step, the masks of the constrained rows only are computed
on the host by llguidance's thread pool (it releases the GIL) while the forward pass runs, then
applied in the sampler with the other bans as one batched operation. Rows without a constraint
cost nothing; a step without any costs nothing at all.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from llm_worker.errors import InputError

log = logging.getLogger(__name__)

MAX_SPEC_BYTES = 65_536  # a schema, regex or choice list, as JSON text
MAX_DEPTH = 32  # nesting of a JSON schema
MAX_CHOICES = 2_000
CACHE_SIZE = 256
# Every compiled answer is laid out the same way: no free whitespace (a small model asked for JSON
# otherwise may pad it with newlines until max_new_tokens), json.dumps's separators.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# llguidance's defaults, with the lexer's fuel per step lowered: a pathological regex fails its
# request instead of stalling every row of the batch.
LIMITS = llguidance.LLParserLimits(step_lexer_fuel=100_000, step_max_items=20_000)


class ConstraintError(InputError):
    """A constraint that cannot be compiled or is too large; the message names the field."""


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint. ``matcher`` is never advanced: each request starts from a copy."""

    field: str  # json_schema | regex | choice | tools
    matcher: llguidance.LLMatcher
    tokenizer: llguidance.LLTokenizer

    def start(self) -> llguidance.LLMatcher:
        return self.matcher.deep_copy()

    def accepts(self, text: str) -> bool:
        """Whether ``text`` as a whole satisfies the constraint (a stop string may end an answer only then)."""
        matcher = self.matcher.deep_copy()
        return matcher.consume_tokens(self.tokenizer.tokenize_str(text)) and matcher.is_accepting()


def grammar_vocab(vocab: int, tokenizer) -> int:
    """The vocabulary grammars are compiled for and masks are laid out over: the model's, or the
    tokenizer's when that is larger (a model whose output covers only the tokenizer's first ids;
    masks are cut to the model's width)."""
    return max(vocab, len(tokenizer))


class Grammars:
    """Compiles constraints for one model's tokenizer, with a cache: the same constraint twice
    compiles once. The llguidance tokenizer (about 0.4 s here) is built once, by ``warm_up`` or at
    the first constraint."""

    def __init__(self, tokenizer, vocab: int, eos_ids: list[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab = vocab
        self.eos_ids = eos_ids
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # compilations done (cache misses)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab, eos_token=self.eos_ids)
            return self._tokenizer

    def warm_up(self) -> None:
        """Build the llguidance tokenizer on a helper thread, so that the first constrained request
        does not wait for it."""
        threading.Thread(target=lambda: self.tokenizer, name="grammar-tokenizer", daemon=True).start()

    def compile(self, field: str, spec: Any, strict: bool = False) -> Grammar:
        """``field``: json_schema (a schema object), regex (a string) or choice (a list of strings).
        Raises ``ConstraintError`` naming ``generation_config.<field>`` and the reason. A schema
        keyword the engine cannot enforce (``uniqueItems``, which pydantic writes for a ``set``) is
        left out and logged, unless ``strict`` (OpenAI's ``strict: true``): then it is refused."""
        name = f"generation_config.{field}"
        text = json.dumps(spec, sort_keys=True, ensure_ascii=False)
        if len(text.encode()) > MAX_SPEC_BYTES:
            raise ConstraintError(f"{name}: {len(text.encode())} bytes as JSON; at most {MAX_SPEC_BYTES}")
        return self._cached(f"{field}:{strict}:{text}", field, name, lambda: _grammar(name, field, spec, strict), strict)

    def compile_lark(self, field: str, lark: str, strict: bool = False) -> Grammar:
        """A Lark grammar in llguidance's dialect (``%json`` included), built by a door (tool
        calls); refusals name ``generation_config.<field>``; ``strict`` as for ``compile``."""
        name = f"generation_config.{field}"
        if len(lark.encode()) > MAX_SPEC_BYTES:
            raise ConstraintError(f"{name}: its grammar is {len(lark.encode())} bytes; at most {MAX_SPEC_BYTES}")
        return self._cached(f"{field}:lark:{strict}:{lark}", field, name, lambda: llguidance.LLMatcher.grammar_from_lark(lark), strict)

    def _cached(self, key: str, field: str, name: str, build, strict: bool = True) -> Grammar:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            grammar = Grammar(field, self._matcher(name, build(), strict), self.tokenizer)
            self.compiled += 1
            self._cache[key] = grammar
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return grammar

    def _matcher(self, name: str, grammar: str, strict: bool) -> llguidance.LLMatcher:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer, limits=LIMITS)
        if failed or (messages and strict):  # strict: a keyword llguidance would leave out is refused, not half-followed
            raise ConstraintError(f"{name}: {_first_line(messages[0])}")
        for message in messages:
            log.info("%s: served without what the engine cannot enforce: %s", name, _first_line(message))
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=LIMITS)
        if matcher.is_error():
            raise ConstraintError(f"{name}: {_first_line(matcher.get_error())}")
        return matcher


def _grammar(name: str, field: str, spec: Any, strict: bool = True) -> str:
    if field == "json_schema":
        depth = json_depth(spec)
        if depth > MAX_DEPTH:
            raise ConstraintError(f"{name}: nested {depth} levels deep; at most {MAX_DEPTH}")
        return llguidance.LLMatcher.grammar_from_json_schema(closed_objects(spec), overrides={**JSON_LAYOUT, "lenient": not strict})
    if field == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if len(spec) > MAX_CHOICES:
        raise ConstraintError(f"{name}: {len(spec)} choices; at most {MAX_CHOICES}")
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(choice) for choice in spec))


SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_VALUES = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def closed_objects(schema: Any) -> Any:
    """The schema with every object that lists ``properties`` closed (``additionalProperties:
    false``) unless it says otherwise, as OpenAI's strict mode and xgrammar's default do: a small
    model left free to add keys rambles on with made-up ones. Answers still satisfy the schema."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(sub) for sub in out[key]]
    for key in SCHEMA_VALUES:
        if key in out:
            value = out[key]
            out[key] = [closed_objects(sub) for sub in value] if isinstance(value, list) else closed_objects(value)
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (a hostile schema may be very deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _first_line(message: str) -> str:
    """llguidance's message on one line, without its debugging dump (parser state, the grammar,
    the source line it quotes)."""
    message = re.sub(r"^at \d+\(\d+\): ", "", message.split("\n<state>")[0].split("\n<grammar>")[0])
    message = re.split(r"\n\s+\d+ \|", message)[0]
    return " ".join(message.split())


# ---------------------------------------------------------------------- the engine's side
class MaskComputer:
    """Token masks of a step's constrained rows, computed on the host while the forward runs."""

    def __init__(self, vocab: int, device: torch.device, width: int | None = None) -> None:
        self.vocab = vocab
        self.width = width or vocab  # the grammars' vocabulary (``grammar_vocab``)
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        self._executor = llguidance.LLExecutor()
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)

    def start(self, matchers: list[llguidance.LLMatcher | None]) -> Future[torch.Tensor] | None:
        """Begin the masks of the rows whose matcher is not None; None when no row has one."""
        rows = [(matcher, i) for i, matcher in enumerate(matchers) if matcher is not None]
        if not rows:
            return None
        return self._pool.submit(self._fill, rows, len(matchers))

    def _fill(self, rows: list[tuple[llguidance.LLMatcher, int]], count: int) -> torch.Tensor:
        bitmask = llguidance.torch.allocate_token_bitmask(count, self.width)  # all allowed
        llguidance.torch.fill_next_token_bitmask_par(self._executor, rows, bitmask)
        return bitmask

    def banned(self, pending: Future[torch.Tensor]) -> torch.Tensor:
        """The finished masks as bans: bool [rows, vocab], True where a row may not go."""
        bitmask = pending.result().to(self.device, non_blocking=True)
        allowed = (bitmask[:, :, None] >> self._shifts) & 1
        return allowed.reshape(bitmask.shape[0], -1)[:, : self.vocab] == 0

    def close(self) -> None:
        self._pool.shutdown(wait=False)
