"""What read-behind and the C heap cost in memory (both codecs).

The memory bar (1,000,000 queued 1 KiB items at max_memory_size = 64 MiB in <= 100 MiB RSS)
leaves little for the positions of the items kept only on disk. Items whose records lie back
to back (a queue past its budget with no get in between) must cost nothing each: a span of
them is its first offset and its count. Items with other records between them must cost 4
bytes each. Either way reading them back must stay the exact FIFO it was with 8-byte
positions; the behaviour tests run on both layouts (``spaced``: a REMOVE record after each
ADD, as a get of an item in memory would write).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from array import array
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_journal_support import use_codec

from erq import heap
from erq.journal import RecoveredItem
from erq.journal.diskitems import _SPAN_MIN, DiskItems, Span
from erq.journal.format import OP_REMOVE

from conftest import ROOT
from support import SERVES_ON_THEN_STOP, run_script, served_on, status_kib

GiB = 1 << 30
HEADER = 32  # records start after the segment header, as in a real segment


@pytest.fixture
def codec(impl, monkeypatch):
    return use_codec(impl, monkeypatch)


class BufferSegment:
    """A segment stand-in: records in a bytearray, and any ``size`` (a real segment of more
    than 4 GiB is too big to create in a test; only ``size`` decides the position width)."""

    def __init__(self, name: str, size: int = 64 << 20) -> None:
        self.path = Path(name)
        self.size = size
        self.mm = bytearray(HEADER)
        self.dropped: list[tuple[int, int]] = []

    def add(self, codec, id: int, nbytes: int, spaced: bool = False) -> int:
        """Append an ADD record of ``nbytes`` of data (then, ``spaced``, a REMOVE of another
        id, so that the next ADD is not right after it); returns its offset."""
        offset = len(self.mm)
        self.mm += codec.encode_add(id, 0, 1000 + id, 0, bytes([id % 251 + 1]) * nbytes)
        if spaced:
            self.mm += codec.encode_op(OP_REMOVE, 10**9 + id)
        return offset

    def drop_pages(self, start: int = 0, end: int | None = None) -> None:
        self.dropped.append((start, end))


def fill(
    codec, disk: DiskItems, segments: list[BufferSegment], sizes: list[int], spaced=False
) -> None:
    """Push items 1..len(sizes) with these data sizes, spread evenly over ``segments``;
    ``spaced``: True for a record between each two, or every how many items one goes."""
    per = -(-len(sizes) // len(segments))
    every = 1 if spaced is True else int(spaced)
    for i, nbytes in enumerate(sizes):
        segment = segments[i // per]
        gap = bool(every) and (i + 1) % every == 0
        disk.push(segment, segment.add(codec, i + 1, nbytes, gap), nbytes)


def take_ids(disk: DiskItems, max_bytes: int) -> list[int]:
    return [it.id for it in disk.take(max_bytes, RecoveredItem)]


def every_offset(disk: DiskItems) -> list[int]:
    return [offset for _, offsets in disk.runs() for offset in offsets]


LAYOUTS = pytest.mark.parametrize("spaced", [False, True], ids=["back_to_back", "spaced"])


def push_cost(disk: DiskItems, segment: BufferSegment, offsets: list[int]) -> int:
    """Bytes the heap grew by while the items of 10 bytes at ``offsets`` were pushed."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for offset in offsets:
            disk.push(segment, offset, 10)
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_items_pushed_back_to_back_cost_no_memory_each(codec):
    segment = BufferSegment("a", size=4 * GiB)
    n = 40_000
    offsets = [segment.add(codec, i, 10) for i in range(1, n + 1)]
    disk = DiskItems()
    assert push_cost(disk, segment, offsets) <= 1024  # one span, whatever its length
    [(run_segment, span)] = disk.runs()
    assert run_segment is segment and isinstance(span, Span) and len(span) == n
    assert list(span) == offsets  # walked from the records' lengths
    assert take_ids(disk, 10**9) == list(range(1, n + 1))


def test_positions_in_segments_up_to_4_gib_cost_4_bytes_each(codec):
    segment = BufferSegment("a", size=4 * GiB)
    n = 40_000
    offsets = [segment.add(codec, i, 10, spaced=True) for i in range(1, n + 1)]
    disk = DiskItems()
    cost = push_cost(disk, segment, offsets)
    assert cost <= 4 * n * 1.08 + 4096  # the array's growth slack is 1/16
    # The first is a span until the second shows a record between them.
    assert [len(offs) for _, offs in disk.runs()] == [1, n - 1]
    assert disk.runs()[1][1].itemsize == 4
    assert take_ids(disk, 10**9) == list(range(1, n + 1))


def test_a_segment_over_4_gib_keeps_8_byte_positions_and_reads_them_back(codec):
    small, big = BufferSegment("small"), BufferSegment("big", size=5 * GiB)
    disk = DiskItems()
    fill(codec, disk, [small, big], [100] * 40, spaced=True)
    assert [getattr(offs, "itemsize", 0) for _, offs in disk.runs()] == [0, 4, 0, 8]
    assert take_ids(disk, 1000) == list(range(1, 11))
    assert take_ids(disk, 10**9) == list(range(11, 41))
    assert (disk.count, disk.nbytes) == (0, 0)


@LAYOUTS
def test_take_reads_past_a_short_window_when_the_head_items_are_smaller(codec, spaced):
    # The mean item is large, the head ones are tiny: the first window is too short for
    # the budget, and take goes on with the next one instead of stopping there.
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [1] * 100 + [100_000] * 10, spaced)
    assert take_ids(disk, 100) == list(range(1, 101))
    assert take_ids(disk, 0) == [101]  # at least one, whatever the budget


@LAYOUTS
def test_take_stops_at_the_budget_when_the_head_items_are_larger(codec, spaced):
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [5000] * 3 + [1] * 5000, spaced)
    assert take_ids(disk, 9999) == [1]
    assert take_ids(disk, 10_000) == [2, 3]
    assert take_ids(disk, 5000) == list(range(4, 5004))
    assert disk.count == 0


@LAYOUTS
def test_take_with_first_max_reads_nothing_when_the_head_item_is_larger(codec, spaced):
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [5000, 10, 10], spaced)
    assert disk.take(10_000, RecoveredItem, -1, 4999) == []
    assert disk.count == 3
    assert [it.id for it in disk.take(10, RecoveredItem, -1, 5000)] == [1]  # it fits
    assert [it.id for it in disk.take(0, RecoveredItem, -1, 10)] == [2]  # then the budget


@LAYOUTS
def test_zero_length_items_fit_an_exhausted_budget(codec, spaced):
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [10, 0, 0, 10, 0], spaced)
    assert take_ids(disk, 10) == [1, 2, 3]
    assert take_ids(disk, 10) == [4, 5]


@LAYOUTS
def test_max_items_bounds_a_take_across_windows_and_segments(codec, spaced):
    # Zero-length items all fit any budget: only the count stops a take of them.
    segments = [BufferSegment("a"), BufferSegment("b")]
    disk = DiskItems()
    fill(codec, disk, segments, [0] * 6000 + [7] * 10, spaced)
    taken = [it.id for it in disk.take(10**9, RecoveredItem, 5000)]
    assert taken == list(range(1, 5001))  # past a 4,096-offset window
    taken = [it.id for it in disk.take(10**9, RecoveredItem, 1005)]
    assert taken == list(range(5001, 6006))  # into the second segment
    assert [it.id for it in disk.take(0, RecoveredItem, 0)] == [6006]  # at least one
    assert [it.id for it in disk.take(14, RecoveredItem, 100)] == [6007, 6008]  # bytes first
    assert disk.count == 2


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=300),
    n_segments=st.integers(1, 4),
    wide=st.lists(st.booleans(), min_size=4, max_size=4),
    budgets=st.lists(st.integers(0, 40_000), min_size=1, max_size=40),
    spaced=st.sampled_from([0, 1, 2, 7, _SPAN_MIN + 3]),
)
def test_take_returns_the_fifo_prefix_that_fits_each_budget(
    codec, sizes, n_segments, wide, budgets, spaced
):
    segments = [
        BufferSegment(f"s{i}", size=5 * GiB if wide[i] else 1 << 20) for i in range(n_segments)
    ]
    disk = DiskItems()
    fill(codec, disk, segments, sizes, spaced)
    model = deque(enumerate(sizes, 1))
    for budget in budgets:
        expected, left = [], budget
        while model and (not expected or model[0][1] <= left):
            id, nbytes = model.popleft()
            expected.append(id)
            left -= nbytes
        assert take_ids(disk, budget) == expected
        assert (disk.count, disk.nbytes) == (len(model), sum(n for _, n in model))
    assert take_ids(disk, 10**9) == [id for id, _ in model]


@LAYOUTS
def test_compaction_moves_the_unread_positions_to_4_byte_ones(codec, spaced):
    old = [BufferSegment("old1"), BufferSegment("old2")]
    disk = DiskItems()
    fill(codec, disk, old, [200] * 30, spaced)
    assert take_ids(disk, 2000) == list(range(1, 11))
    snapshot = BufferSegment("snapshot")
    # The snapshot holds every item the compaction saw, in order; ten were read since.
    moved = array("Q", (snapshot.add(codec, id, 200) for id in range(1, 31)))
    disk.replace_head(set(old), snapshot, moved)
    assert [offs.itemsize for _, offs in disk.runs()] == [4]
    assert [list(offs) for _, offs in disk.runs()] == [list(moved[10:])]
    assert take_ids(disk, 10**9) == list(range(11, 31))


@LAYOUTS
def test_a_position_without_an_add_record_stops_the_read_there_and_then_raises(codec, spaced):
    """The items read before it are returned, not lost with the error; the next take meets it
    first and raises, taking nothing."""
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [50] * 5, spaced)
    bad = every_offset(disk)[3]
    segment.mm[bad + 8] ^= 0xFF  # not an ADD any more (and its CRC fails)
    assert len(disk.take(10**9, RecoveredItem)) == 3
    assert (disk.count, disk.nbytes) == (2, 100)
    with pytest.raises(ValueError, match=f"offset {bad}$"):
        disk.take(10**9, RecoveredItem)
    assert (disk.count, disk.nbytes) == (2, 100)


@LAYOUTS
def test_pages_read_back_are_dropped_behind_the_head(codec, spaced):
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [4096] * 600, spaced)
    offsets = every_offset(disk)
    while disk.count:
        disk.take(1 << 16, RecoveredItem)
    assert segment.dropped
    assert all(start == 0 and end in offsets for start, end in segment.dropped)


def test_extend_pushes_runs_with_their_data_bytes_and_reads_back_in_order(codec):
    a, b = BufferSegment("a"), BufferSegment("b")
    disk = DiskItems()
    offsets_a = [a.add(codec, id, 10 * id) for id in range(1, 6)]
    disk.push(a, offsets_a[0], 10)
    assert disk.extend(a, array("Q", offsets_a[1:])) == 20 + 30 + 40 + 50
    offsets_b = [b.add(codec, id, id) for id in range(6, 6000)]
    assert disk.extend(b, array("I", offsets_b)) == sum(range(6, 6000))
    assert disk.extend(b, array("I")) == 0
    assert (disk.count, disk.nbytes) == (5999, 150 + sum(range(6, 6000)))
    runs = disk.runs()
    # Back to back, each segment's records: one span each, the first one the pushed item's.
    assert [(seg, type(offs), len(offs)) for seg, offs in runs] == [(a, Span, 5), (b, Span, 5994)]
    assert a.dropped and len(b.dropped) >= 2  # every few thousand lengths read
    assert take_ids(disk, 10**9) == list(range(1, 6000))


def test_extend_makes_spans_of_the_windows_back_to_back_and_keeps_offsets_for_the_rest(codec):
    # A restart's backlog: 5,000 records back to back, 100 with others between, 5,000 more.
    segment = BufferSegment("a")
    disk = DiskItems()
    offsets = [segment.add(codec, id, 3) for id in range(1, 5001)]
    offsets += [segment.add(codec, id, 3, spaced=True) for id in range(5001, 5101)]
    offsets += [segment.add(codec, id, 3) for id in range(5101, 10101)]
    assert disk.extend(segment, array("Q", offsets)) == 3 * 10100
    shapes = [(getattr(offs, "itemsize", "span"), len(offs)) for _, offs in disk.runs()]
    assert shapes == [("span", 4096), (4, 4096), ("span", 1908)]  # a window at a time
    assert every_offset(disk) == offsets
    # The next set, right after the last record, grows the last span.
    disk.push(segment, segment.add(codec, 10101, 3), 3)
    assert len(disk.runs()[-1][1]) == 1909
    taken = []
    while disk.count:
        taken += take_ids(disk, 5000)
    assert taken == list(range(1, 10102))


def test_extend_keeps_8_byte_offsets_for_a_segment_over_4_gib(codec):
    big = BufferSegment("big", size=5 * GiB)
    disk = DiskItems()
    offsets = array("I", [big.add(codec, id, 100, spaced=True) for id in range(1, 11)])
    assert disk.extend(big, offsets) == 1000
    assert [offs.itemsize for _, offs in disk.runs()] == [8]
    assert take_ids(disk, 10**9) == list(range(1, 11))


def test_extend_at_an_offset_without_an_add_record_pushes_nothing(codec):
    segment = BufferSegment("a")
    disk = DiskItems()
    offset = segment.add(codec, 1, 100)
    for bad in (offset + 3, len(segment.mm) - 2, len(segment.mm) + 100):
        with pytest.raises(ValueError):
            disk.extend(segment, array("Q", [offset, bad]))
    assert (disk.count, disk.nbytes, disk.runs()) == (0, 0, [])


def rss_anon_kib(pid: int | str = "self") -> int:
    return status_kib(pid, "RssAnon")


@pytest.mark.skipif(not heap.release_free_memory(), reason="not glibc: no malloc_trim")
def test_release_free_memory_hands_freed_heap_pages_back():
    heap.release_free_memory()
    # 32 MiB of 1 KiB blocks (too big for pymalloc: malloc's heap), every 64th kept, so
    # the freed ones lie below live blocks where free() cannot give the pages back.
    blocks = [bytes(1024) + bytes([i % 256]) for i in range(32 * 1024)]
    kept = blocks[::64]
    before = rss_anon_kib()
    del blocks
    freed = before - rss_anon_kib()
    heap.release_free_memory()
    released = before - rss_anon_kib()
    assert len(kept) == 512
    assert released - freed >= 16 * 1024


RING_SCRIPT = (
    SERVES_ON_THEN_STOP
    + r"""
import asyncio, json, sys, tracemalloc
from erq.config import load_config
from erq.server import Server

async def main(data_dir):
    server = Server(load_config(None, cli={"port": 0, "admin_port": 0, "data_dir": data_dir}))
    await server.start()
    server._sweeper.cancel()
    queues = server.state.queues
    tracemalloc.start()  # before the ring grows: only blocks made while tracing are counted
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    n = 40_000
    for start in range(0, n, 10_000):
        writer.write(b"".join(b"set burst 0 0 1\r\nx\r\n" for _ in range(10_000)))
        await writer.drain()
        for _ in range(10_000):
            assert await reader.readline() == b"STORED\r\n"
    for start in range(0, n, 10_000):
        writer.write(b"get burst\r\n" * 10_000)
        await writer.drain()
        for _ in range(10_000):
            assert await reader.readline() == b"VALUE burst 0 1\r\n"
            await reader.readline()
            assert await reader.readline() == b"END\r\n"
    drained = tracemalloc.get_traced_memory()[0]
    queues.sweep()  # the periodic sweep, once
    swept = tracemalloc.get_traced_memory()[0]
    replies = await serves_on_then_stop(server, reader, writer)
    print(json.dumps({"freed": drained - swept, "replies": replies}))

asyncio.run(main(sys.argv[1]))
"""
)


def test_the_sweep_gives_back_the_ring_room_of_a_drained_burst(impl, tmp_path):
    """40,000 items grew the queue's ring to 65,536 slots (512 KiB of pointers); once they
    are taken the sweep moves the ring back to its initial size, and the queue goes on."""
    result = run_script(impl, RING_SCRIPT, str(tmp_path / "data"), timeout=120)
    assert result["freed"] >= (65_536 - 64) * 8, result
    assert served_on(result["replies"]), result


def test_records_back_to_back_leave_an_array_run_for_a_span_and_read_back_in_order(codec):
    segment = BufferSegment("a")
    disk = DiskItems()
    runs = [(range(1, 11), True), (range(11, 211), False), (range(211, 216), True)]
    for ids, spaced in runs:
        for id in ids:
            # The last of the back-to-back ones has a record after it, as the spaced ones do.
            gap = spaced or id == ids[-1]
            disk.push(segment, segment.add(codec, id, id % 7, gap), id % 7)
    shapes = [(type(offs).__name__, len(offs)) for _, offs in disk.runs()]
    # The first push starts a span; the second ends it. The 64th record pushed back to back
    # moves those records from the array to a span, which the rest of them extend.
    assert shapes == [("Span", 1), ("array", 9), ("Span", 200), ("array", 5)]
    assert _SPAN_MIN == 64
    taken = []
    while disk.count:
        taken += take_ids(disk, 37)  # budgets that end inside every kind of run
    assert taken == list(range(1, 216))
    assert disk.nbytes == 0


@pytest.mark.parametrize("damage", ["outside", "inside"])
def test_a_damaged_length_in_a_span_stops_its_read_at_that_record(codec, damage):
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [50] * 6)
    bad = every_offset(disk)[3]
    # Too long for the segment, or short enough to lead into the next record's middle.
    length = 1 << 30 if damage == "outside" else 20
    segment.mm[bad : bad + 4] = length.to_bytes(4, "little")
    assert len(disk.take(10**9, RecoveredItem)) == 3  # those before it, returned
    assert (disk.count, disk.nbytes) == (3, 150)
    with pytest.raises(ValueError, match=f"offset {bad}$"):
        disk.take(10**9, RecoveredItem)  # it stays at the head: nothing past it is skipped
    if damage == "outside":  # a compaction's walk refuses it too, rather than end short
        [(_, span)] = disk.runs()
        with pytest.raises(ValueError, match=f"no record at offset {bad}$"):
            list(span)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(
                st.just("push"),
                st.integers(0, 300),  # data bytes
                st.sampled_from([False, False, False, True]),  # a record after it
                st.sampled_from([False] * 30 + [True]),  # a new segment before it
                st.integers(1, 3 * _SPAN_MIN),  # how many such items
            ),
            st.tuples(st.just("take"), st.integers(0, 5000)),
        ),
        max_size=40,
    )
)
def test_pushes_and_takes_interleaved_keep_the_fifo_and_its_counts(codec, ops):
    """Sets and gets of a queue past its budget in any order: spans started, grown, read
    from while they grow, emptied and started again, arrays split into spans."""
    segments = [BufferSegment("s0")]
    disk = DiskItems()
    model: deque[tuple[int, int]] = deque()
    next_id = 1
    for op in ops:
        if op[0] == "push":
            _, nbytes, spaced, rotate, times = op
            if rotate:
                segments.append(BufferSegment(f"s{len(segments)}"))
            for _ in range(times):
                segment = segments[-1]
                disk.push(segment, segment.add(codec, next_id, nbytes, spaced), nbytes)
                model.append((next_id, nbytes))
                next_id += 1
        else:
            expected, left = [], op[1]
            while model and (not expected or model[0][1] <= left):
                id, nbytes = model.popleft()
                expected.append(id)
                left -= nbytes
            assert take_ids(disk, op[1]) == expected
        assert (disk.count, disk.nbytes) == (len(model), sum(n for _, n in model))
        assert sum(len(offsets) for _, offsets in disk.runs()) == len(model)
    assert every_offset(disk) == every_offset(disk)  # walking a span changes nothing
    assert take_ids(disk, 10**9) == [id for id, _ in model]


def test_one_arena_is_set_unless_the_operator_chose_with_malloc_arena_max(tmp_path):
    code = "from erq import heap; print(heap.one_arena())"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MALLOC_ARENA_MAX", None)
    chosen = dict(env, MALLOC_ARENA_MAX="4")
    said = [
        subprocess.run(
            [sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True
        ).stdout.strip()
        for e in (env, chosen)
    ]
    assert said == [str(heap.release_free_memory()), "False"]  # True on glibc


@pytest.mark.skipif(not heap.release_free_memory(), reason="not glibc: no malloc_trim")
def test_a_queue_drained_after_a_restart_gives_its_memory_back(erq_factory):
    """Recovery reads the queue's head into memory on a worker thread. Before one arena,
    that memory stayed in the worker's arena, free and resident, while the drain's refills
    took as much again from the main arena; and a drained queue's pages stayed resident
    below longer-lived blocks until the sweep trimmed the heap (``Server._trim_after_drain``,
    once the queues hold 32 MiB fewer than at their peak)."""
    proc = erq_factory('[queues.default]\nmax_memory_size = "40MiB"\n')
    n, value = 60_000, b"v" * 1024
    client = proc.client(timeout=30)
    for _batch in range(n // 1000):
        client.send(b"".join(b"set q 0 0 1024\r\n%s\r\n" % value for _ in range(1000)))
        for _ in range(1000):
            assert client.line() == b"STORED\r\n"
    client.close()
    proc.kill()
    proc.restart()
    full = rss_anon_kib(proc.proc.pid)  # ~40 MiB of items in memory, the rest on disk
    peak_at_start = status_kib(proc.proc.pid, "VmHWM")
    client = proc.client(timeout=30)
    for _batch in range(n // 1000):
        client.send(b"get q\r\n" * 1000)
        for _ in range(1000):
            assert client.line() == b"VALUE q 0 1024\r\n"
            assert client.read_exact(1026) == value + b"\r\n"
            assert client.line() == b"END\r\n"
    assert client.call(b"get q\r\n") == b"END\r\n"
    # The refills reused the memory recovery's items had (without one arena: ~20-26 MiB more).
    assert status_kib(proc.proc.pid, "VmHWM") - peak_at_start <= 8 * 1024
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the sweep runs once a second
        empty = rss_anon_kib(proc.proc.pid)
        if empty <= full - 24 * 1024:
            break
        time.sleep(0.2)
    assert empty <= full - 24 * 1024, (full, empty)
    assert client.set("q", b"after") == b"STORED\r\n"  # and it goes on


def test_a_restart_over_small_items_holds_what_the_server_that_queued_them_held(erq_factory):
    """Recovery makes the queue's own items from their records (the ring's ItemMaker). It
    made a tuple and three ints per item, which the queue turned into its item and freed:
    that memory stayed with the allocator between the items, and a restart over 1,000,000
    items of 10 bytes held 232 MiB once ready against 143 MiB for the server that queued
    them, with a peak of 252 MiB (now 141 and 157)."""
    proc = erq_factory()
    n = 200_000
    client = proc.client(timeout=30)
    for batch in range(n // 1000):
        client.send(
            b"".join(b"set q 0 0 10\r\n%010d\r\n" % (batch * 1000 + i) for i in range(1000))
        )
        for _ in range(1000):
            assert client.line() == b"STORED\r\n"
    client.close()
    filled = rss_anon_kib(proc.proc.pid)
    proc.kill()
    proc.restart()
    restarted = rss_anon_kib(proc.proc.pid)
    peak = status_kib(proc.proc.pid, "VmHWM") - status_kib(proc.proc.pid, "RssFile")
    print(f"anon after the fill {filled} KiB, after the restart {restarted} KiB, peak ~{peak}")
    assert restarted <= filled + 4 * 1024, (filled, restarted)
    assert peak <= filled + 14 * 1024, (filled, peak)  # it was 29 MiB above (~8 now)
    client = proc.client(timeout=30)
    assert client.get("q") == b"VALUE q 0 10\r\n0000000000\r\nEND\r\n"
    assert b"STAT queue_q_items %d\r\n" % (n - 1) in client.call(b"stats\r\n", b"END\r\n")


def test_paused_gc_turns_the_gc_off_and_back_to_what_it_was():
    import gc

    assert gc.isenabled()
    with pytest.raises(RuntimeError), heap.paused_gc():
        assert not gc.isenabled()
        raise RuntimeError("the work failed")
    assert gc.isenabled()  # back on, the work's exception passed through
    gc.disable()
    try:
        with heap.paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # it was off: it stays off
    finally:
        gc.enable()


def test_reads_left_open_on_deleted_queues_keep_no_data(erq_factory):
    """A read open when its queue is deleted stays in its connection's line of reads until a
    close uses it up (the close then confirms nothing, never a newer read), and so until the
    connection ends if no close comes. It held the item's data all that time: a long-lived
    connection that left reads open on queues deleted under it grew by their items."""
    proc = erq_factory()
    holder, admin = proc.client(timeout=30), proc.client(timeout=30)
    value = b"v" * (256 << 10)  # mapped blocks of its own: freed memory leaves the RSS at once
    before = rss_anon_kib(proc.proc.pid)
    for n in range(200):
        name = b"reply%d" % n
        assert admin.call(b"set %s 0 0 %d\r\n%s\r\n" % (name, len(value), value)) == b"STORED\r\n"
        assert holder.call(b"get %s/open\r\n" % name, b"END\r\n").startswith(b"VALUE")
        assert admin.call(b"delete %s\r\n" % name) == b"DELETED\r\n"
    grown = rss_anon_kib(proc.proc.pid) - before
    assert grown <= 16 * 1024, grown  # the 200 values take 50 MiB
    # The line rule still holds: the close is used up by the deleted queue's read, and does
    # not confirm the read of the queue made again under that name.
    assert admin.call(b"set reply0 0 0 3\r\nnew\r\n") == b"STORED\r\n"
    opened = holder.call(b"get reply0/open\r\n", b"END\r\n")
    assert opened == b"VALUE reply0/open 0 3\r\nnew\r\nEND\r\n"
    assert holder.call(b"get reply0/close\r\n", b"END\r\n") == b"END\r\n"
    holder.close()  # the new read is still open: it goes back
    admin.send(b"get reply0/t=5000\r\n")
    assert admin.until(b"END\r\n") == b"VALUE reply0/t=5000 0 3\r\nnew\r\nEND\r\n"


def test_reads_left_open_on_many_deleted_queues_cost_little_each(erq_factory):
    """Beyond their data, a connection's reads left open on queues deleted under it held, per
    name, the deleted Queue, the OpenRead and the Item: ~3 KB a name with small items, for as
    long as the connection lived. A line of reads all taken back is now kept as a count."""
    proc = erq_factory()
    holder, admin = proc.client(timeout=30), proc.client(timeout=30)

    def read_and_delete(first: int, count: int) -> None:
        for n in range(first, first + count):
            name = b"reply%d" % n
            assert admin.call(b"set %s 0 0 5\r\nvalue\r\n" % name) == b"STORED\r\n"
            assert holder.call(b"get %s/open\r\n" % name, b"END\r\n").startswith(b"VALUE")
            assert admin.call(b"delete %s\r\n" % name) == b"DELETED\r\n"

    read_and_delete(0, 500)  # warm up: the allocators' first arenas
    before = rss_anon_kib(proc.proc.pid)
    read_and_delete(500, 3_000)
    grown = rss_anon_kib(proc.proc.pid) - before
    assert grown <= 3 * 1024, grown  # 3,000 names held ~9 MB
    # Each close is still used up by the read taken back, here for the oldest name.
    assert admin.call(b"set reply0 0 0 3\r\nnew\r\n") == b"STORED\r\n"
    assert holder.call(b"get reply0/open\r\n", b"END\r\n").startswith(b"VALUE reply0/open")
    assert holder.call(b"get reply0/close\r\n", b"END\r\n") == b"END\r\n"
    assert holder.call(b"get reply0/close\r\n", b"END\r\n") == b"END\r\n"
    assert admin.call(b"get reply0\r\n", b"END\r\n") == b"END\r\n"  # confirmed
