"""The maintained grammar engines on the same JSON schemas, with the embedded model's tokenizer:
the time to prepare the tokenizer once, to compile each schema, and to compute one token mask
while walking a valid answer token by token (the per-step cost a constrained row adds).

    python -m benchmarks.grammar_engines

Measures whichever of llguidance (the worker's engine), xgrammar and outlines-core are installed;
the last two are not dependencies: `pip install xgrammar==0.2.9 outlines-core==0.2.14` to compare.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from collections.abc import Callable

from transformers import AutoTokenizer

from llm_worker.settings import Settings
from model_cache import prepare_default_model

SCHEMAS: dict[str, tuple[dict, object]] = {
    "flat object": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
            "required": ["name", "age", "city"],
        },
        {"name": "Ada Lovelace", "age": 36, "city": "London"},
    ),
    "nested + array": (
        {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "authors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"first": {"type": "string"}, "last": {"type": "string"}},
                        "required": ["first", "last"],
                    },
                    "minItems": 1,
                    "maxItems": 4,
                },
                "year": {"type": "integer", "minimum": 1450, "maximum": 2100},
            },
            "required": ["title", "authors", "year"],
        },
        {"title": "Structure and Interpretation", "authors": [{"first": "Harold", "last": "Abelson"}], "year": 1985},
    ),
    "enum + anyOf": (
        {
            "type": "object",
            "properties": {
                "sentiment": {"enum": ["positive", "negative", "neutral"]},
                "score": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]},
            },
            "required": ["sentiment", "score"],
        },
        {"sentiment": "positive", "score": 0.92},
    ),
    "pattern + format": (
        {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                "released": {"type": "string", "format": "date"},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
            },
            "required": ["sku", "released"],
        },
        {"sku": "ABC-1234", "released": "2024-05-17", "tags": ["new", "sale"]},
    ),
    "wide object (30 fields)": (
        {
            "type": "object",
            "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"]} for i in range(30)},
            "required": [f"field_{i}" for i in range(30)],
        },
        {f"field_{i}": [f"v{i}", i, i % 2 == 0][i % 3] for i in range(30)},
    ),
}


def timed(work: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.lib, self.torch = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.mask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict):
        grammar = self.lib.LLMatcher.grammar_from_json_schema(schema)
        return self.lib.LLMatcher(self.tokenizer, grammar)

    def step(self, matcher, token: int) -> bool:
        self.torch.fill_next_token_bitmask(matcher, self.mask, 0)
        return matcher.consume_token(token)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int) -> None:
        import xgrammar

        self.lib = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.mask = xgrammar.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict):
        return self.lib.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema)))

    def step(self, matcher, token: int) -> bool:
        matcher.fill_next_token_bitmask(self.mask, 0)
        return matcher.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab: int) -> None:
        import outlines_core

        self.lib = outlines_core
        tokens: dict[str, list[int]] = {}
        for token, token_id in tokenizer.get_vocab().items():
            if token_id != tokenizer.eos_token_id:  # the vocabulary takes each token as the text it stands for
                tokens.setdefault(tokenizer.convert_tokens_to_string([token]), []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, tokens)

    def compile(self, schema: dict):
        regex = self.lib.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.lib.Guide(self.lib.Index(regex, self.vocabulary))

    def step(self, guide, token: int) -> bool:
        allowed = guide.get_tokens()
        if token not in allowed:
            return False
        guide.advance(token)
        return True


def main() -> None:
    folder = prepare_default_model(Settings())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = len(tokenizer)
    print(f"tokenizer: {folder.name}, {vocab} tokens; {len(SCHEMAS)} schemas; times in ms")
    print(f"{'engine':<14} {'schema':<26} {'compile':>9} {'mask/token':>11} {'tokens':>7}")
    for engine_class, module in ((Llguidance, "llguidance"), (Xgrammar, "xgrammar"), (OutlinesCore, "outlines_core")):
        if importlib.util.find_spec(module) is None:
            print(f"{engine_class.name:<14} not installed")
            continue
        engine, setup = timed(lambda: engine_class(tokenizer, vocab))
        print(f"{engine.name:<14} {'(tokenizer, once)':<26} {setup * 1000:>9.1f}")
        compiles, steps = [], []
        for name, (schema, answer) in SCHEMAS.items():
            matcher, compile_seconds = timed(lambda: engine.compile(schema))
            tokens = tokenizer(json.dumps(answer), add_special_tokens=False)["input_ids"]
            times = []
            for token in tokens:
                accepted, seconds = timed(lambda: engine.step(matcher, token))
                times.append(seconds)
                if not accepted:
                    break
            walked = f"{len(times)}" + ("" if accepted else " (refused)")
            compiles.append(compile_seconds)
            steps.extend(times)
            print(f"{'':<14} {name:<26} {compile_seconds * 1000:>9.1f} {statistics.median(times) * 1000:>11.3f} {walked:>7}")
        print(
            f"{'':<14} {'median of all':<26} {statistics.median(compiles) * 1000:>9.1f} "
            f"{statistics.median(steps) * 1000:>11.3f}  (p95 step {sorted(steps)[int(len(steps) * 0.95)] * 1000:.3f})"
        )


if __name__ == "__main__":
    main()
