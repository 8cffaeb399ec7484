"""Ring buffer: push, pop and push_front of 1000 items."""

from conftest import load


def _cycle(ring, items):
    push = ring.push
    pop = ring.pop
    front = ring.push_front
    for item in items:
        push(item)
    for _ in items:
        front(pop())
        pop()
    # refill to keep the state constant between rounds
    return len(ring)


def test_ring_push_pop_front(benchmark, impl):
    Ring = load(impl, "_ring", "_ring_py").Ring
    ring = Ring()
    items = list(range(1000))
    benchmark.group = "ring: 1000 x (push, pop, push_front, pop)"
    assert benchmark(_cycle, ring, items) == 0
