"""One request while the engine works on it, and how a step's rows are laid out from such
requests for the step runner."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from llguidance import LLMatcher

from llm_worker.engine.kv_cache import BLOCK_SIZE, SCRATCH_BLOCK, prefix_hashes
from llm_worker.engine.requests import GenerationRequest, RequestHandle, Sink, TokenLogprob
from llm_worker.engine.runner import StepInputs
from llm_worker.engine.sampler import SamplingParams
from llm_worker.engine.scheduler import PrefillChunk, Slot
from llm_worker.engine.text import AnswerText
from llm_worker.engine.thinking import BudgetState


@dataclass(eq=False)
class Sequence:
    """One request while the engine works on it."""

    id: int
    request: GenerationRequest
    sink: Sink
    handle: RequestHandle
    submitted: float
    slot: Slot
    params: SamplingParams
    text: AnswerText
    generated: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None  # bool [vocab]: tokens seen, for the repetition penalty
    counts: torch.Tensor | None = None  # float [vocab]: tokens generated, for OpenAI's presence and frequency penalties
    logprobs: list[TokenLogprob] = field(default_factory=list)
    unsent_logprobs: int = 0  # how many of ``logprobs`` no delta has carried yet
    finish_reason: str | None = None
    matcher: LLMatcher | None = None  # where the answer stands in its grammar, when it has one
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # scored so far, when the request asks
    prompt_carry: torch.Tensor | None = None  # the last chunk's last logits row: it scores the next chunk's first token
    ahead: int = 0  # tokens sampled by steps in flight, not yet read back and accepted
    newest: tuple[object, int] | None = None  # where the newest of those is: (its launch, its row)
    budget: BudgetState | None = None  # where its thinking stands under its budget, when it has one

    @classmethod
    def start(cls, id: int, request: GenerationRequest, sink: Sink, tokenizer, prefix_caching: bool) -> Sequence:
        """A submitted request's state: its sampling settings, KV slot, incremental text and grammar."""
        config = request.config
        params = SamplingParams(
            sample=config.sampling,
            temperature=config.temperature or 1.0,
            top_k=config.top_k or 0,
            top_p=config.top_p if config.top_p is not None else 1.0,
            repetition_penalty=config.repetition_penalty,
            no_repeat_ngram_size=config.no_repeat_ngram_size,
            min_new_tokens=config.min_new_tokens,
            seed=config.seed if config.seed is not None else SamplingParams.random_seed(),
            min_p=config.min_p or 0.0,
            presence_penalty=config.presence_penalty,
            frequency_penalty=config.frequency_penalty,
            logit_bias=tuple(sorted((int(token), bias) for token, bias in config.logit_bias.items())) if config.logit_bias else (),
        )
        if config.ignore_eos:  # the end-of-sequence token is banned, as before min_new_tokens
            params = replace(params, min_new_tokens=config.max_new_tokens)
        slot = Slot(prompt_len=len(request.prompt_ids), max_new_tokens=config.max_new_tokens)
        # beam search computes outside the pool; a shared prompt block has no logits to score the prompt with
        if prefix_caching and config.num_beams == 1 and request.prompt_logprobs is None:
            slot.prefix = prefix_hashes(request.prompt_ids, request.adapter_revision or request.adapter or "")
        grammar = request.grammar
        text = AnswerText(tokenizer, request.stop, may_stop=grammar.accepts if grammar else None, strip=request.strip)
        seq = cls(id, request, sink, RequestHandle(), time.monotonic(), slot, params, text)
        seq.matcher = grammar.start() if grammar else None
        seq.budget = BudgetState(request.thinking) if request.thinking else None
        return seq

    @property
    def label(self) -> str:
        """How the logs name it: its job's id (the door's, RunPod's job id), else the engine's number."""
        return f"job {self.request.job_id}" if self.request.job_id else f"request {self.id}"

    @property
    def position(self) -> int:
        """Position of the newest token (accepted, or still in flight), the one the next decoding step feeds."""
        return self.slot.prompt_len + len(self.generated) + self.ahead - 1

    @property
    def wants_token(self) -> bool:
        """Whether another token may be launched for it (tokens in flight count against ``max_new_tokens``)."""
        return len(self.generated) + self.ahead < self.slot.max_new_tokens

    @property
    def host_bound(self) -> bool:
        """Whether its next step needs its newest token on the host first: a grammar's mask, n-gram
        bans, a thinking budget that may still force the close."""
        return self.matcher is not None or bool(self.params.no_repeat_ngram_size) or (self.budget is not None and self.budget.live)

    @property
    def forced_token(self) -> int | None:
        """The token its next step must produce (the thinking budget's close), if any."""
        return self.budget.forced_token if self.budget is not None else None

    def pool_index(self, position: int) -> int:
        """Where the token at ``position`` lives in the flat pool."""
        return self.slot.blocks[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE


def prefill_inputs(group: list[PrefillChunk[Sequence]], pad_id: int) -> StepInputs:
    """One forward over prompt chunks, left-padded to the widest (padding writes to the scratch block)."""
    width = max(c.length for c in group)
    inputs = StepInputs([], [], [], [])
    for chunk in group:
        seq, pad = chunk.seq, width - chunk.length
        positions = range(chunk.start, chunk.start + chunk.length)
        inputs.input_ids.append([pad_id] * pad + seq.request.prompt_ids[chunk.start : chunk.start + chunk.length])
        inputs.positions.append([0] * pad + list(positions))
        inputs.write_index += [SCRATCH_BLOCK * BLOCK_SIZE] * pad + [seq.pool_index(p) for p in positions]
        inputs.block_table.append(seq.slot.blocks)
    return inputs


def decode_inputs(seqs: list[Sequence], input_ids: list[int], carry: torch.Tensor | None = None) -> StepInputs:
    """One decoding step: each row feeds its newest token, ``input_ids`` (``-1 - k``: ``carry[k]``),
    and reads the blocks its context fills."""
    positions = [s.position for s in seqs]
    return StepInputs(
        input_ids=[[token] for token in input_ids],
        positions=[[p] for p in positions],
        write_index=[s.pool_index(p) for s, p in zip(seqs, positions)],
        block_table=[s.slot.blocks[: p // BLOCK_SIZE + 1] for s, p in zip(seqs, positions)],
        carry=carry,
    )
