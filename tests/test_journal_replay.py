"""Journal append/replay round trips, open reads at restart, ids, read-behind (both codecs)."""

from __future__ import annotations

import importlib
import random

import pytest
from test_journal_support import (
    KiB,
    MiniQueue,
    Model,
    all_items,
    item,
    random_step,
    segment_files,
    use_codec,
    write_ops,
)

from erq.journal import QueueJournal, RecoveredItem, Recovery
from erq.journal.format import OP_ADD, OP_CONFIRM, OP_FLUSH, OP_OPEN, OP_REMOVE, OP_UNREMOVE

from support import status_kib


@pytest.fixture
def codec(impl, monkeypatch):
    return use_codec(impl, monkeypatch)


@pytest.fixture
def reopen(codec, tmp_path):
    """Open the queue directory again (closing the previous journal first)."""
    opened: list[QueueJournal] = []

    def _reopen(**kw) -> tuple[QueueJournal, Recovery]:
        for j in opened:
            j.close()
        opened.clear()
        kw.setdefault("fsync", "never")
        journal, recovery = QueueJournal.open(tmp_path / "q", **kw)
        opened.append(journal)
        return journal, recovery

    yield _reopen
    for j in opened:
        j.close()


def test_fresh_journal_is_empty_and_creates_its_directory(reopen, tmp_path):
    journal, rec = reopen()
    assert (tmp_path / "q").is_dir()
    assert rec == Recovery(items=[], disk_items=0, disk_bytes=0, next_id=1, warnings=[])
    assert journal.logsize == 0  # the first segment is made at the first write


def test_every_opcode_round_trips(reopen):
    journal, _ = reopen()
    model = Model()
    items = [item(i) for i in range(1, 9)]
    ops = [(OP_ADD, it) for it in items] + [
        (OP_REMOVE, 1),
        (OP_OPEN, 2),
        (OP_CONFIRM, 2),
        (OP_OPEN, 3),
        (OP_UNREMOVE, 3),
        (OP_OPEN, 4),
        (OP_FLUSH, None),
        (OP_ADD, item(9, size=0)),
        (OP_ADD, item(10, size=3000, flags=2**32 - 1)),
    ]
    write_ops(journal, model, ops)
    journal, rec = reopen()
    assert rec.items == model.expected()
    assert [it.id for it in rec.items] == [4, 9, 10]
    assert rec.next_id == 11 and rec.warnings == []


def test_items_keep_flags_times_and_binary_data(reopen):
    journal, _ = reopen()
    data = bytes(range(256)) + b"\r\n\x00"
    journal.add(7, 0xFFFFFFFF, 2**63 - 1, 2**63 - 1, data)  # the largest a queue holds
    journal.add(8, 0, 0, 0, b"")
    _, rec = reopen()
    assert rec.items == [
        RecoveredItem(7, 0xFFFFFFFF, 2**63 - 1, 2**63 - 1, data),
        RecoveredItem(8, 0, 0, 0, b""),
    ]


def test_open_reads_return_to_the_head_in_original_order(reopen):
    journal, _ = reopen()
    model = Model()
    write_ops(journal, model, [(OP_ADD, item(i)) for i in range(1, 7)])
    # open 1, 2, 3; abort 2 (back at the head); open it again: OPEN order is 1, 3, 2
    write_ops(
        journal, model, [(OP_OPEN, 1), (OP_OPEN, 2), (OP_OPEN, 3), (OP_UNREMOVE, 2), (OP_OPEN, 2)]
    )
    _, rec = reopen()
    assert [it.id for it in rec.items] == [1, 3, 2, 4, 5, 6]


def test_order_survives_a_second_crash_after_new_opens(reopen):
    journal, _ = reopen()
    model = Model()
    write_ops(journal, model, [(OP_ADD, item(i)) for i in range(1, 7)])
    write_ops(journal, model, [(OP_OPEN, 1), (OP_OPEN, 2)])
    journal, rec = reopen()
    model.restarted()
    assert rec.items == model.expected()  # [1, 2, 3, 4, 5, 6]
    # after the restart 1 and 2 are plain queued items at the head; 3 is opened behind them
    write_ops(journal, model, [(OP_OPEN, 1), (OP_CONFIRM, 1), (OP_REMOVE, 2), (OP_OPEN, 3)])
    write_ops(journal, model, [(OP_OPEN, 4), (OP_UNREMOVE, 4)])
    _, rec = reopen()
    assert [it.id for it in rec.items] == [3, 4, 5, 6]
    assert rec.items == model.expected()


def test_flush_drops_queued_items_but_not_open_reads(reopen):
    journal, _ = reopen()
    model = Model()
    write_ops(journal, model, [(OP_ADD, item(i)) for i in range(1, 5)])
    write_ops(journal, model, [(OP_OPEN, 1), (OP_FLUSH, None), (OP_ADD, item(5))])
    _, rec = reopen()
    assert [it.id for it in rec.items] == [1, 5]


def test_flush_drops_the_not_in_memory_items(reopen):
    journal, _ = reopen(max_memory_size=50)
    for i in range(1, 11):
        journal.add(i, 0, 0, 0, b"x" * 20, in_memory=i <= 2)
    assert journal.disk_items == 8
    journal.flush()
    assert journal.disk_items == 0 and journal.disk_bytes == 0 and journal.read_behind(100) == []
    journal.add(11, 0, 0, 0, b"y")
    _, rec = reopen()
    assert [it.id for it in rec.items] == [11] and rec.disk_items == 0


def test_unknown_ids_are_ignored(reopen):
    journal, _ = reopen()
    journal.add(1, 0, 0, 0, b"a")
    for op in (journal.remove, journal.open, journal.confirm, journal.unremove):
        op(99)
    _, rec = reopen()
    assert [it.id for it in rec.items] == [1]
    assert rec.next_id == 100  # every id seen counts


def test_ids_stay_monotonic_across_restarts_and_compactions(reopen):
    journal, rec = reopen(segment_size=16 * KiB)
    next_id = rec.next_id
    for _ in range(3):
        ids = range(next_id, next_id + 100)
        for i in ids:
            journal.add(i, 0, 0, 0, b"z" * 200)
        for i in ids:
            journal.remove(i)
        assert journal.wants_compaction
        journal.compact([], [])
        journal, rec = reopen(segment_size=16 * KiB)
        assert rec.items == [] and rec.next_id == ids[-1] + 1
        next_id = rec.next_id


def test_recovery_holds_at_most_max_memory_size_and_leaves_the_rest_on_disk(reopen):
    journal, _ = reopen()
    for i in range(1, 201):
        journal.add(i, 0, 0, 0, bytes([i % 250 + 1]) * 100)
    journal, rec = reopen(max_memory_size=1000)
    assert [it.id for it in rec.items] == list(range(1, 11))
    assert (rec.disk_items, rec.disk_bytes) == (190, 19000)
    assert (journal.disk_items, journal.disk_bytes) == (190, 19000)
    back = journal.read_behind(450)
    assert [it.id for it in back] == [11, 12, 13, 14]  # as many as fit in 450 bytes
    assert journal.read_behind(1)[0].id == 15  # at least one
    rest = journal.read_behind(10**9)
    assert [it.id for it in rest] == list(range(16, 201)) and journal.disk_bytes == 0


def test_read_behind_as_plain_tuples_gives_the_same_fields(reopen):
    """The queue's refill asks for plain tuples (unpacked in C by the compiled queue)."""
    journal, _ = reopen()
    for i in range(1, 41):
        journal.add(i, i % 3, 1000 + i, 2000 + i, bytes([i]) * i)
    journal, rec = reopen(max_memory_size=100)
    plain = journal.read_behind(200, 5, -1, tuple)
    assert [type(it) for it in plain] == [tuple] * len(plain) and plain
    named = journal.read_behind(10**9)
    assert [it.id for it in named] == list(range(plain[-1][0] + 1, 41))
    first = len(rec.items) + 1
    assert plain == [
        (i, i % 3, 1000 + i, 2000 + i, bytes([i]) * i) for i in range(first, first + len(plain))
    ]


def test_recovery_charges_the_per_item_overhead_against_max_memory_size(reopen):
    journal, _ = reopen()
    for i in range(1, 201):
        journal.add(i, 0, 0, 0, bytes([i % 250 + 1]) * 100)
    # 100 bytes of data + 150 of overhead per item: 4 items fit in 1000 bytes, not 10.
    journal, rec = reopen(max_memory_size=1000, item_overhead=150)
    assert [it.id for it in rec.items] == [1, 2, 3, 4]
    assert (rec.disk_items, rec.disk_bytes) == (196, 19600)
    assert [it.id for it in journal.read_behind(10**9)] == list(range(5, 201))


@pytest.mark.parametrize("seed", range(6))
def test_recovery_loads_exactly_the_items_that_fit_whatever_their_sizes(reopen, seed):
    """The load reads the head from DiskItems a step at a time, each step's count from the
    mean size: however the sizes vary, it ends where the first item that does not fit is,
    as one item at a time would (open reads at the crash first)."""
    rng = random.Random(seed)
    journal, _ = reopen(segment_size=16 * KiB)
    model = Model()
    sizes = [rng.choice((0, 1, 7, 90, 600, 2500)) for _ in range(400)]
    write_ops(journal, model, [(OP_ADD, item(i, size)) for i, size in enumerate(sizes, 1)])
    write_ops(journal, model, [(OP_OPEN, i) for i in rng.sample(range(1, 401), 5)])
    model.restarted()
    overhead = rng.choice((0, 40, 128))
    budget = rng.randrange(0, sum(len(it.data) + overhead for it in model.queued))
    fit, used = 0, 0
    for it in model.queued:
        if used + len(it.data) + overhead > budget:
            break
        used += len(it.data) + overhead
        fit += 1
    journal, rec = reopen(segment_size=16 * KiB, max_memory_size=budget, item_overhead=overhead)
    assert [it.id for it in rec.items] == [it.id for it in model.queued[:fit]]
    assert rec.disk_items == len(model.queued) - fit
    assert rec.disk_bytes == sum(len(it.data) for it in model.queued[fit:])
    assert all_items(journal, rec) == model.queued


def test_recovery_makes_the_items_of_its_item_cls(reopen, impl):
    """The server has recovery make its ring's items (the ring's ItemMaker) rather than
    tuples the queue would turn into items and free; the fields and order are the same."""
    ring = importlib.import_module("erq._fast._ring" if impl == "c" else "erq._ring_py")
    journal, _ = reopen(segment_size=8 * KiB)
    model = Model()
    write_ops(journal, model, [(OP_ADD, item(i, size=300)) for i in range(1, 61)])
    write_ops(journal, model, [(OP_OPEN, 40), (OP_OPEN, 2), (OP_OPEN, 9), (OP_UNREMOVE, 9)])
    model.restarted()
    journal, tuples = reopen(segment_size=8 * KiB, max_memory_size=9000)
    journal, made = reopen(segment_size=8 * KiB, max_memory_size=9000, item_cls=ring.ITEM_MAKER)
    assert {type(it) for it in made.items} == {ring.Item} and len(made.items) == 30
    fields = [(it.id, it.flags, it.add_time, it.expiry, it.data) for it in made.items]
    assert fields == [tuple(it) for it in tuples.items] == model.queued[:30]
    assert (made.disk_items, made.disk_bytes) == (tuples.disk_items, tuples.disk_bytes)
    assert all_items(journal, tuples)[30:] == model.queued[30:]


def test_read_behind_in_a_non_contiguous_disk_order(reopen):
    journal, _ = reopen(segment_size=8 * KiB)
    model = Model()
    write_ops(journal, model, [(OP_ADD, item(i, size=300)) for i in range(1, 61)])
    # opens and aborts spread over several segments shuffle the queue order
    for i in (50, 3, 31, 17):
        write_ops(journal, model, [(OP_OPEN, i)])
    write_ops(journal, model, [(OP_UNREMOVE, 31), (OP_UNREMOVE, 3)])
    assert len(segment_files(journal.directory)) > 2
    journal, rec = reopen(max_memory_size=0, segment_size=8 * KiB)
    assert rec.items == [] and rec.disk_items == 60
    assert all_items(journal, rec) == model.expected()


def test_read_behind_crossing_the_memory_boundary_keeps_strict_fifo(reopen):
    rng = random.Random(5)
    journal, rec = reopen(segment_size=16 * KiB, max_memory_size=2000)
    q = MiniQueue(journal, 2000, rec)
    added, taken = [], []
    next_id = 1
    compactions = 0
    for step in range(3000):
        if rng.random() < 0.52:
            it = item(next_id, size=rng.randrange(1, 400))
            next_id += 1
            q.add(it)
            added.append(it.id)
        else:
            got = q.take()
            if got is not None:
                taken.append(got.id)
        q.maybe_compact()
        if step % 500 == 499:  # restart now and then, mid-stream
            compactions += journal.rewrites
            journal, rec = reopen(segment_size=16 * KiB, max_memory_size=2000)
            q = MiniQueue(journal, 2000, rec)
            assert rec.next_id == next_id
    while (got := q.take()) is not None:
        taken.append(got.id)
    assert taken == added
    assert compactions + journal.rewrites > 0


def test_reliable_reads_through_read_behind_survive_restarts(reopen):
    rng = random.Random(11)
    journal, rec = reopen(segment_size=16 * KiB, max_memory_size=1500)
    q = MiniQueue(journal, 1500, rec)
    model = Model()
    next_id = 1
    for step in range(2000):
        # no plain takes (take == add): adds, reliable reads, confirms and aborts only
        next_id = random_step(
            q, model, rng, next_id, add=0.5, take=0.5, reliable=0.75, confirm=0.9, max_size=300
        )
        q.maybe_compact()
        if step % 400 == 399:
            journal, rec = reopen(segment_size=16 * KiB, max_memory_size=1500)
            q = MiniQueue(journal, 1500, rec)
            model.restarted()
            assert [it.id for it in rec.items] == [
                it.id for it in model.expected()[: len(rec.items)]
            ]
    journal, rec = reopen(segment_size=16 * KiB, max_memory_size=1500)
    model.restarted()
    assert all_items(journal, rec) == model.expected()


def test_a_big_item_gets_a_segment_of_its_own_size(reopen):
    journal, _ = reopen(segment_size=64 * KiB)
    big = bytes(range(256)) * 1024  # 256 KiB, larger than a segment
    journal.add(1, 0, 0, 0, b"small")
    journal.add(2, 0, 0, 0, big)
    journal.add(3, 0, 0, 0, b"after")
    _, rec = reopen(segment_size=64 * KiB)
    assert [it.data for it in rec.items] == [b"small", big, b"after"]


def test_segments_grow_from_small_to_segment_size(reopen):
    journal, _ = reopen(segment_size=1 << 20)
    sizes = []
    i = 0
    while len(sizes) < 7:
        i += 1
        journal.add(i, 0, 0, 0, b"q" * 4000)
        files = segment_files(journal.directory)
        sizes = [f.stat().st_size for f in files]
    assert sizes == [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 1 << 20, 1 << 20]


def test_always_without_group_commit_syncs_inline(reopen, monkeypatch):
    import os

    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    journal, _ = reopen(fsync="always")
    assert journal.add(1, 0, 0, 0, b"a") is None
    assert journal.remove(1) is None
    assert len(calls) == 2


def test_update_policy_switches_fsync_mode(reopen, monkeypatch):
    import os

    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    journal, _ = reopen(fsync="never")
    journal.add(1, 0, 0, 0, b"a")
    assert calls == []
    journal.update_policy(fsync="always", max_memory_size=10, max_journal_size=1 << 20)
    assert len(calls) == 1  # pending writes synced under the new policy
    journal.add(2, 0, 0, 0, b"b")
    assert len(calls) == 2
    with pytest.raises(ValueError):
        journal.update_policy(fsync="sometimes")


def test_closed_journal_refuses_writes(reopen):
    from erq.journal import JournalError

    journal, _ = reopen()
    journal.add(1, 0, 0, 0, b"a")
    journal.close()
    with pytest.raises(JournalError):
        journal.add(2, 0, 0, 0, b"b")


def test_delete_removes_the_directory(reopen, tmp_path):
    journal, _ = reopen()
    journal.add(1, 0, 0, 0, b"a")
    journal.delete()
    assert not (tmp_path / "q").exists()


def rss_file() -> int:
    """Bytes of file-backed pages mapped in this process (where mmap'd segments show up)."""
    return status_kib("self", "RssFile") * 1024


def test_journal_pages_do_not_stay_resident(reopen):
    limit = 8 << 20
    journal, _ = reopen(segment_size=64 << 20)
    before = rss_file()
    data = b"r" * 1000
    for i in range(1, 50_001):  # 50 MB through the mapping, mostly read-behind
        journal.add(i, 0, 0, 0, data, in_memory=i <= 1000)
    assert rss_file() - before < limit
    journal, rec = reopen(segment_size=64 << 20, max_memory_size=1_000_000)
    assert rss_file() - before < limit
    assert len(rec.items) == 1000 and rec.disk_items == 49_000
    back = rec.items
    while journal.disk_items > 25_000:
        back += journal.read_behind(1 << 20)
    assert rss_file() - before < limit
    journal.compact([], back[-100:], wait=True)  # the rest of the disk part is copied
    assert journal.rewrites == 1 and rss_file() - before < limit
    assert [it.id for it in back] == list(range(1, len(back) + 1))


def test_a_new_queue_directory_and_new_segments_are_made_durable(codec, tmp_path, monkeypatch):
    from erq.journal import journal as journal_module

    synced = []
    real = journal_module.fsync_directory
    monkeypatch.setattr(journal_module, "fsync_directory", lambda d: (synced.append(d), real(d)))
    journal, _ = QueueJournal.open(tmp_path / "data" / "q", fsync="always", segment_size=4096)
    journal.add(1, 0, 0, 0, b"x")  # first segment: the queue directory, and its entry in data/
    assert sorted(synced) == [tmp_path / "data", tmp_path / "data" / "q"]
    journal.add(2, 0, 0, 0, b"y")
    assert len(synced) == 2  # nothing new to make durable
    journal.add(3, 0, 0, 0, b"z" * 4000)  # a new segment
    assert synced[2:] == [tmp_path / "data" / "q"]
    journal.close()


class StopAfter:
    """A stop event that reads as set from its ``n``-th look on."""

    def __init__(self, n: int) -> None:
        self.n, self.looks = n, 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.n


def test_a_stop_asked_during_the_replay_of_one_queue_ends_it_at_the_next_window(
    codec, tmp_path, monkeypatch
):
    """A server told to stop during start-up recovery stops at the next window of records,
    not after the whole queue (an audit: 28 s for one queue of 4M items, pure build, past a
    supervisor's stop timeout). What it mapped is unmapped; the next start replays it all."""
    from erq.journal import recovery as recovery_module
    from erq.journal_api import RecoveryStopped

    monkeypatch.setattr(recovery_module, "_DROP_BYTES", 64 * 1024)
    journal, _ = QueueJournal.open(tmp_path / "q", fsync="never", segment_size=1 << 20)
    for i in range(1, 3001):
        journal.add(i, 0, 0, 0, b"r" * 1000)  # 3 MB: segments of 64 KiB to 1 MiB
    journal.close()
    stop = StopAfter(4)
    with pytest.raises(RecoveryStopped):
        QueueJournal.open(tmp_path / "q", fsync="never", stop=stop)
    assert stop.looks == 4  # it looked between windows, and stopped at the first yes
    journal, rec = QueueJournal.open(tmp_path / "q", fsync="never", max_memory_size=1 << 30)
    assert len(rec.items) == 3000
    journal.close()


def test_a_stop_asked_while_small_items_are_loaded_ends_the_load(codec, tmp_path, monkeypatch):
    """Loading a queue's items into memory looks at the stop every _LOAD_STOP_CHECK items, not
    only every 4 MiB of their data: 10-byte items took ~400,000 items between two looks, and a
    stop signal waited seconds for the pure-Python build (an audit: up to 7 s)."""
    from erq.journal import recovery as recovery_module
    from erq.journal_api import RecoveryStopped

    monkeypatch.setattr(recovery_module, "_LOAD_STOP_CHECK", 1000)
    journal, _ = QueueJournal.open(tmp_path / "q", fsync="never", segment_size=4 << 20)
    for i in range(1, 20_001):
        journal.add(i, 0, 0, 0, b"0123456789")  # one segment, one window of records
    journal.close()
    stop = StopAfter(3)  # the segment's look, then the load's after 1,000 and 2,000 items
    with pytest.raises(RecoveryStopped):
        QueueJournal.open(tmp_path / "q", fsync="never", stop=stop, max_memory_size=1 << 30)
    assert stop.looks == 3
    journal, rec = QueueJournal.open(tmp_path / "q", fsync="never", max_memory_size=1 << 30)
    assert [item.id for item in rec.items] == list(range(1, 20_001))
    journal.close()
