"""Prompt logprobs (OpenAI's ``echo`` with ``logprobs``, evaluation harnesses' loglikelihood): each
prompt token after the first, scored by the model's own distribution (log-softmax of the raw
logits, no temperature or penalty) at the position before it, with the ``k`` most likely
alternatives.

A request that asks for them is prefilled with the logits of every column of its chunks; the
last column of a chunk scores the next chunk's first token, so it is carried over. Its prompt
blocks are never taken from the prefix cache (a shared block has no logits). One transfer to
the host per scored chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llm_worker.engine.requests import Delta, TokenLogprob
from llm_worker.engine.scheduler import PrefillChunk
from llm_worker.engine.sequence import Sequence

Read = Callable[[torch.Tensor], list]


def wants_scores(group: list[PrefillChunk[Sequence]]) -> bool:
    return any(chunk.seq.request.prompt_logprobs is not None for chunk in group)


def score_chunks(
    group: list[PrefillChunk[Sequence]], logits: torch.Tensor, send: Callable[[Sequence, Delta], None], read: Read = torch.Tensor.tolist
) -> None:
    """Score the prompt tokens of the group's chunks that ask for it; ``logits``: [rows, width,
    vocab], rows left-padded to the width as ``prefill_inputs`` lays them out. A request whose
    whole prompt is scored is ``send`` its prompt logprobs, before its first token. ``read``
    brings a tensor to the host (``Device.readback``)."""
    width = logits.shape[1]
    for row, chunk in enumerate(group):
        seq = chunk.seq
        if seq.request.prompt_logprobs is None:
            continue
        columns = logits[row, width - chunk.length :]  # column j predicts position chunk.start + j + 1
        first = chunk.start + 1
        if seq.prompt_carry is not None:
            columns, first = torch.cat([seq.prompt_carry, columns]), chunk.start
        seq.prompt_carry = None if chunk.last else columns[-1:].clone()
        columns = columns[:-1]  # the last column predicts the next chunk's first token, or the answer's
        if len(columns):
            targets = seq.request.prompt_ids[first : first + len(columns)]
            seq.prompt_logprobs += score(columns, targets, seq.request.prompt_logprobs, read)
        if chunk.last:
            send(seq, Delta("", prompt_logprobs=tuple(seq.prompt_logprobs)))


def score(logits: torch.Tensor, targets: list[int], k: int, read: Read = torch.Tensor.tolist) -> list[TokenLogprob]:
    """Each target token's logprob under its row of ``logits`` [n, vocab], and the ``k`` most likely."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(targets, dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, index[:, None])
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0])
    packed = read(torch.cat([chosen.double(), top_values.double(), top_ids.double()], 1))  # one transfer back
    return [
        TokenLogprob(token, row[0], tuple(zip(map(int, row[1 + k : 1 + 2 * k]), row[1 : 1 + k])))
        for token, row in zip(targets, packed)
    ]
