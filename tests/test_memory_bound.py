"""What read-behind and the C heap cost in memory (both codecs).

The memory bar (1,000,000 queued 1 KiB items at max_memory_size = 64 MiB in <= 100 MiB RSS)
leaves a few MiB for the positions of the items kept only on disk: they must cost 4 bytes
each, and reading them back must stay the exact FIFO it was with 8-byte positions.
"""

from __future__ import annotations

import tracemalloc
from array import array
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_journal_support import use_codec

from erq import server
from erq.journal import RecoveredItem
from erq.journal.diskitems import DiskItems

from support import SERVES_ON_THEN_STOP, run_script, served_on

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

    def add(self, codec, id: int, nbytes: int) -> int:
        """Append an ADD record of ``nbytes`` of data; returns its offset."""
        offset = len(self.mm)
        self.mm += codec.encode_add(id, 0, 1000 + id, 0, bytes([id % 251 + 1]) * nbytes)
        return offset

    def drop_pages(self, start: int = 0, end: int | None = None) -> None:
        self.dropped.append((start, end))


def fill(codec, disk: DiskItems, segments: list[BufferSegment], sizes: list[int]) -> None:
    """Push items 1..len(sizes) with these data sizes, spread evenly over ``segments``."""
    per = -(-len(sizes) // len(segments))
    for i, nbytes in enumerate(sizes):
        segment = segments[i // per]
        disk.push(segment, segment.add(codec, i + 1, nbytes), nbytes)


def take_ids(disk: DiskItems, max_bytes: int) -> list[int]:
    return [it.id for it in disk.take(max_bytes, RecoveredItem)]


def test_positions_in_segments_up_to_4_gib_cost_4_bytes_each(codec):
    segment = BufferSegment("a", size=4 * GiB)
    n = 40_000
    offsets = [segment.add(codec, i, 10) for i in range(1, n + 1)]
    disk = DiskItems()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for offset in offsets:
            disk.push(segment, offset, 10)
        cost = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cost <= 4 * n * 1.08 + 4096  # the array's growth slack is 1/16
    assert [offs.itemsize for _, offs in disk.runs()] == [4]
    assert take_ids(disk, 10**9) == list(range(1, n + 1))


def test_a_segment_over_4_gib_keeps_8_byte_positions_and_reads_them_back(codec):
    small, big = BufferSegment("small"), BufferSegment("big", size=5 * GiB)
    disk = DiskItems()
    fill(codec, disk, [small, big], [100] * 40)
    assert [offs.itemsize for _, offs in disk.runs()] == [4, 8]
    assert take_ids(disk, 1000) == list(range(1, 11))
    assert take_ids(disk, 10**9) == list(range(11, 41))
    assert (disk.count, disk.nbytes) == (0, 0)


def test_take_reads_past_a_short_window_when_the_head_items_are_smaller(codec):
    # The mean item is large, the head ones are tiny: the first window is too short for
    # the budget, and take goes on with the next one instead of stopping there.
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [1] * 100 + [100_000] * 10)
    assert take_ids(disk, 100) == list(range(1, 101))
    assert take_ids(disk, 0) == [101]  # at least one, whatever the budget


def test_take_stops_at_the_budget_when_the_head_items_are_larger(codec):
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [5000] * 3 + [1] * 5000)
    assert take_ids(disk, 9999) == [1]
    assert take_ids(disk, 10_000) == [2, 3]
    assert take_ids(disk, 5000) == list(range(4, 5004))
    assert disk.count == 0


def test_take_with_first_max_reads_nothing_when_the_head_item_is_larger(codec):
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [5000, 10, 10])
    assert disk.take(10_000, RecoveredItem, -1, 4999) == []
    assert disk.count == 3
    assert [it.id for it in disk.take(10, RecoveredItem, -1, 5000)] == [1]  # it fits
    assert [it.id for it in disk.take(0, RecoveredItem, -1, 10)] == [2]  # then the budget


def test_zero_length_items_fit_an_exhausted_budget(codec):
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [10, 0, 0, 10, 0])
    assert take_ids(disk, 10) == [1, 2, 3]
    assert take_ids(disk, 10) == [4, 5]


def test_max_items_bounds_a_take_across_windows_and_segments(codec):
    # Zero-length items all fit any budget: only the count stops a take of them.
    segments = [BufferSegment("a"), BufferSegment("b")]
    disk = DiskItems()
    fill(codec, disk, segments, [0] * 6000 + [7] * 10)
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
)
def test_take_returns_the_fifo_prefix_that_fits_each_budget(
    codec, sizes, n_segments, wide, budgets
):
    segments = [
        BufferSegment(f"s{i}", size=5 * GiB if wide[i] else 1 << 20) for i in range(n_segments)
    ]
    disk = DiskItems()
    fill(codec, disk, segments, sizes)
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


def test_compaction_moves_the_unread_positions_to_4_byte_ones(codec):
    old = [BufferSegment("old1"), BufferSegment("old2")]
    disk = DiskItems()
    fill(codec, disk, old, [200] * 30)
    assert take_ids(disk, 2000) == list(range(1, 11))
    snapshot = BufferSegment("snapshot")
    # The snapshot holds every item the compaction saw, in order; ten were read since.
    moved = array("Q", (snapshot.add(codec, id, 200) for id in range(1, 31)))
    disk.replace_head(set(old), snapshot, moved)
    assert [offs.itemsize for _, offs in disk.runs()] == [4]
    assert [list(offs) for _, offs in disk.runs()] == [list(moved[10:])]
    assert take_ids(disk, 10**9) == list(range(11, 31))


def test_a_position_without_an_add_record_raises_after_taking_what_it_read(codec):
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [50] * 5)
    bad = disk.runs()[0][1][3]
    segment.mm[bad + 8] ^= 0xFF  # not an ADD any more (and its CRC fails)
    with pytest.raises(ValueError, match=f"offset {bad}$"):
        disk.take(10**9, RecoveredItem)
    assert (disk.count, disk.nbytes) == (2, 100)  # the three read are gone


def test_pages_read_back_are_dropped_behind_the_head(codec):
    segment = BufferSegment("a")
    disk = DiskItems()
    fill(codec, disk, [segment], [4096] * 600)
    offsets = list(disk.runs()[0][1])
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
    assert [(seg, offs.itemsize, len(offs)) for seg, offs in runs] == [(a, 4, 5), (b, 4, 5994)]
    assert a.dropped and len(b.dropped) >= 2  # every few thousand lengths read
    assert take_ids(disk, 10**9) == list(range(1, 6000))


def test_extend_keeps_8_byte_offsets_for_a_segment_over_4_gib(codec):
    big = BufferSegment("big", size=5 * GiB)
    disk = DiskItems()
    offsets = array("I", [big.add(codec, id, 100) for id in range(1, 11)])
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


@pytest.mark.skipif(not server.release_free_memory(), reason="not glibc: no malloc_trim")
def test_release_free_memory_hands_freed_heap_pages_back():
    def rss_anon_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        pytest.skip("no RssAnon in /proc/self/status")

    server.release_free_memory()
    # 32 MiB of 1 KiB blocks (too big for pymalloc: malloc's heap), every 64th kept, so
    # the freed ones lie below live blocks where free() cannot give the pages back.
    blocks = [bytes(1024) + bytes([i % 256]) for i in range(32 * 1024)]
    kept = blocks[::64]
    before = rss_anon_kib()
    del blocks
    freed = before - rss_anon_kib()
    server.release_free_memory()
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
