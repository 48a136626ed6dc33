"""Admission under the KV budget and the batch size, and chunked prefill planning."""

from dataclasses import dataclass

from llm_worker.engine.kv_cache import BLOCK_SIZE, BlockAllocator
from llm_worker.engine.scheduler import Scheduler, Slot


@dataclass(eq=False)
class Req:
    name: str
    slot: Slot
    adapter: str | None = None


def req(name, prompt, new=16, adapter=None):
    return Req(name, Slot(prompt_len=prompt, max_new_tokens=new), adapter)


def test_admits_in_order_while_blocks_last_and_waits_for_the_rest():
    scheduler = Scheduler(BlockAllocator(1 + 10), max_rows=8, prefill_budget=512)
    first, second, third = req("a", 48, 16), req("b", 40, 24), req("c", 10, 6)  # 4, 4 and 1 blocks
    big = req("big", 100, 20)  # 8 blocks: does not fit after a and b
    scheduler.waiting.extend([first, second, big, third])
    admitted = scheduler.admit(lambda r: True)
    assert admitted == [first, second]
    assert list(scheduler.waiting) == [big, third], "a later small request must not starve the big one"
    scheduler.release(first)
    scheduler.release(second)
    assert scheduler.admit(lambda r: True) == [big, third]
    assert scheduler.allocator.free == 1


def test_batch_size_caps_admission():
    scheduler = Scheduler(BlockAllocator(1 + 100), max_rows=2, prefill_budget=512)
    scheduler.waiting.extend(req(str(i), 10) for i in range(5))
    assert len(scheduler.admit(lambda r: True)) == 2
    assert len(scheduler.waiting) == 3


def test_a_request_waiting_for_a_busy_adapter_does_not_block_the_ones_behind_it():
    scheduler = Scheduler(BlockAllocator(1 + 100), max_rows=8, prefill_budget=512)
    blocked, base, other = req("blocked", 10, adapter="busy"), req("base", 10), req("other", 10, adapter="free")
    scheduler.waiting.extend([blocked, base, other])
    admitted = scheduler.admit(lambda r: r.adapter != "busy")
    assert admitted == [base, other]
    assert list(scheduler.waiting) == [blocked]


def test_a_refused_request_is_dropped():
    scheduler = Scheduler(BlockAllocator(1 + 100), max_rows=8, prefill_budget=512)
    bad, good = req("bad", 10), req("good", 10)
    scheduler.waiting.extend([bad, good])
    assert scheduler.admit(lambda r: None if r is bad else True) == [good]
    assert not scheduler.waiting
    assert scheduler.allocator.free == 100 - 2


def test_prefill_chunks_fit_the_budget_at_fixed_offsets():
    scheduler = Scheduler(BlockAllocator(1 + 200), max_rows=8, prefill_budget=64)
    long, short = req("long", 150), req("short", 30)
    scheduler.waiting.extend([long, short])
    scheduler.admit(lambda r: True)
    plans = []
    while scheduler.prefilling:
        chunks = scheduler.plan_prefill()
        assert sum(c.length for c in chunks) <= 64
        plans.append([(c.seq.name, c.start, c.length) for c in chunks])
        for chunk in chunks:
            scheduler.prefilled(chunk)
    assert plans == [[("long", 0, 64)], [("long", 64, 64)], [("long", 128, 22), ("short", 0, 30)]]
    assert scheduler.running == [long, short]


def test_blocks_cover_prompt_and_new_tokens():
    scheduler = Scheduler(BlockAllocator(1 + 100), max_rows=8, prefill_budget=512)
    r = req("r", 17, 16)
    scheduler.waiting.append(r)
    scheduler.admit(lambda _: True)
    assert len(r.slot.blocks) * BLOCK_SIZE >= 33 and len(set(r.slot.blocks)) == len(r.slot.blocks)
    assert 0 not in r.slot.blocks, "block 0 is scratch"
