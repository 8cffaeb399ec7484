"""Queue: a plain take beside 10,000 reads held open under ``open_timeout`` (every fetch
returns the reads past it first; the look stops at the first one that is not)."""

from collections import deque

from erq.config import QueueConfig

from conftest import load

OPEN = 10_000
TAKES = 1_000


def test_take_beside_10000_open_reads(benchmark, impl):
    queue_mod = load(impl, "_queue", "_queue_py")
    queue = queue_mod.Queue("t", QueueConfig(open_timeout=60_000), None, clock=lambda: 1_000)
    for _ in range(OPEN):
        queue.add(b"0123456789", 0, 0)
    for _ in range(OPEN):
        queue.take(True)
    add, take = queue.add, queue.take

    def cycle() -> int:
        for _ in range(TAKES):
            add(b"0123456789", 0, 0)
        for _ in range(TAKES):
            take(False)
        return queue.open_count

    benchmark.group = "queue: 1000 x (add, take) beside 10,000 open reads"
    assert benchmark(cycle) == OPEN


def test_waiters_leaving_from_the_middle_of_10000(benchmark, impl):
    queue_mod = load(impl, "_queue", "_queue_py")
    queue = queue_mod.Queue("t", QueueConfig(), None, clock=lambda: 1_000)
    for _ in range(OPEN):
        queue.add_waiter(queue_mod.Waiter())  # never served: nothing is added

    def cycle() -> int:
        leaving = [queue_mod.Waiter() for _ in range(TAKES)]
        for waiter in leaving:
            queue.add_waiter(waiter)
        for waiter in reversed(leaving):  # newest first: the far end of the line
            queue.remove_waiter(waiter)
        return queue.waiter_count

    benchmark.group = "queue: 1000 blocked gets leave a line of 10,000"
    assert benchmark(cycle) == OPEN


def test_reads_confirmed_in_order_beside_10000_open(benchmark, impl):
    queue_mod = load(impl, "_queue", "_queue_py")
    queue = queue_mod.Queue("t", QueueConfig(open_timeout=60_000), None, clock=lambda: 1_000)
    reads = deque()
    for _ in range(OPEN):
        queue.add(b"0123456789", 0, 0)
        reads.append(queue.open_read(queue.take(True).id))

    def cycle() -> int:
        for _ in range(TAKES):  # a worker pool: open one, confirm the oldest
            queue.add(b"0123456789", 0, 0)
            reads.append(queue.open_read(queue.take(True).id))
            queue.confirm(reads.popleft())
        return queue.open_count

    benchmark.group = "queue: 1000 x (add, take open, confirm the oldest) beside 10,000 open"
    assert benchmark(cycle) == OPEN
