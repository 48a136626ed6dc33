"""The sampler's per-step glue: from the step's rows (requests) to what ``sampler.py`` takes,
and from its tensors back to one token (and its logprobs) per row.

What the sampler needs besides the logits is started before the forward: the host-to-device
copies go out and the grammar masks of constrained rows are computed on llguidance's threads
meanwhile. After the forward the sampling is launched on the device (``launch``) and leaves one
thing to carry back: the sampled tokens (packed with their logprobs when a row asked for them),
which the host unpacks once they arrive (``SampledRows.unpack``), maybe a step later.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch

from llm_worker.engine.constraints import MaskComputer
from llm_worker.engine.requests import TokenLogprob
from llm_worker.engine.sampler import BAD_ROW, BatchParams, banned_ngram_tokens, sample, sample_with_logprobs
from llm_worker.engine.sequence import Sequence


@dataclass
class SamplingInputs:
    params: BatchParams
    generated: torch.Tensor  # long [rows]: tokens each row has made
    banned: torch.Tensor | None  # bool [rows, vocab]: n-gram bans
    grammar_masks: Future[torch.Tensor] | None  # the constrained rows' masks, being computed (MaskComputer.start)


@dataclass
class SampledRows:
    """A step's sampled tokens on the device (the next step's input ids may come from there), and
    what goes back to the host: the tokens, or with logprobs one packed row each."""

    tokens: torch.Tensor  # long [rows]; BAD_ROW where the logits were not finite
    packed: torch.Tensor | None = None  # float64 [rows, 2 + 2 * top]: token, its logprob, the top logprobs, their ids
    top: int = 0

    @property
    def outgoing(self) -> torch.Tensor:
        """The one tensor the host reads back."""
        return self.tokens if self.packed is None else self.packed

    def unpack(self, seqs: list[Sequence], values: list) -> list[tuple[int, TokenLogprob | None]]:
        """Each row's token, with its logprob entry when its request asked for logprobs, from
        ``outgoing`` read back (``values``)."""
        if self.packed is None:
            return [(token, None) for token in values]
        top, out = self.top, []
        for seq, row in zip(seqs, values):
            token, k = int(row[0]), seq.request.logprobs
            entry = None
            if k is not None and token != BAD_ROW:
                entry = TokenLogprob(token, row[1], tuple(zip(map(int, row[2 + top : 2 + top + k]), row[2 : 2 + k])))
            out.append((token, entry))
        return out


class StepSampler:
    """Samples a step's rows, each with its own settings; keeps the rows' parameter tensors
    while a decoding group's rows stay the same."""

    def __init__(self, vocab: int, eos_ids: list[int], device: torch.device, grammar_vocab: int | None = None) -> None:
        self.vocab = vocab
        self.device = device
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.eos_mask[[i for i in eos_ids if i < vocab]] = True
        self.masks = MaskComputer(vocab, device, grammar_vocab)
        self._params_cache: dict[tuple[int, ...], BatchParams] = {}

    def admit(self, seq: Sequence) -> None:
        """A row with a repetition penalty remembers the tokens seen, its prompt's first; a row
        with OpenAI's penalties counts the tokens it generates."""
        if seq.params.repetition_penalty != 1.0:
            seq.seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
            prompt = torch.tensor([t for t in seq.request.prompt_ids if t < self.vocab], dtype=torch.long)
            seq.seen[prompt.to(self.device, non_blocking=True)] = True  # a list index would be copied with a wait
        if seq.params.counts_tokens:
            seq.counts = torch.zeros(self.vocab, dtype=torch.float32, device=self.device)

    def prepare(self, seqs: list[Sequence], fresh: bool = False) -> SamplingInputs:
        """Started before the forward; ``fresh``: rows that do not form a decoding group (a prefill's)."""
        params = self._params_for(seqs, fresh)
        generated = torch.tensor([len(s.generated) + s.ahead for s in seqs], dtype=torch.long).to(self.device, non_blocking=True)
        return SamplingInputs(params, generated, self._bans(seqs), self.masks.start([s.matcher for s in seqs]))

    def launch(self, seqs: list[Sequence], logits: torch.Tensor, inputs: SamplingInputs) -> SampledRows:
        """Each row's token sampled on the device, packed with its logprobs when its request asked."""
        banned = inputs.banned
        if inputs.grammar_masks is not None:
            disallowed = self.masks.banned(inputs.grammar_masks)
            banned = disallowed if banned is None else banned | disallowed
        wanted = [s.request.logprobs for s in seqs if s.request.logprobs is not None]
        if not wanted:
            return SampledRows(sample(logits, inputs.params, inputs.generated, self.eos_mask, banned))
        top = max(wanted)
        result = sample_with_logprobs(logits, inputs.params, inputs.generated, self.eos_mask, banned, top)
        packed = torch.cat([result[0][:, None].double(), result[1][:, None].double(), result[2].double(), result[3].double()], 1)
        return SampledRows(result[0], packed, top)

    def _params_for(self, seqs: list[Sequence], fresh: bool) -> BatchParams:
        """The rows' sampling tensors, rebuilt only when a decoding group's rows change. A row's
        ``seen`` lives in the one cached batch that holds it."""
        key = tuple(s.id for s in seqs)
        params = None if fresh else self._params_cache.get(key)
        if params is None:
            seen, counts = self._rows(seqs, "seen", torch.bool), self._rows(seqs, "counts", torch.float32)
            params = BatchParams.build([s.params for s in seqs], seen, self.device, counts, self.vocab)
            for i, seq in enumerate(seqs):  # the batch tensors are updated in place each step
                if seq.seen is not None and params.seen is not None:
                    seq.seen = params.seen[i]
                if seq.counts is not None and params.counts is not None:
                    seq.counts = params.counts[i]
            if not fresh:
                rows = set(key)
                self._params_cache = {k: v for k, v in self._params_cache.items() if rows.isdisjoint(k)}
                self._params_cache[key] = params
        return params

    def _rows(self, seqs: list[Sequence], name: str, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Each row's ``seen`` or ``counts`` (zeros for rows without), when some row has one."""
        rows = [getattr(s, name) for s in seqs]
        if all(row is None for row in rows):
            return None
        return [row if row is not None else torch.zeros(self.vocab, dtype=dtype, device=self.device) for row in rows]

    def _bans(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """n-gram bans, for the rare rows that ask for them, and every token but the forced one for
        a row whose thinking budget closes the thinking (host work per such row)."""
        rows = [(i, s) for i, s in enumerate(seqs) if s.params.no_repeat_ngram_size or s.forced_token is not None]
        if not rows:
            return None
        banned = torch.zeros((len(seqs), self.vocab), dtype=torch.bool)
        for i, seq in rows:
            if (forced := seq.forced_token) is not None:
                banned[i] = True
                banned[i, forced] = False
                continue
            tokens = banned_ngram_tokens(seq.request.prompt_ids + seq.generated, seq.params.no_repeat_ngram_size)
            banned[i, tokens] = True
        return banned.to(self.device)

    def close(self) -> None:
        self.masks.close()
