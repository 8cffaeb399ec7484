"""The server's ``max_memory_size`` bounds the items held in memory over all queues (both builds).

Each queue's own ``max_memory_size`` bounds its items alone, so ``max_queues`` queues could
hold that many times it (4,096 x 128 MiB by default). The queues of a server share one
``ItemMemory``: an item enters a ring only while the total has room, and past it stays in the
journal and is read back as the head drains, as past its queue's own limit.
"""

from __future__ import annotations

import random
import signal

import pytest

from erq.config import QueueConfig
from erq.journal import QueueJournal
from erq.ring import ITEM_OVERHEAD

from conftest import impl_module

SIZE = 100  # data bytes per item in the unit tests
COST = SIZE + ITEM_OVERHEAD  # what one such item costs in memory


def value(tag: str, i: int) -> bytes:
    return (b"%s-%d-" % (tag.encode(), i)).ljust(SIZE, b".")


def mem_cost(queue) -> int:
    return queue.mem_bytes + ITEM_OVERHEAD * queue.mem_items


@pytest.fixture
def queue_mod(impl):
    return impl_module(impl, "_queue", "_queue_py")


@pytest.fixture
def make_queue(queue_mod, tmp_path):
    """Queues over journals in ``tmp_path``, sharing the ItemMemory passed; closed at the end."""
    made = []

    def make(name: str, memory, own_limit: int = 1 << 30, journal: bool = True):
        journal_obj = None
        if journal:
            journal_obj, _ = QueueJournal.open(
                tmp_path / name, fsync="never", segment_size=256 * 1024, max_memory_size=own_limit
            )
        queue = queue_mod.Queue(
            name,
            QueueConfig(max_memory_size=own_limit, fsync="never", journal=journal),
            journal_obj,
            clock=lambda: 1_000,
            memory=memory,
        )
        made.append(queue)
        return queue

    yield make
    for queue in made:
        if not queue.deleted:
            queue.close()


def drain(queue) -> list[bytes]:
    out = []
    while (item := queue.take(False)) is not None:
        out.append(item.data)
    return out


def test_items_past_the_shared_limit_stay_on_disk_and_come_back_in_order(queue_mod, make_queue):
    memory = queue_mod.ItemMemory(10 * COST)
    first, second = make_queue("first", memory), make_queue("second", memory)
    added = {q: [value(q.name, i) for i in range(20)] for q in (first, second)}
    for queue in (first, second):
        for data in added[queue]:
            queue.add(data, 0, 0)
    assert first.mem_items == 10 and first.items == 20  # its own limit is far away
    assert second.mem_items == 0 and second.items == 20  # the server's is reached
    assert memory.used == mem_cost(first) + mem_cost(second) == 10 * COST
    # The second queue's head is read back whatever the limit, one item at a time here.
    assert drain(second) == added[second]
    assert memory.used == mem_cost(first) <= memory.limit
    assert drain(first) == added[first]
    assert memory.used == 0


def test_heads_on_disk_past_the_limit_are_read_back_for_a_fetch_only(queue_mod, make_queue):
    """Past the server's limit, every queue that had been read from, or swept, held its head
    in memory: the take read the next one back at once, and the sweep read one to look at
    its expiry (20 queues of 8 MiB items and a 16 MiB limit: 160 MiB). Now only a fetch
    reads a head back past the limit; the sweep looks only within it, and an expired head
    on disk goes when a fetch comes."""
    memory = queue_mod.ItemMemory(2 * COST)
    queues = [make_queue(f"q{i}", memory) for i in range(5)]
    for queue in queues:
        for i in range(3):
            queue.add(value(queue.name, i), 0, 0)
    assert memory.used == 2 * COST  # the first queue's first two
    for queue in queues:
        queue.discard_expired(2_000, 100, True)  # the sweep's look
    assert memory.used == 2 * COST
    for queue in queues[1:]:
        assert queue.take(False).data == value(queue.name, 0)  # read back for the fetch
        assert memory.used == 2 * COST and queue.mem_items == 0  # and not the next
    assert [drain(queue) for queue in queues[1:]] == [
        [value(queue.name, i) for i in (1, 2)] for queue in queues[1:]
    ]
    expiring = make_queue("expiring", memory)
    expiring.add(value("expiring", 0), 0, 1_500)  # expires at 1.5 s; the clock says 1 s
    assert expiring.mem_items == 0
    assert expiring.discard_expired(2_000, 100, True) == 0  # no room to look
    assert expiring.items == 1
    assert expiring.discard_expired(2_000, 100) == 1  # a fetch's look reads it back


def test_memory_one_queue_gives_back_is_read_back_by_another(queue_mod, make_queue):
    step = queue_mod.REFILL_STEP
    memory = queue_mod.ItemMemory(4 * step)
    first, second = make_queue("first", memory), make_queue("second", memory)
    n = 4 * step // COST
    for i in range(n):
        first.add(value("first", i), 0, 0)
    for i in range(n):
        second.add(value("second", i), 0, 0)
    assert second.mem_items == 0
    assert drain(first)  # all its memory back to the server
    assert second.take(False).data == value("second", 0)
    # A take reads a step's worth back once the room is there, not one item at a time.
    assert second.mem_items > 1
    assert memory.used == mem_cost(second) <= memory.limit


def test_a_queue_without_a_journal_keeps_its_items_and_counts_them(queue_mod, make_queue):
    memory = queue_mod.ItemMemory(5 * COST)
    memory_only = make_queue("volatile", memory, journal=False)
    for i in range(8):
        memory_only.add(value("v", i), 0, 0)
    assert memory_only.mem_items == 8  # nowhere else to keep them
    assert memory.used == 8 * COST
    journaled = make_queue("kept", memory)
    journaled.add(value("k", 0), 0, 0)
    assert journaled.mem_items == 0 and journaled.items == 1  # the total is past the limit
    assert drain(memory_only) == [value("v", i) for i in range(8)]
    assert memory.used == 0


def test_every_change_to_a_ring_is_charged_to_the_shared_memory(queue_mod, make_queue):
    """Random adds, takes, reliable reads (confirmed, aborted), flushes, expiries, a lowered
    own limit (spill) and deletes: the shared total is always the sum of what the rings cost,
    and an add never takes it past the limit."""
    rng = random.Random(20261201)
    memory = queue_mod.ItemMemory(40 * COST)
    now = [1_000]
    queues = [make_queue(f"q{i}", memory, own_limit=25 * COST) for i in range(3)]
    open_reads = {id(q): [] for q in queues}
    expected = {id(q): [] for q in queues}  # what each queue holds, in order (not open)

    for step in range(3_000):
        queue = rng.choice(queues)
        key = id(queue)
        op = rng.random()
        before = memory.used
        if op < 0.45:
            data = value(queue.name, step)
            expiry = now[0] + 5 if rng.random() < 0.05 else 0
            queue.add(data, 0, expiry, now[0])
            expected[key].append((data, expiry))
            if memory.used > before:
                assert memory.used <= memory.limit, step
        elif op < 0.65:
            item = queue.take(False, now[0])
            live = [d for d, e in expected[key] if not e or e > now[0]]
            assert (item.data if item else None) == (live[0] if live else None), step
            expected[key] = [(d, e) for d, e in expected[key] if not e or e > now[0]]
            if item is not None:
                expected[key].pop(0)
        elif op < 0.75:
            item = queue.take(True, now[0])
            expected[key] = [(d, e) for d, e in expected[key] if not e or e > now[0]]
            if item is not None:
                expected[key].pop(0)
                open_reads[key].append((queue.open_read(item.id), item.data))
        elif op < 0.82 and open_reads[key]:
            read, data = open_reads[key].pop(0)
            if rng.random() < 0.5:
                queue.confirm(read)
            else:
                queue.unremove(read)  # back at the head
                expected[key].insert(0, (data, 0))
        elif op < 0.86:
            now[0] += 10  # items with an expiry are past it
            queue.discard_expired(now[0])
            expected[key] = [(d, e) for d, e in expected[key] if not e or e > now[0]]
        elif op < 0.88:
            queue.flush()
            expected[key] = []
        elif op < 0.90:
            limit = rng.choice([3, 10, 25]) * COST
            queue.configure(QueueConfig(max_memory_size=limit, fsync="never"))  # spills
        assert memory.used == sum(mem_cost(q) for q in queues), (step, op)
    for queue in queues:
        queue.delete()
    assert memory.used == 0


def test_the_server_keeps_to_it_over_a_socket_and_after_a_sigkill(erq_factory):
    limit = 1 << 20
    server = erq_factory(f'[server]\nmax_memory_size = "{limit}B"\n')
    client = server.client()
    data = {q: [bytes([65 + i % 26]) * 65536 for i in range(40)] for q in ("jobs", "mail")}
    for queue, values in data.items():
        client.send(
            b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (queue.encode(), len(v), v) for v in values)
        )
        for _ in values:
            assert client.line() == b"STORED\r\n"
    stats = client.stats()
    assert int(stats["limit_maxbytes"]) == limit
    assert 0 < int(stats["item_memory"]) <= limit
    assert int(stats["queue_jobs_items"]) == int(stats["queue_mail_items"]) == 40
    assert int(stats["queue_jobs_mem_items"]) + int(stats["queue_mail_mem_items"]) < 20
    client.close()

    server.stop(signal.SIGKILL)
    server.start()
    client = server.client()
    stats = client.stats()
    assert 0 < int(stats["item_memory"]) <= limit  # the replay kept to it too
    assert int(stats["queue_jobs_items"]) == int(stats["queue_mail_items"]) == 40
    for i in range(40):
        for queue, values in data.items():
            reply = client.get(queue)
            assert reply == b"VALUE %s 0 65536\r\n%s\r\nEND\r\n" % (queue.encode(), values[i])
    assert client.stats()["item_memory"] == "0"
    client.close()


def test_a_reload_to_a_lower_limit_keeps_new_items_on_disk(erq_factory):
    server = erq_factory('[server]\nmax_memory_size = "4MiB"\n')
    client = server.client()
    values = [b"%05d" % i * 13107 for i in range(26)]  # 65,535 bytes each
    for v in values[:16]:
        assert client.set("jobs", v) == b"STORED\r\n"
    assert client.stats()["queue_jobs_mem_items"] == "16"
    server.write_config('[server]\nmax_memory_size = "256KiB"\n')
    assert client.call(b"reload\r\n") == b"Reloaded config.\r\n"
    assert client.stats()["limit_maxbytes"] == str(256 * 1024)
    for v in values[16:]:
        assert client.set("jobs", v) == b"STORED\r\n"
    stats = client.stats()
    assert stats["queue_jobs_mem_items"] == "16" and stats["queue_jobs_items"] == "26"
    for v in values:
        assert client.get("jobs") == b"VALUE jobs 0 %d\r\n%s\r\nEND\r\n" % (len(v), v)
    client.close()
