"""Head release: a long queue gives back the segments its head has passed (both builds).

``QueueJournal.release_head`` deletes the oldest sealed segments that hold no live item's
ADD; ``Queue`` keeps the lower bound of its live ids that it needs (``lowest_live_id``).
Every prefix of the deleted segments must replay to the same queue, and the bound must
never exceed a live id, whatever order aborts and read-backs leave the ring in.
"""

from __future__ import annotations

import copy
import random
import shutil
import threading
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_journal_support import (
    KiB,
    MiniQueue,
    Model,
    all_items,
    item,
    segment_files,
    use_codec,
)

from erq.config import QueueConfig
from erq.journal import QueueJournal, compaction
from erq.journal.format import OP_ADD, OP_CONFIRM, OP_OPEN, OP_REMOVE, OP_UNREMOVE

from conftest import impl_module

SEGMENT = 16 * KiB


@pytest.fixture
def codec(impl, monkeypatch):
    return use_codec(impl, monkeypatch)


def open_journal(directory, **kw):
    kw.setdefault("fsync", "never")
    kw.setdefault("segment_size", SEGMENT)
    kw.setdefault("max_memory_size", 4000)
    return QueueJournal.open(directory, **kw)


def lowest(q: MiniQueue) -> int | None:
    """The exact lowest id of the items queued in RAM or open."""
    ids = [it.id for it in q.ring] + list(q.open)
    return min(ids) if ids else None


def recovered(directory, expected_model: Model) -> None:
    """A copy of ``directory`` replays to the model's state after a restart."""
    model = copy.deepcopy(expected_model)
    model.restarted()
    journal, rec = open_journal(directory)
    try:
        assert rec.warnings == []
        assert all_items(journal, rec) == model.expected()
    finally:
        journal.close()


def fill(q: MiniQueue, model: Model, ids: range, size: int = 300) -> None:
    for i in ids:
        it = item(i, size)
        q.add(it)
        model.apply(OP_ADD, it)


def take(q: MiniQueue, model: Model, reliable: bool = False):
    got = q.take(reliable)
    model.apply(OP_OPEN if reliable else OP_REMOVE, id=got.id)
    return got


def test_a_draining_long_queue_gives_back_the_segments_its_head_passed(codec, tmp_path):
    journal, _ = open_journal(tmp_path / "q")
    q, model = MiniQueue(journal, 4000), Model()
    fill(q, model, range(1, 801))  # ~270 KiB: most of it only on disk (read-behind)
    assert q.disk > 700
    first = journal.segment_count
    assert first >= 10
    counts = []
    for _ in range(790):
        take(q, model)
        journal.release_head(lowest(q))
        counts.append(journal.segment_count)
    # Released as the head passes them, many times along the way (the REMOVE records fill
    # new segments meanwhile), not in one go at the end.
    assert sum(b < a for a, b in pairwise(counts)) >= 5 and max(counts) <= first + 1
    assert journal.segment_count <= 2
    assert journal.released == journal.rotations + 1 - journal.segment_count  # all the rest
    assert journal.rewrites == 0  # no snapshot was written: the segments were deleted
    assert len(segment_files(tmp_path / "q")) == journal.segment_count
    journal.close()
    recovered(tmp_path / "q", model)


def test_every_prefix_of_a_release_replays_to_the_same_queue(codec, tmp_path):
    # release_head deletes oldest first: a crash between two unlinks leaves a prefix gone.
    journal, _ = open_journal(tmp_path / "q")
    q, model = MiniQueue(journal, 4000), Model()
    fill(q, model, range(1, 301))
    for _ in range(200):
        take(q, model)
    take(q, model, reliable=True)
    journal.sync()
    shutil.copytree(tmp_path / "q", tmp_path / "before")
    files = segment_files(tmp_path / "before")
    released = journal.release_head(lowest(q))
    assert released >= 3
    assert [p.name for p in segment_files(tmp_path / "q")] == [p.name for p in files[released:]]
    journal.close()
    for k in range(released + 1):
        crashed = tmp_path / f"crash{k}"
        crashed.mkdir()
        for path in files[k:]:
            shutil.copy(path, crashed / path.name)
        recovered(crashed, model)


def test_an_open_read_keeps_its_segment_until_it_is_confirmed(codec, tmp_path):
    journal, _ = open_journal(tmp_path / "q")
    q, model = MiniQueue(journal, 100_000), Model()
    fill(q, model, range(1, 201))
    held = take(q, model, reliable=True)
    for _ in range(150):
        take(q, model)
    before = journal.segment_count
    assert journal.release_head(lowest(q)) == 0 and journal.segment_count == before
    q.confirm(held.id)
    model.apply(OP_CONFIRM, id=held.id)
    assert journal.release_head(lowest(q)) > 0
    journal.close()
    recovered(tmp_path / "q", model)


def test_an_aborted_read_back_at_the_head_keeps_its_segment(codec, tmp_path):
    journal, _ = open_journal(tmp_path / "q")
    q, model = MiniQueue(journal, 100_000), Model()
    fill(q, model, range(1, 201))
    first = take(q, model, reliable=True)
    for _ in range(150):
        take(q, model)
    q.abort(first.id)
    model.apply(OP_UNREMOVE, id=first.id)
    assert journal.release_head(lowest(q)) == 0
    take(q, model)  # the aborted item again, now gone for good
    assert journal.release_head(lowest(q)) > 0
    journal.close()
    recovered(tmp_path / "q", model)


def test_items_kept_only_on_disk_keep_their_segments(codec, tmp_path):
    journal, _ = open_journal(tmp_path / "q", max_memory_size=1000)
    q, model = MiniQueue(journal, 1000), Model()
    fill(q, model, range(1, 101))
    while q.ring:  # drain what is in RAM; the rest is on disk, unread
        take(q, model)
    assert q.disk
    # No item in RAM or open: only the on-disk positions say what is live.
    assert journal.release_head(None) == 0
    journal.close()
    recovered(tmp_path / "q", model)


def test_nothing_is_released_while_a_snapshot_is_written(codec, tmp_path, monkeypatch):
    journal, _ = open_journal(tmp_path / "q")
    q, model = MiniQueue(journal, 100_000), Model()
    fill(q, model, range(1, 201))
    for _ in range(100):
        take(q, model)
    gate = threading.Event()
    write = compaction.SnapshotJob._write

    def held(self, *args, **kw):
        gate.wait(10)
        return write(self, *args, **kw)

    monkeypatch.setattr(compaction.SnapshotJob, "_write", held)
    journal.compact(list(q.open.values()), list(q.ring))
    before = journal.segment_count
    assert journal.release_head(lowest(q)) == 0 and journal.segment_count == before
    gate.set()
    journal.wait_compaction()
    journal.close()
    recovered(tmp_path / "q", model)


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_with_releases_and_restarts_recovers_the_queue(codec, tmp_path, seed):
    rng = random.Random(seed)
    directory = tmp_path / "q"
    journal, _ = open_journal(directory)
    q, model = MiniQueue(journal, 4000), Model()
    next_id = 1
    released = 0
    for step in range(3000):
        r = rng.random()
        backlog = 400 if (step // 500) % 2 == 0 else 0  # fill, then drain, and again
        if r < 0.5 and len(model.queued) < backlog:
            it = item(next_id, rng.randrange(1, 400))
            next_id += 1
            q.add(it)
            model.apply(OP_ADD, it)
        elif r < 0.8:
            got = q.take()
            if got is not None:
                model.apply(OP_REMOVE, id=got.id)
        elif r < 0.9:
            got = q.take(reliable=True)
            if got is not None:
                model.apply(OP_OPEN, id=got.id)
        elif q.open:
            oldest = next(iter(q.open))
            if r < 0.96:
                q.confirm(oldest)
                model.apply(OP_CONFIRM, id=oldest)
            else:
                q.abort(oldest)
                model.apply(OP_UNREMOVE, id=oldest)
        released += journal.release_head(lowest(q))
        if step % 600 == 599:
            journal.close()
            recovered(directory, model)
            model.restarted()
            journal, rec = open_journal(directory)
            q = MiniQueue(journal, 4000, rec)
    assert released > 10
    journal.close()
    recovered(directory, model)


# ---- the queue's bound, both builds ---------------------------------------------------------


class QueueUnderTest:
    """A real Queue (compiled or pure) over a journal, beside a model list of ids."""

    def __init__(self, impl: str, directory, memory: int) -> None:
        self.queue_mod = impl_module(impl, "_queue", "_queue_py")
        self.directory = directory
        self.config = QueueConfig(max_memory_size=memory, fsync="never")
        self.queue = self._open()
        self.queued: list[int] = []  # ids in queue order
        self.open: dict[int, object] = {}  # id -> OpenRead, in open order

    def _open(self):
        journal, rec = QueueJournal.open(
            self.directory,
            fsync="never",
            segment_size=4 * KiB,
            max_memory_size=self.config.max_memory_size,
        )
        queue = self.queue_mod.Queue("q", self.config, journal, clock=lambda: 1_000)
        queue.restore(rec.items, rec.disk_items, rec.disk_bytes, rec.next_id)
        return queue

    def restart(self) -> None:
        self.queue.close()
        self.queue = self._open()
        self.queued[:0] = list(self.open)
        self.open.clear()

    def check(self) -> None:
        live = self.queued[: self.queue.mem_items] + list(self.open)  # RAM holds the head
        bound = self.queue.lowest_live_id()
        if live:
            assert 0 < bound <= min(live)
        else:
            assert bound == -1

    def drain(self) -> list[int]:
        out = []
        while (it := self.queue.take(False)) is not None:
            out.append(it.id)
        return out


def test_aborts_out_of_id_order_lower_the_bound_until_their_items_are_taken(impl, tmp_path):
    t = QueueUnderTest(impl, tmp_path / "q", memory=100_000)
    q = t.queue
    for _ in range(4):
        q.add(b"x" * 10, 0, 0)
    first, second = q.take(True), q.take(True)
    assert q.lowest_live_id() == first.id
    q.unremove(q.open_read(first.id))
    q.unremove(q.open_read(second.id))  # the ring is [2, 1, 3, 4] now
    assert q.lowest_live_id() == first.id
    assert q.take(False).id == second.id
    assert q.lowest_live_id() == first.id
    assert q.take(False).id == first.id
    assert q.lowest_live_id() == first.id + 2  # ascending again: its head is the lowest
    q.flush()
    assert q.lowest_live_id() == -1


def test_a_restart_from_a_snapshot_in_queue_order_keeps_the_bound_below_every_id(impl, tmp_path):
    # A snapshot stores the ring in queue order, aborted reads first; replayed, those come
    # back older than the items before them, in the middle of the restored ring.
    t = QueueUnderTest(impl, tmp_path / "q", memory=100_000)
    q = t.queue
    for _ in range(40):
        q.add(b"g" * 300, 0, 0)
    one, two, three = (q.take(True) for _ in range(3))
    for _ in range(32):
        q.take(False)  # history: 4 to 35
    q.unremove(q.open_read(one.id))
    q.unremove(q.open_read(three.id))  # queued: 3, 1, 36 .. 40; open: 2
    assert q.journal.wants_compaction
    q.maybe_compact()
    q.journal.wait_compaction()
    assert q.journal.rewrites == 1
    q.close()
    q = t._open()  # replays [2, 3, 1, 36 .. 40]
    assert q.lowest_live_id() == 1
    assert q.take(False).id == two.id
    assert q.lowest_live_id() == 1  # 3 is at the head, 1 behind it
    assert q.take(False).id == three.id
    assert q.lowest_live_id() == 1
    assert q.take(False).id == one.id
    assert q.lowest_live_id() == 36


# Adds and hand-outs weigh more: aborts of several open reads are what disorder the ring.
OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["add"] * 3
            + ["take", "open", "open", "confirm", "abort", "abort", "compact", "restart"]
        ),
        st.integers(0, 3),
        st.integers(1, 300),
    ),
    min_size=20,
    max_size=150,
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_the_queue_never_bounds_its_live_ids_too_high_and_releases_keep_it_whole(
    impl, tmp_path_factory, ops
):
    t = QueueUnderTest(impl, tmp_path_factory.mktemp("q") / "q", memory=2000)
    for op, which, size in ops:
        q = t.queue
        if op == "add":
            result, _ = q.add(bytes([65 + size % 26]) * size, 0, 0)
            t.queued.append(q.next_id - 1)
        elif op == "take" and t.queued:
            assert q.take(False).id == t.queued.pop(0)
        elif op == "open" and t.queued:
            got = q.take(True)
            assert got.id == t.queued.pop(0)
            t.open[got.id] = q.open_read(got.id)
        elif op in ("confirm", "abort") and t.open:
            key = list(t.open)[which % len(t.open)]
            read = t.open.pop(key)
            if op == "confirm":
                assert q.confirm(read)
            else:
                assert q.unremove(read)
                t.queued.insert(0, key)
        elif op == "compact":
            q.maybe_compact()
        elif op == "restart":
            t.restart()
        t.check()
    t.queue.maybe_compact()
    t.restart()
    assert t.drain() == t.queued
