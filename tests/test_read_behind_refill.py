"""Read-behind reads items back a step at a time as the head drains (both builds).

A queue past max_memory_size keeps its newest items only in the journal. Reading half the
budget back at once, in one loop callback, stalled every client for ~0.4 s on a queue of
small items; a take now reads back at most one REFILL_STEP of memory, and only once that
much of the budget is free.
"""

from __future__ import annotations

import gc

import pytest

from erq.config import QueueConfig
from erq.journal import QueueJournal, RecoveredItem
from erq.ring import ITEM_OVERHEAD

from conftest import impl_module
from support import compacting_held

SIZE = 100  # data bytes per item


def value(i: int) -> bytes:
    return b"%0*d" % (SIZE, i)


def open_queue(queue_mod, directory, memory: int, segment_size: int = 256 * 1024):
    """The queue as a start finds it in ``directory`` (the journal replayed; a new one is
    empty), with ``memory`` as its max_memory_size."""
    journal, rec = QueueJournal.open(
        directory,
        fsync="never",
        segment_size=segment_size,
        max_memory_size=memory,
        item_overhead=ITEM_OVERHEAD,
    )
    queue = queue_mod.Queue(
        "q", QueueConfig(max_memory_size=memory, fsync="never"), journal, clock=lambda: 1_000
    )
    queue.restore(rec.items, rec.disk_items, rec.disk_bytes, rec.next_id)
    return queue


def drain(queue, after_each=None) -> list[bytes]:
    """Every item by plain takes, in order; ``after_each()`` checks the queue after each."""
    out = []
    while (item := queue.take(False)) is not None:
        out.append(item.data)
        if after_each is not None:
            after_each()
    return out


def add_then_drain(queue, added: list[bytes], after_each) -> None:
    """Add ``added``, then take every item, calling ``after_each`` after each take: the queue
    gives them back in order. Closes the queue."""
    for data in added:
        queue.add(data, 0, 0)
    try:
        assert drain(queue, after_each) == added
    finally:
        queue.close()


def mem_cost(queue) -> int:
    return queue.mem_bytes + ITEM_OVERHEAD * queue.mem_items


@pytest.fixture
def deep_queue(impl, tmp_path):
    """A queue holding three memory budgets of items (two of them only on disk)."""
    queue_mod = impl_module(impl, "_queue", "_queue_py")
    memory = 16 * queue_mod.REFILL_STEP
    journal, _ = QueueJournal.open(
        tmp_path / "q", fsync="never", segment_size=256 * 1024, max_memory_size=memory
    )
    queue = queue_mod.Queue(
        "q", QueueConfig(max_memory_size=memory, fsync="never"), journal, clock=lambda: 1_000
    )
    count = 3 * memory // (SIZE + ITEM_OVERHEAD)
    for i in range(count):
        queue.add(value(i), 0, 0)
    yield queue_mod, queue, memory, count
    queue.close()


def test_a_take_reads_back_at_most_a_step_and_the_order_stays_fifo(deep_queue):
    queue_mod, queue, memory, count = deep_queue
    assert queue.mem_items < count // 2 < queue.items  # most of it is on disk
    step_items = queue_mod.REFILL_STEP // (SIZE + ITEM_OVERHEAD)
    taken, reads = [], 0
    while True:
        before = queue.mem_items
        item = queue.take(False)
        if item is None:
            break
        taken.append(item.data)
        read_back = queue.mem_items - (before - 1)
        assert 0 <= read_back <= step_items
        reads += read_back > 0
        assert queue.mem_bytes + ITEM_OVERHEAD * queue.mem_items <= memory
    assert taken == [value(i) for i in range(count)]
    # The reading was spread over many takes: about one in step_items of them.
    assert reads >= (count - memory // (SIZE + ITEM_OVERHEAD)) // step_items


def test_memory_is_refilled_to_the_budget_not_only_to_half(deep_queue):
    queue_mod, queue, memory, _ = deep_queue
    full = queue.mem_items
    for _ in range(full * 3 // 4):  # well past half of what memory held
        queue.take(False)
    # Each take read back what it freed, a step at a time: memory is within a step of full.
    cost = queue.mem_bytes + ITEM_OVERHEAD * queue.mem_items
    assert memory - cost < queue_mod.REFILL_STEP + 2 * (SIZE + ITEM_OVERHEAD)


def test_items_larger_than_the_disk_mean_are_read_back_within_the_budget(impl, tmp_path):
    # 200-byte items ahead of many empty ones: the mean on disk is a few bytes, so a step
    # counted in items at that mean allows many; their data bytes alone filled the step,
    # and their overhead went past the budget (85,936 of 65,536 compiled).
    queue_mod = impl_module(impl, "_queue", "_queue_py")
    memory = 2 * queue_mod.REFILL_STEP
    queue = open_queue(queue_mod, tmp_path / "q", memory)
    large = 2 * memory // (200 + ITEM_OVERHEAD)
    added = [b"%0200d" % i for i in range(large)] + [b""] * (20 * large)

    def within_budget() -> None:
        assert mem_cost(queue) <= memory

    add_then_drain(queue, added, within_budget)


def test_a_large_item_on_disk_is_read_back_only_once_the_items_ahead_are_taken(impl, tmp_path):
    # Memory holds small items; behind them on disk a large one. It was read back as soon
    # as a step of the budget was free, and sat in memory beside the items ahead of it:
    # 1,032,732 bytes held for a limit of 65,536. Now it is read when the ring is empty
    # (at least one item whatever the limit), alone.
    queue_mod = impl_module(impl, "_queue", "_queue_py")
    memory = 2 * queue_mod.REFILL_STEP
    queue = open_queue(queue_mod, tmp_path / "q", memory)
    small = memory // (SIZE + ITEM_OVERHEAD)
    added = [value(i) for i in range(2 * small)] + [b"L" * (4 * memory)] + [value(0)] * 10

    def within_budget_or_alone() -> None:
        assert mem_cost(queue) <= memory or queue.mem_items == 1

    add_then_drain(queue, added, within_budget_or_alone)


def test_items_larger_than_a_step_are_still_read_back_up_to_the_budget(impl, tmp_path):
    # An item is read back early only if it fits the free budget, not the step: items
    # larger than a step still keep memory full rather than being read one at a time.
    queue_mod = impl_module(impl, "_queue", "_queue_py")
    memory = 16 * queue_mod.REFILL_STEP
    size = 2 * queue_mod.REFILL_STEP
    queue = open_queue(queue_mod, tmp_path / "q", memory, segment_size=1 << 20)
    added = [b"%0*d" % (size, i) for i in range(40)]
    for data in added:
        queue.add(data, 0, 0)
    full = queue.mem_items
    assert full == memory // (size + ITEM_OVERHEAD)
    taken = 0

    def memory_kept_full() -> None:
        nonlocal taken
        taken += 1
        assert queue.mem_items == min(full, len(added) - taken)

    try:
        assert drain(queue, memory_kept_full) == added
    finally:
        queue.close()


# ---- a reload that lowers max_memory_size --------------------------------------------------
@pytest.fixture
def queue_in_memory(impl, tmp_path):
    """A queue whose items all fit in memory (over several segments), and the smaller limit a
    reload gives it: a quarter of what they cost."""
    queue_mod = impl_module(impl, "_queue", "_queue_py")
    memory = 16 * queue_mod.REFILL_STEP
    queue = open_queue(queue_mod, tmp_path / "q", memory)
    count = memory // (SIZE + ITEM_OVERHEAD) * 3 // 4
    for i in range(count):
        queue.add(value(i), 0, 0)
    assert queue.mem_items == count and queue.journal.segment_count > 1
    yield queue_mod, queue, count, mem_cost(queue) // 4
    queue.close()


def test_a_lowered_max_memory_size_frees_the_memory_of_the_items_past_it_at_once(
    queue_in_memory, tmp_path
):
    """A reload to a lower max_memory_size only applied to new items: the items in memory
    stayed there until they were read."""
    queue_mod, queue, count, lower = queue_in_memory
    opened = queue.take(True)  # an open read, aborted after the reload: back at the head
    queue.configure(QueueConfig(max_memory_size=lower, fsync="never"))
    assert mem_cost(queue) <= lower < mem_cost(queue) + SIZE + ITEM_OVERHEAD
    assert queue.items == count - 1 and queue.bytes == (count - 1) * SIZE
    queue.unremove(queue.open_read(opened.id))
    for i in range(count, count + 10):  # new items go to disk, behind the ones sent there
        queue.add(value(i), 0, 0)
    assert queue.mem_items <= count // 4 + 1  # the aborted read is back in memory
    head = [queue.take(False).data for _ in range(count // 2)]
    assert head == [value(i) for i in range(count // 2)]
    assert mem_cost(queue) <= lower
    # A crash: the journal states the same queue, whatever memory held.
    queue.journal._release()
    again = open_queue(queue_mod, tmp_path / "q", lower)
    try:
        assert drain(again) == [value(i) for i in range(count // 2, count + 10)]
    finally:
        again.close()


def test_a_lowered_max_memory_size_sends_its_items_back_without_a_gc_collection(impl, tmp_path):
    """The spill makes a tuple per record it reads and a position per item it sends back,
    none of them in a cycle: with the GC on, its collections walked the queue's items and
    took half of a reload's pause (a stop of every client: 0.59 -> 0.32 s for 480,000
    items)."""
    queue_mod = impl_module(impl, "_queue", "_queue_py")
    memory = 4 << 20
    queue = open_queue(queue_mod, tmp_path / "q", memory, segment_size=1 << 20)
    count = memory // (1 + ITEM_OVERHEAD) - 1
    for _ in range(count):
        queue.add(b"x", 0, 0)
    assert queue.mem_items == count
    collections = []

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()
    gc.callbacks.append(note)
    try:
        queue.configure(QueueConfig(max_memory_size=memory // 4, fsync="never"))
    finally:
        gc.callbacks.remove(note)
    try:
        assert queue.mem_items <= count // 4 + 1 and queue.items == count
        # At most the one of the youngest generation that the allocations counted meanwhile
        # start once the GC is back on (a few objects are still young: no walk of the items).
        assert collections in ([], [0]), collections
        assert gc.isenabled()
        assert drain(queue) == [b"x"] * count
    finally:
        queue.close()


def test_a_lowered_max_memory_size_waits_for_a_running_compaction_and_survives_the_next(
    queue_in_memory, tmp_path, monkeypatch
):
    """A snapshot being written moves the records: the items leave memory at the next sweep
    once it is in place; the next compaction moves them again, and nothing is lost."""
    queue_mod, queue, count, lower = queue_in_memory
    journal = queue.journal
    gate = compacting_held(journal, [], in_memory(count), monkeypatch)  # the queue's state
    queue.configure(QueueConfig(max_memory_size=lower, fsync="never"))
    assert queue.mem_items == count  # not while the snapshot is written
    gate.set()
    journal.wait_compaction()
    queue.maybe_compact()  # the sweep
    assert mem_cost(queue) <= lower and queue.items == count
    journal.compact([], in_memory(queue.mem_items), wait=True)
    assert journal.rewrites == 2
    queue.journal._release()  # a crash
    again = open_queue(queue_mod, tmp_path / "q", lower)
    try:
        assert drain(again) == [value(i) for i in range(count)]
    finally:
        again.close()


def in_memory(n: int) -> list[RecoveredItem]:
    """The first ``n`` items of queue_in_memory's queue, as a compaction snapshot takes them."""
    return [RecoveredItem(i + 1, 0, 1_000, 0, value(i)) for i in range(n)]
