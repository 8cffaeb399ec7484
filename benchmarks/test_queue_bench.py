"""Queue: a plain take beside 10,000 reads held open under ``open_timeout`` (every fetch
returns the reads past it first; the look stops at the first one that is not)."""

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
