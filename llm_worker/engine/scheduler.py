"""Which requests run this step, and how much of which prompts is prefilled: host-side only.

A request is admitted when the batch has a free row and the KV pool can reserve its whole
footprint (prompt + ``max_new_tokens``), less the leading prompt blocks it finds in the prefix
cache (in whole prefill chunks), which it shares and does not prefill; in order of arrival, so a large request is not
starved by smaller ones behind it. A request whose next prompt blocks another request is
prefilling right now waits for them (a step or two) instead of computing them a second time. A request whose adapter cannot be loaded yet (every adapter slot is in
use) is passed over, so it never holds up the base model or other adapters.

Prefill is chunked under a per-step token budget and interleaved with decoding: each engine step
prefills at most ``budget`` prompt tokens, then decodes one token for every running request. A
prompt longer than the budget is split at fixed offsets (multiples of the budget), so its
computation is the same alone and in a crowd. The step's chunks run as a few forward passes of
similar widths (``group_by_width``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from llm_worker.engine.kv_cache import BLOCK_SIZE, BlockAllocator, blocks_for

MAX_PADDING_RATIO = 1.25  # a prefill forward computes at most this many padded tokens per real one


@dataclass
class Slot:
    """What the scheduler tracks of one request."""

    prompt_len: int
    max_new_tokens: int
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # prompt tokens already in the KV cache
    prefix: list[bytes] = field(default_factory=list)  # content hashes of the prompt's full blocks (empty: no sharing)
    cached: int = 0  # prompt tokens found in the prefix cache at admission

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
        # Prefixes are shared in whole prefill chunks only: a shared chunk's keys and values were
        # computed exactly as the request would have computed them, and the rest of its prompt is
        # cut at the same offsets as without the cache, so every answer is the same either way.
        self.chunk_blocks = prefill_budget // BLOCK_SIZE if prefill_budget % BLOCK_SIZE == 0 else 0
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
        pending = {digest for seq in self.prefilling for digest in self._registered(seq.slot)}  # being computed now
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_rows:
            seq = self.waiting[0]
            slot = seq.slot
            wanted = slot.prefix[: (slot.prompt_len - 1) // self.prefill_budget * self.chunk_blocks]  # the last token is computed
            shared = self.allocator.lookup(wanted)
            shared = shared[: len(shared) // self.chunk_blocks * self.chunk_blocks] if self.chunk_blocks else []
            if len(shared) < len(wanted) and wanted[len(shared)] in pending:
                passed.append(self.waiting.popleft())  # its next blocks are being computed: share them next step
                continue
            needed = blocks_for(slot.footprint) - len(shared)
            if needed + self.allocator.idle(shared) > self.allocator.free:
                break
            self.waiting.popleft()
            verdict = ready(seq)
            if verdict is None:
                continue
            if not verdict:
                passed.append(seq)
                continue
            self.allocator.share(shared)
            slot.blocks = shared + self.allocator.reserve(needed)
            slot.computed = slot.cached = len(shared) * BLOCK_SIZE
            pending.update(self._registered(slot))
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
        """A chunk's keys and values are in the cache. Once the whole prompt is, its full blocks
        become findable (never before: a request that fails mid-prefill leaves nothing cached)."""
        slot = chunk.seq.slot
        slot.computed += chunk.length
        if chunk.last:
            for block, digest in zip(slot.blocks, self._registered(slot)):
                self.allocator.register(block, digest)
            self.prefilling.remove(chunk.seq)
            self.running.append(chunk.seq)

    def _registered(self, slot: Slot) -> list[bytes]:
        """The hashes of the blocks a request registers once prefilled: its whole prefill chunks."""
        return slot.prefix[: slot.prompt_len // self.prefill_budget * self.chunk_blocks]

    def release(self, seq: S) -> None:
        """Forget a request wherever it is and free its blocks."""
        for line in (self.running, self.prefilling):
            if seq in line:
                line.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.release(seq.slot.blocks)
        seq.slot.blocks = []


def group_by_width(chunks: list[PrefillChunk[S]]) -> list[list[PrefillChunk[S]]]:
    """A step's prompt chunks cut into a few forward passes of similar widths (little padding)."""
    groups: list[list[PrefillChunk[S]]] = []
    group: list[PrefillChunk[S]] = []
    real = 0
    for chunk in sorted(chunks, key=lambda c: c.length):
        padded = chunk.length * (len(group) + 1)
        if group and padded > MAX_PADDING_RATIO * (real + chunk.length):
            groups.append(group)
            group, real = [], 0
        group.append(chunk)
        real += chunk.length
    if group:
        groups.append(group)
    return groups
