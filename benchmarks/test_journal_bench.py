"""Journal codec: record encode, the append of one ADD record into a mapped segment (copied
in, or for a large one written with pwritev() on the segment's file), and the per-request
journal path (QueueJournal.add + remove) as the server runs it."""

import asyncio
import mmap

import pytest

import erq.journal.codec as selector
from erq.journal import GroupCommit, QueueJournal
from erq.journal.segment import Segment

from conftest import load

DATA = b"0123456789"


def test_encode_add(benchmark, impl):
    codec = load(impl, "_records", "journal._records_py")
    benchmark.group = "journal: encode one 10-byte ADD record"
    record = benchmark(codec.encode_add, 17, 0, 1_700_000_000_000, 0, DATA)
    assert len(record) > len(DATA)


def test_encode_add_64k(benchmark, impl):
    """A 64 KiB item's ADD record: a copy and a CRC32C over the whole value."""
    codec = load(impl, "_records", "journal._records_py")
    data = bytes(range(256)) * 256
    benchmark.group = "journal: encode one 64 KiB ADD record"
    record = benchmark(codec.encode_add, 17, 0, 1_700_000_000_000, 0, data)
    assert len(record) > len(data)


def test_append_add_into_mmap(benchmark, impl):
    codec = load(impl, "_append", "journal._append_py")
    size = 64 << 20
    region = mmap.mmap(-1, size)
    state = {"writer": codec.SegmentWriter(region, 32), "id": 0}

    def append_1000():
        writer = state["writer"]
        if writer.remaining < 1 << 20:
            writer.release()
            writer = state["writer"] = codec.SegmentWriter(region, 32)
        append = writer.append_add
        base = state["id"]
        for i in range(base, base + 1000):
            append(i, 0, 1_700_000_000_000, 0, DATA)
        state["id"] = base + 1000

    benchmark.group = "journal: append 1000 10-byte ADD records into an mmap"
    benchmark(append_1000)
    state["writer"].release()
    assert state["id"] >= 1000


@pytest.mark.parametrize("path", ["pwrite", "copy"])
def test_append_64k_adds_into_a_new_segment(benchmark, impl, path, tmp_path):
    """What a 64 KiB set costs the journal: every page it fills is one it never touched (a
    preallocated segment), as in the server. "copy": stores into the mapping (a page fault
    per page); "pwrite": the writer has the segment's fd, so the record goes by pwritev()."""
    codec = load(impl, "_append", "journal._append_py")
    data = bytes(range(256)) * 256
    size = 32 << 20
    state = {"segment": None, "writer": None, "seq": 0, "id": 0}

    def new_segment():
        if state["writer"] is not None:
            state["writer"].release()
            state["segment"].close()
            state["segment"].path.unlink()
        state["seq"] += 1
        segment = state["segment"] = Segment.create(tmp_path, state["seq"], size)
        fd = segment.fileno() if path == "pwrite" else -1
        state["writer"] = codec.SegmentWriter(segment.mm, 32, True, fd)

    def append_100():
        if state["writer"] is None or state["writer"].remaining < 100 * (len(data) + 64):
            new_segment()
        append = state["writer"].append_add
        base = state["id"]
        for i in range(base, base + 100):
            append(i, 0, 1_700_000_000_000, 0, data)
        state["id"] = base + 100

    benchmark.group = "journal: append 100 64 KiB ADD records into a new segment"
    benchmark(append_100)
    state["writer"].release()
    state["segment"].close()
    assert state["id"] >= 100 and len(data) >= codec.PWRITE_THRESHOLD


def journal_on(impl: str, monkeypatch) -> type[QueueJournal]:
    """QueueJournal with ``impl``'s codec and AppendCore (QueueJournal's own base is the
    selector's pick at import, so the other build gets the same class body over its core)."""
    codec = selector.implementation(impl == "c")
    for name in selector.__all__:
        monkeypatch.setattr(selector, name, getattr(codec, name))
    core, *mixins = QueueJournal.__bases__
    if core is codec.AppendCore:
        return QueueJournal
    body = {k: v for k, v in vars(QueueJournal).items() if k not in ("__dict__", "__weakref__")}
    return type(QueueJournal)(QueueJournal.__name__, (codec.AppendCore, *mixins), body)


def test_queue_journal_add_remove(benchmark, impl, tmp_path, monkeypatch):
    """One set + one get of a 10-byte item, journal side, with the default fsync period: the
    timer is armed after the first append, so the rest take the quiet path."""
    loop = asyncio.new_event_loop()  # never run: the fsync timer stays armed, never fires
    commit = GroupCommit(loop)
    journal, _ = journal_on(impl, monkeypatch).open(tmp_path / "q", fsync=100, commit=commit)
    state = {"id": 1, "rotations": 0}

    def add_remove_1000():
        add, remove = journal.add, journal.remove
        base = state["id"]
        for i in range(base, base + 1000):
            add(i, 0, 1_700_000_000_000, 0, DATA)
            remove(i)
        state["id"] = base + 1000
        if journal.rotations != state["rotations"]:  # drained: drop the full segments
            state["rotations"] = journal.rotations
            journal.compact([], [])

    benchmark.group = "journal: 1000 x (QueueJournal.add + remove), 10 B, fsync period"
    benchmark(add_remove_1000)
    assert journal._quiet and journal.live_items == 0
    journal.close()
    commit.close()
    loop.close()
