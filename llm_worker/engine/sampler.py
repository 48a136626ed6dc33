"""The sampler: logits of every running row in, one token id per row out, as tensor work.

Every row carries its own settings (temperature, top-k, top-p, min-p, repetition penalty,
OpenAI's presence and frequency penalties, logit bias, minimum length, seed) in small per-batch
tensors, so a step samples all rows with the same handful of kernels whatever their mix: no
per-row Python and no host round trip. Processors apply in the order of transformers' ``generate``
(with vLLM's for what it lacks): logit bias, repetition penalty, presence and frequency penalties
(on the tokens generated so far), bans (n-grams, end-of-sequence before ``min_new_tokens``), then
temperature, top-k, top-p, min-p.

Randomness is counter-based (as in JAX): a row's uniform number at its step ``n`` is a hash of
``(seed, n)``, and the token is where it falls in the row's cumulative distribution (inverse
transform: one number and one cumulative sum a row, no per-token noise). So a seeded answer does
not depend on which other rows share the step, nor on how many steps the engine ran before. Only
the rows that sample are drawn, and only rows with top-k or top-p pay for a sort.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

BAD_ROW = -1  # the token reported for a row whose logits were not finite
MIN_TEMPERATURE = 1e-4  # below this, float32 logits / temperature overflow; the draw is greedy anyway

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings, as the sampler needs them."""

    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    seed: int = 0
    min_p: float = 0.0  # 0: off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token was generated so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # added to those tokens' logits

    @property
    def truncates(self) -> bool:
        return bool(self.top_k) or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def counts_tokens(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @staticmethod
    def random_seed() -> int:
        return secrets.randbits(63)


@dataclass
class BatchParams:
    """The running rows' settings as device tensors; rebuilt only when the batch changes."""

    sample: torch.Tensor  # bool [rows]
    plain_rows: torch.Tensor | None  # long: rows that sample from the whole distribution
    truncated_rows: torch.Tensor | None  # long: rows that sample with top-k or top-p (they need a sort)
    temperature: torch.Tensor  # float [rows]
    top_k: torch.Tensor  # long [rows]
    top_p: torch.Tensor  # float [rows]
    penalty: torch.Tensor | None  # float [rows], only when some row has one
    seen: torch.Tensor | None  # bool [rows, vocab], only when some row has a penalty
    min_new_tokens: torch.Tensor  # long [rows]
    any_min_new_tokens: bool
    seed: torch.Tensor  # long [rows]
    min_p: torch.Tensor  # float [rows]
    presence: torch.Tensor | None = None  # float [rows], only when some row has OpenAI's penalties
    frequency: torch.Tensor | None = None
    counts: torch.Tensor | None = None  # float [rows, vocab]: tokens generated so far, with those penalties
    bias: torch.Tensor | None = None  # float [rows, vocab], only when some row has a logit bias

    @classmethod
    def build(
        cls, params: Seq[SamplingParams], seen_rows: list[torch.Tensor] | None, device: torch.device,
        count_rows: list[torch.Tensor] | None = None, vocab: int = 0,
    ) -> BatchParams:
        def tensor(values, dtype):  # made on the host, copied without a wait: no sync with steps in flight
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        def rows(indices):
            return tensor(indices, torch.long) if indices else None

        penalized = any(p.repetition_penalty != 1.0 for p in params)
        counting = any(p.counts_tokens for p in params)
        bias = None
        if any(p.logit_bias for p in params):
            bias = torch.zeros((len(params), vocab), dtype=torch.float32)
            for i, p in enumerate(params):
                for token, value in p.logit_bias:
                    bias[i, token] = value
            bias = bias.to(device, non_blocking=True)
        return cls(
            sample=tensor([p.sample for p in params], torch.bool),
            plain_rows=rows([i for i, p in enumerate(params) if p.sample and not p.truncates]),
            truncated_rows=rows([i for i, p in enumerate(params) if p.sample and p.truncates]),
            temperature=tensor([max(p.temperature, MIN_TEMPERATURE) for p in params], torch.float32),
            top_k=tensor([p.top_k for p in params], torch.long),
            top_p=tensor([p.top_p for p in params], torch.float32),
            penalty=tensor([p.repetition_penalty for p in params], torch.float32) if penalized else None,
            seen=torch.stack(seen_rows) if penalized and seen_rows else None,
            min_new_tokens=tensor([p.min_new_tokens for p in params], torch.long),
            any_min_new_tokens=any(p.min_new_tokens for p in params),
            seed=tensor([p.seed for p in params], torch.long),
            min_p=tensor([p.min_p for p in params], torch.float32),
            presence=tensor([p.presence_penalty for p in params], torch.float32) if counting else None,
            frequency=tensor([p.frequency_penalty for p in params], torch.float32) if counting else None,
            counts=torch.stack(count_rows) if counting and count_rows else None,
            bias=bias,
        )


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style: divide positive logits of seen tokens by the row's penalty, multiply negative ones."""
    penalty = penalty[:, None]
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def ban_early_end(logits: torch.Tensor, generated: torch.Tensor, min_new_tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """No end-of-sequence before a row has made ``min_new_tokens`` tokens (``eos``: bool [vocab])."""
    early = (generated < min_new_tokens)[:, None] & eos[None, :]
    return logits.masked_fill(early, -float("inf"))


def apply_openai_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's additive penalties: ``frequency`` per time a token was generated, ``presence`` once if it was."""
    return logits - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]


def logits_to_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor | None = None
):
    """Per-row temperature, top-k (0: off), top-p (1: off) and min-p (0: off: tokens less likely
    than ``min_p`` times the most likely one are dropped); returns probabilities sorted
    descending, and the token id at each sorted position."""
    scaled = logits / temperature[:, None]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    rank = torch.arange(sorted_logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, sorted_logits.shape[-1])[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, -float("inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    nucleus_out = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None] & (rank > 0)  # the top token always stays
    probs = probs.masked_fill(nucleus_out, 0.0)
    if min_p is not None:
        probs = probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)  # sorted: the first is the most likely
    return probs, order


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (logical shifts emulated with masks)."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * _MIX1
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * _MIX2
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


def uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One number in (0, 1) per row that depends only on the row's seed and step (float64)."""
    bits = _mix(_mix(seed * _GOLDEN + _mix(step + 1)))
    return (((bits >> 11) & (2**53 - 1)).double() + 0.5) / 2**53


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse transform sampling: the index where ``u`` falls in each row's cumulative ``probs``."""
    cumulative = torch.cumsum(probs.double(), dim=-1)
    target = (u * cumulative[:, -1])[:, None]
    return torch.searchsorted(cumulative, target, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, params: BatchParams, generated: torch.Tensor, eos: torch.Tensor, banned: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of every row (long [rows]); ``BAD_ROW`` where the logits were not finite.

    ``generated``: tokens each row has made so far (its step); ``banned``: optional bool
    [rows, vocab] of tokens a row may not pick (n-gram bans)."""
    return _sample(logits, params, generated, eos, banned)[0]


def sample_with_logprobs(
    logits: torch.Tensor, params: BatchParams, generated: torch.Tensor, eos: torch.Tensor, banned: torch.Tensor | None, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sample``, plus log-probabilities from the distribution the sampler drew from: after the
    penalties, bans and temperature, before top-k/top-p truncation (so they sum to 1 over the
    vocabulary, as vLLM's ``processed_logprobs``). Returns tokens [rows], the chosen tokens'
    logprobs [rows], and the ``top`` most likely tokens' logprobs and ids [rows, top]."""
    chosen, processed = _sample(logits, params, generated, eos, banned)
    logprobs = torch.log_softmax(processed / params.temperature[:, None], dim=-1)
    chosen_logprobs = logprobs.gather(1, chosen.clamp(min=0)[:, None])[:, 0]
    top_logprobs, top_ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], chosen[:, None][:, :0])
    return chosen, chosen_logprobs, top_logprobs, top_ids


def _sample(logits, params, generated, eos, banned) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    total = logits.sum(dim=-1)  # NaN or +inf when any logit is (-inf alone is a legitimate ban)
    bad = torch.isnan(total) | torch.isposinf(total)
    if params.bias is not None:
        logits = logits + params.bias
    if params.penalty is not None:
        logits = apply_repetition_penalty(logits, params.seen, params.penalty)
    if params.counts is not None:
        logits = apply_openai_penalties(logits, params.counts, params.presence, params.frequency)
    if banned is not None:
        logits = logits.masked_fill(banned, -float("inf"))
    if params.any_min_new_tokens:
        logits = ban_early_end(logits, generated, params.min_new_tokens, eos)
    chosen = logits.argmax(dim=-1)
    # A row's path depends on its own settings only, so its draw is the same in any batch.
    if (rows := params.plain_rows) is not None:
        u = uniform(params.seed[rows], generated[rows])
        drawn = draw(torch.softmax(logits[rows] / params.temperature[rows, None], dim=-1), u)
        chosen = chosen.index_copy(0, rows, drawn)
    if (rows := params.truncated_rows) is not None:
        u = uniform(params.seed[rows], generated[rows])
        probs, order = logits_to_probs(logits[rows], params.temperature[rows], params.top_k[rows], params.top_p[rows], params.min_p[rows])
        chosen = chosen.index_copy(0, rows, order.gather(1, draw(probs, u)[:, None])[:, 0])
    if params.seen is not None:
        params.seen.scatter_(1, chosen[:, None], True)
    if params.counts is not None:
        params.counts.scatter_add_(1, chosen[:, None], torch.ones_like(chosen[:, None], dtype=params.counts.dtype))
    return chosen.masked_fill(bad, BAD_ROW), logits


def banned_ngram_tokens(token_ids: list[int], size: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``token_ids``."""
    if len(token_ids) < size:
        return []
    prefix = tuple(token_ids[len(token_ids) - size + 1 :])
    return [
        token_ids[start + size - 1]
        for start in range(len(token_ids) - size + 1)
        if tuple(token_ids[start : start + size - 1]) == prefix
    ]
