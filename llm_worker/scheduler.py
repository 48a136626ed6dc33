"""Which requests run this step, and how much of which prompts is prefilled: host-side only.

A request is admitted when the batch has a free row and the KV pool can reserve its whole
footprint (prompt + ``max_new_tokens``); in order of arrival, so a large request is not starved
by smaller ones behind it. A request whose adapter cannot be loaded yet (every adapter slot is in
use) is passed over, so it never holds up the base model or other adapters.

Prefill is chunked under a per-step token budget and interleaved with decoding: each engine step
prefills at most ``budget`` prompt tokens, then decodes one token for every running request. A
prompt longer than the budget is split at fixed offsets (multiples of the budget), so its
computation is the same alone and in a crowd.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from llm_worker.kv_cache import BlockAllocator, blocks_for


@dataclass
class Slot:
    """What the scheduler tracks of one request."""

    prompt_len: int
    max_new_tokens: int
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # prompt tokens already in the KV cache

    @property
    def footprint(self) -> int:
        return self.prompt_len + self.max_new_tokens


S = TypeVar("S")


@dataclass(frozen=True)
class PrefillChunk(Generic[S]):
    seq: S
    start: int
    length: int

    @property
    def last(self) -> bool:
        """Whether this chunk ends the prompt (so its logits give the first token)."""
        return self.start + self.length == self.seq.slot.prompt_len


class Scheduler(Generic[S]):
    """Waiting, prefilling and running requests; ``S`` has a ``slot: Slot`` attribute."""

    def __init__(self, allocator: BlockAllocator, max_rows: int, prefill_budget: int) -> None:
        self.allocator = allocator
        self.max_rows = max_rows
        self.prefill_budget = prefill_budget
        self.waiting: deque[S] = deque()
        self.prefilling: list[S] = []
        self.running: list[S] = []

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def admit(self, ready: Callable[[S], bool | None]) -> list[S]:
        """Reserve KV for waiting requests, in order, while there is room. ``ready(seq)``: True to
        admit, False to pass it over for now (its adapter is busy), None to drop it (failed)."""
        admitted, passed = [], deque()
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_rows:
            seq = self.waiting[0]
            needed = blocks_for(seq.slot.footprint)
            if needed > self.allocator.free:
                break
            self.waiting.popleft()
            verdict = ready(seq)
            if verdict is None:
                continue
            if not verdict:
                passed.append(seq)
                continue
            seq.slot.blocks = self.allocator.reserve(needed)
            self.prefilling.append(seq)
            admitted.append(seq)
        self.waiting.extendleft(reversed(passed))
        return admitted

    def plan_prefill(self) -> list[PrefillChunk[S]]:
        """This step's prompt chunks, oldest request first, within the token budget."""
        chunks, left = [], self.prefill_budget
        for seq in self.prefilling:
            slot = seq.slot
            length = min(slot.prompt_len - slot.computed, self.prefill_budget - slot.computed % self.prefill_budget)
            if length > left:
                break
            chunks.append(PrefillChunk(seq, slot.computed, length))
            left -= length
        return chunks

    def prefilled(self, chunk: PrefillChunk[S]) -> None:
        chunk.seq.slot.computed += chunk.length
        if chunk.last:
            self.prefilling.remove(chunk.seq)
            self.running.append(chunk.seq)

    def release(self, seq: S) -> None:
        """Forget a request wherever it is and free its blocks."""
        for line in (self.running, self.prefilling):
            if seq in line:
                line.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.release(seq.slot.blocks)
        seq.slot.blocks = []
