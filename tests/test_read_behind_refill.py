"""Read-behind reads items back a step at a time as the head drains (both builds).

A queue past max_memory_size keeps its newest items only in the journal. Reading half the
budget back at once, in one loop callback, stalled every client for ~0.4 s on a queue of
small items; a take now reads back at most one REFILL_STEP of memory, and only once that
much of the budget is free.
"""

from __future__ import annotations

import pytest

from erq.config import QueueConfig
from erq.journal import QueueJournal
from erq.ring import ITEM_OVERHEAD

from conftest import impl_module

SIZE = 100  # data bytes per item


def value(i: int) -> bytes:
    return b"%0*d" % (SIZE, i)


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
    journal, _ = QueueJournal.open(
        tmp_path / "q", fsync="never", segment_size=256 * 1024, max_memory_size=memory
    )
    queue = queue_mod.Queue(
        "q", QueueConfig(max_memory_size=memory, fsync="never"), journal, clock=lambda: 1_000
    )
    large = 2 * memory // (200 + ITEM_OVERHEAD)
    added = [b"%0200d" % i for i in range(large)] + [b""] * (20 * large)
    for data in added:
        queue.add(data, 0, 0)
    taken = []
    try:
        while (item := queue.take(False)) is not None:
            taken.append(item.data)
            assert queue.mem_bytes + ITEM_OVERHEAD * queue.mem_items <= memory
    finally:
        queue.close()
    assert taken == added


def test_a_large_item_on_disk_is_read_back_only_once_the_items_ahead_are_taken(impl, tmp_path):
    # Memory holds small items; behind them on disk a large one. It was read back as soon
    # as a step of the budget was free, and sat in memory beside the items ahead of it:
    # 1,032,732 bytes held for a limit of 65,536. Now it is read when the ring is empty
    # (at least one item whatever the limit), alone.
    queue_mod = impl_module(impl, "_queue", "_queue_py")
    memory = 2 * queue_mod.REFILL_STEP
    journal, _ = QueueJournal.open(
        tmp_path / "q", fsync="never", segment_size=256 * 1024, max_memory_size=memory
    )
    queue = queue_mod.Queue(
        "q", QueueConfig(max_memory_size=memory, fsync="never"), journal, clock=lambda: 1_000
    )
    small = memory // (SIZE + ITEM_OVERHEAD)
    added = [value(i) for i in range(2 * small)] + [b"L" * (4 * memory)] + [value(0)] * 10
    for data in added:
        queue.add(data, 0, 0)
    taken = []
    try:
        while (item := queue.take(False)) is not None:
            taken.append(item.data)
            cost = queue.mem_bytes + ITEM_OVERHEAD * queue.mem_items
            assert cost <= memory or queue.mem_items == 1
    finally:
        queue.close()
    assert taken == added


def test_items_larger_than_a_step_are_still_read_back_up_to_the_budget(impl, tmp_path):
    # An item is read back early only if it fits the free budget, not the step: items
    # larger than a step still keep memory full rather than being read one at a time.
    queue_mod = impl_module(impl, "_queue", "_queue_py")
    memory = 16 * queue_mod.REFILL_STEP
    size = 2 * queue_mod.REFILL_STEP
    journal, _ = QueueJournal.open(
        tmp_path / "q", fsync="never", segment_size=1 << 20, max_memory_size=memory
    )
    queue = queue_mod.Queue(
        "q", QueueConfig(max_memory_size=memory, fsync="never"), journal, clock=lambda: 1_000
    )
    added = [b"%0*d" % (size, i) for i in range(40)]
    for data in added:
        queue.add(data, 0, 0)
    full = queue.mem_items
    assert full == memory // (size + ITEM_OVERHEAD)
    taken = []
    try:
        while (item := queue.take(False)) is not None:
            taken.append(item.data)
            assert queue.mem_items == min(full, len(added) - len(taken))
    finally:
        queue.close()
    assert taken == added
