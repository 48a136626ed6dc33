"""Choosing the next token for every row of a batch, each row with its own settings.

Small pure functions, applied in the order transformers' ``generate`` applies its processors:
repetition penalty, n-gram ban, minimum length; then temperature, top-k, top-p. Rows that share a
step never share state: a row's penalty, seed and limits touch only that row, so a request's
answer does not depend on who else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RowSampling:
    """What the sampler needs of one running sequence."""

    token_ids: list[int]  # prompt and generated tokens, for penalties and n-gram bans
    generated: int
    sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    no_repeat_ngram_size: int
    min_new_tokens: int
    generator: torch.Generator | None
    seen: torch.Tensor | None = field(default=None, repr=False)  # bool [vocab], only with a penalty


def apply_repetition_penalty(logits: torch.Tensor, rows: list[RowSampling]) -> None:
    """CTRL-style penalty, in place: divide positive logits of seen tokens, multiply negative ones."""
    picked = [i for i, row in enumerate(rows) if row.repetition_penalty != 1.0]
    if not picked:
        return
    index = torch.tensor(picked, device=logits.device)
    seen = torch.stack([rows[i].seen for i in picked])
    penalty = torch.tensor([rows[i].repetition_penalty for i in picked], device=logits.device)[:, None]
    part = logits[index]
    penalized = torch.where(part > 0, part / penalty, part * penalty)
    logits[index] = torch.where(seen, penalized, part)


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


def apply_bans(logits: torch.Tensor, rows: list[RowSampling], eos_ids: list[int]) -> None:
    """In place: forbid repeated n-grams and end-of-sequence before ``min_new_tokens``."""
    for i, row in enumerate(rows):
        if row.no_repeat_ngram_size:
            banned = banned_ngram_tokens(row.token_ids, row.no_repeat_ngram_size)
            if banned:
                logits[i, banned] = -float("inf")
        if row.generated < row.min_new_tokens:
            logits[i, eos_ids] = -float("inf")


def logits_to_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Per-row temperature, top-k (0: off) and top-p (1: off); returns probabilities sorted
    descending, and the token id of each sorted position."""
    scaled = logits / temperature[:, None]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    rank = torch.arange(sorted_logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, sorted_logits.shape[-1])[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, -float("inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    return probs, order


def next_tokens(logits: torch.Tensor, rows: list[RowSampling], eos_ids: list[int]) -> list[int]:
    """The next token of every row: argmax for greedy rows, a draw from each row's own generator otherwise."""
    logits = logits.float()
    apply_repetition_penalty(logits, rows)
    apply_bans(logits, rows, eos_ids)
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if row.sample]
    if sampled:
        device = logits.device
        probs, order = logits_to_probs(
            logits[sampled],
            torch.tensor([rows[i].temperature for i in sampled], device=device),
            torch.tensor([rows[i].top_k for i in sampled], device=device),
            torch.tensor([rows[i].top_p for i in sampled], device=device),
        )
        for j, i in enumerate(sampled):
            position = torch.multinomial(probs[j], 1, generator=rows[i].generator)
            chosen[i] = order[j, position]
    return chosen.tolist()
