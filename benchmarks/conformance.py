"""Conformance: the engine's greedy answers, token for token, against the model's own ``generate``.

    python -m benchmarks.conformance [--prompts 8] [--max-new-tokens 32]

With the worker's own settings (BASE_MODEL, LORA_WEIGHTS, LORA_ADAPTERS, ADAPTER_DIR, DTYPE,
DEVICE, LOAD_8BIT, ...), it starts the worker as the handler does and sends every Alpaca seed
prompt, for the base model and for each adapter, to the engine at once (so they share batches,
chunked prefill and mixed-adapter steps). Then, with the engine closed, it loads the model again
and answers each prompt alone with transformers' ``generate`` (PEFT's for an adapter). It prints
each answer's first difference, a summary line, and exits 1 when any answer differs.

Both sides decode greedily and stop at the same end-of-sequence ids (the engine's), so their
answers must be the same list of token ids, length included: nothing is cut to the shorter one,
which would hide an answer that ends early. Exact equality is expected in float32; in bfloat16 or
float16 a batch's shape changes the rounding of its matrix products, and an answer may part from
``generate``'s where two tokens are nearly tied.
"""

from __future__ import annotations

import argparse
import gc
import logging
import queue
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig as TransformersGenerationConfig

from llm_worker.model.adapters import load_into
from benchmarks.workloads import alpaca_workload
from llm_worker.engine import Completion, Engine, EngineError, Event, Failed, GenerationRequest
from llm_worker.model.loading import load_model
from llm_worker.schema import GenerationConfig
from llm_worker.service import Worker
from llm_worker.settings import BASE_ADAPTER_NAME, Settings

STARTED = time.perf_counter()

CONTEXT_CHARS = 40  # how much of the agreed answer a difference is shown after


@dataclass(frozen=True)
class Case:
    """One prompt to answer greedily, with an adapter (None: the base model)."""

    prompt_ids: list[int]
    adapter: str | None = None


@dataclass(frozen=True)
class Answer:
    token_ids: list[int]
    logprobs: list[float] | None = None  # each chosen token's log-probability


@dataclass(frozen=True)
class Comparison:
    """The engine's answer to a case against the reference's."""

    case: Case
    reference: Answer
    engine: Answer

    @property
    def first_difference(self) -> int | None:
        """Index of the first token where the answers differ (one may end there), None if equal."""
        ours, theirs = self.engine.token_ids, self.reference.token_ids
        for index, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                return index
        return None if len(ours) == len(theirs) else min(len(ours), len(theirs))

    @property
    def equal(self) -> bool:
        return self.first_difference is None

    def tokens_at(self, index: int) -> tuple[int | None, int | None]:
        """(reference, engine) token at ``index``; None where that answer has ended."""
        return _at(self.reference.token_ids, index), _at(self.engine.token_ids, index)

    def describe(self, tokenizer) -> str:
        """One line: ``equal (N tokens)``, or where and how the answers part."""
        index = self.first_difference
        if index is None:
            return f"equal ({len(self.engine.token_ids)} tokens)"
        reference, engine = self.tokens_at(index)
        agreed = tokenizer.decode(self.engine.token_ids[:index])[-CONTEXT_CHARS:]
        return (
            f"differs at token {index}: generate {_show(tokenizer, reference)}, engine {_show(tokenizer, engine)}, "
            f"after {agreed!r} (generate {len(self.reference.token_ids)} tokens, engine {len(self.engine.token_ids)})"
        )


def _at(tokens: list[int], index: int) -> int | None:
    return tokens[index] if index < len(tokens) else None


def _show(tokenizer, token: int | None) -> str:
    return "(ended)" if token is None else f"{tokenizer.decode([token])!r} ({token})"


# ---------------------------------------------------------------------------- the engine's side
def greedy_request(case: Case, max_new_tokens: int, logprobs: bool = False) -> GenerationRequest:
    """The engine request for a case: greedy, no stop strings, the chosen token's logprob if asked."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
    return GenerationRequest(case.prompt_ids, config, adapter=case.adapter, logprobs=0 if logprobs else None)


def engine_answers(engine: Engine, cases: Sequence[Case], max_new_tokens: int, logprobs: bool = False) -> list[Answer]:
    """Every case submitted at once, so that they share the engine's steps. If any fails, raises
    ``EngineError`` once all have ended, naming the failed cases and each distinct error."""
    events: queue.Queue[tuple[int, Event]] = queue.Queue()
    for index, case in enumerate(cases):
        sink = lambda event, index=index: events.put((index, event))  # noqa: E731
        engine.submit(greedy_request(case, max_new_tokens, logprobs), sink)
    ended: dict[int, Completion | Failed] = {}
    while len(ended) < len(cases):
        index, event = events.get()
        if isinstance(event, (Completion, Failed)):
            ended[index] = event
    failed = {index: event.error for index, event in ended.items() if isinstance(event, Failed)}
    if failed:
        errors = {error: [i for i in failed if failed[i] == error] for error in failed.values()}
        lines = [f"cases {_labels(cases, indices)}: {error}" for error, indices in errors.items()]
        raise EngineError(f"{len(failed)} of {len(cases)} requests failed:\n" + "\n".join(lines))
    return [_answer(ended[index]) for index in range(len(cases))]


def _labels(cases: Sequence[Case], indices: list[int]) -> str:
    return ", ".join(f"{i} ({cases[i].adapter or 'base'})" for i in indices)


def _answer(completion: Completion) -> Answer:
    logprobs = None if completion.logprobs is None else [item.logprob for item in completion.logprobs]
    return Answer(list(completion.token_ids), logprobs)


# ---------------------------------------------------------------------------- the reference
def reference_answers(
    model, cases: Sequence[Case], max_new_tokens: int, eos_ids: Sequence[int], pad_id: int
) -> list[Answer]:
    """Each case alone (one row, no padding) through the model's own ``generate``."""
    return [reference_answer(model, case, max_new_tokens, eos_ids, pad_id) for case in cases]


def reference_answer(model, case: Case, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int) -> Answer:
    """Greedy ``generate`` for one case, with its adapter active (PEFT's own switching), and the
    log-softmax of ``generate``'s raw logits at each chosen token."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([case.prompt_ids], device=device)
    with plain_generation_defaults(model), active_adapter(model, case.adapter), torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(eos_ids),
            pad_token_id=pad_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = output.sequences[0, input_ids.shape[1] :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), dim=-1)[token].item() for step, token in zip(output.logits, tokens)]
    return Answer(tokens, logprobs)


@contextmanager
def plain_generation_defaults(model) -> Iterator[None]:
    """``generate`` fills every setting a call leaves unset from ``model.generation_config``, even
    when a fresh ``GenerationConfig`` is passed (measured with transformers 5.24: a
    ``repetition_penalty`` there still applied). The engine's greedy request applies none of them,
    so the reference runs with transformers' plain defaults."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = TransformersGenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


@contextmanager
def active_adapter(model, name: str | None) -> Iterator[None]:
    """PEFT's own way to answer with adapter ``name``, or with the base model (None)."""
    if not hasattr(model, "peft_config"):
        if name is not None:
            raise ValueError(f"adapter {name!r} asked of a model without adapters")
        yield
    elif name is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(name)
        yield


# ---------------------------------------------------------------------------- both
def compare(cases: Sequence[Case], references: Sequence[Answer], answers: Sequence[Answer]) -> list[Comparison]:
    return [Comparison(*row) for row in zip(cases, references, answers, strict=True)]


def check(
    engine: Engine, model, cases: Sequence[Case], max_new_tokens: int, logprobs: bool = False
) -> list[Comparison]:
    """The engine (all cases at once) against ``model``'s ``generate`` (each case alone). ``model``
    must be a separate copy: the engine changes the model it is given (attention, adapters)."""
    answers = engine_answers(engine, cases, max_new_tokens, logprobs)
    references = reference_answers(model, cases, max_new_tokens, engine.eos_ids, engine.pad_id)
    return compare(cases, references, answers)


# ---------------------------------------------------------------------------- the CLI
@dataclass
class EngineRun:
    """What the engine answered, and what the reference needs to answer the same cases."""

    cases: list[Case]
    answers: list[Answer]
    labels: dict[str | None, str]  # adapter (None: base) -> how the output names it
    adapter_folders: dict[str, Path]
    eos_ids: list[int]
    pad_id: int
    tokenizer: object


def run_engine(settings: Settings, prompts: int, max_new_tokens: int) -> EngineRun:
    """Start the worker as the handler does; send every seed prompt, for the base model and for
    each adapter it knows, to its engine at once."""
    worker = Worker.start(settings)
    if worker.load_error:
        print(f"conformance: {worker.load_error}", file=sys.stderr)
        raise SystemExit(2)
    try:
        adapters = worker.adapters
        names = [] if adapters.merged else list(adapters.known())  # MERGE_LORA=1 serves only the merged one
        labels = {None: f"base, {adapters.merged} merged" if adapters.merged else "base"}
        labels |= {name: f"adapter {name}" for name in names}
        cases: list[Case] = []
        for name in [None, *names]:
            adapter = name or adapters.merged or BASE_ADAPTER_NAME  # as a job names it
            for job in alpaca_workload(prompts, max_new_tokens):
                _, request = worker.prepare({**job, "stream": False, "adapter": adapter})
                cases.append(Case(request.prompt_ids, request.adapter))
        loaded = worker.loaded
        say(f"{loaded.name} on {loaded.device}, dtype {str(loaded.dtype).removeprefix('torch.')}: exact equality is "
            "expected in float32; in bfloat16/float16 a batch's shape can change a nearly tied token")
        say(f"engine: {len(cases)} requests at once ({prompts} prompts x {len(labels)} models)")
        answers = engine_answers(worker.engine, cases, max_new_tokens)
        folders = {name: adapters.locate(name) for name in names}
        engine = worker.engine
        return EngineRun(cases, answers, labels, folders, engine.eos_ids, engine.pad_id, loaded.tokenizer)
    finally:
        worker.close()


def run_reference(settings: Settings, run: EngineRun, max_new_tokens: int) -> list[Answer]:
    """Load the model again (the engine's copy is gone) with every adapter through PEFT, and
    answer each case alone with ``generate``."""
    model = load_model(settings).model
    for name, folder in run.adapter_folders.items():
        model = load_into(model, folder, name)
    say(f"generate: the {len(run.cases)} requests one at a time")
    return reference_answers(model, run.cases, max_new_tokens, run.eos_ids, run.pad_id)


def report(comparisons: list[Comparison], labels: dict[str | None, str], tokenizer) -> str:
    """Print each answer's verdict, per model; return the summary line."""
    summary = []
    for adapter, label in labels.items():
        mine = [c for c in comparisons if c.case.adapter == adapter]
        print(f"-- {label}")
        for index, comparison in enumerate(mine):
            print(f"  prompt {index}: {comparison.describe(tokenizer)}")
        summary.append(f"{sum(c.equal for c in mine)}/{len(mine)} equal ({label})")
    return "conformance: " + ", ".join(summary)


def say(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="Alpaca seed prompts, for the base and each adapter")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = Settings()
    try:
        run = run_engine(settings, args.prompts, args.max_new_tokens)
    except EngineError as err:
        print(f"conformance: the engine failed: {err}")
        return 1
    gc.collect()  # the engine's model and KV cache go before the reference loads its copy
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    references = run_reference(settings, run, args.max_new_tokens)
    comparisons = compare(run.cases, references, run.answers)
    print(report(comparisons, run.labels, run.tokenizer))
    return 0 if all(c.equal for c in comparisons) else 1


if __name__ == "__main__":
    sys.exit(main())
