"""Recovery's replay state for the queued ids (``ReplayTail``) on both codecs, and replays whose
ADD ids are not monotonic (compaction snapshots), read in windows, at a few bytes per item."""

from __future__ import annotations

import copy
import random
import tracemalloc
from array import array
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_journal_support import KiB, MiniQueue, Model, all_items, codec_module, item, use_codec

import erq.journal.codec as codec_selector
from erq.journal import QueueJournal, recovery
from erq.journal.format import OP_ADD, OP_OPEN, OP_REMOVE, OP_UNREMOVE


@pytest.fixture
def codec(impl):
    return codec_module(impl)


@pytest.fixture(scope="module")
def both():
    return codec_module("py"), codec_module("c")


def filled(codec, ids, base: int = 1000):
    """A tail holding ``ids`` in that order, the i-th at position ``base + i``."""
    tail = codec.ReplayTail()
    for i, id in enumerate(ids):
        tail.add(id, base + i)
    return tail


# ---- ReplayTail ------------------------------------------------------------------------------
def test_removing_the_oldest_goes_in_fifo_order_and_the_last_removal_starts_afresh(codec):
    tail = filled(codec, range(1, 101))
    assert len(tail) == 100 and tail.slots == 100
    for id in range(1, 101):
        assert tail.pop(id) == 999 + id
        assert len(tail) == 100 - id and id not in tail
    assert list(tail) == [] and tail.slots == 0


def test_removal_from_the_middle_leaves_the_rest_in_add_order(codec):
    tail = filled(codec, range(1, 11))
    assert (tail.pop(5), tail.pop(2), tail.pop(10)) == (1004, 1001, 1009)
    assert list(tail) == [1, 3, 4, 6, 7, 8, 9]
    assert list(tail.items()) == [(id, 999 + id) for id in (1, 3, 4, 6, 7, 8, 9)]
    assert tail.slots == 10  # tombstones stay until a compaction
    for missing in (5, 2, 11, 0, -1, 2**64, "4", None):
        assert missing not in tail and tail.pop(missing) is None
    assert 4 in tail and len(tail) == 7
    # The oldest goes, then the next live one: the cursor steps over the tombstone of 2.
    assert tail.pop(1) == 1000 and tail.pop(3) == 1002
    assert list(tail) == [4, 6, 7, 8, 9]


def test_ids_out_of_order_are_found_by_bisection_in_their_runs(codec):
    # A snapshot's queue order: unremoved reads first (newest first), then the tail.
    ids = [900, 850, 700, *range(3, 200)]
    tail = filled(codec, ids)
    gone = [850, 100, 900, 3, 199, 700, 4]
    for id in gone:
        assert id in tail
        assert tail.pop(id) == 1000 + ids.index(id)
        assert id not in tail
    assert list(tail) == [id for id in ids if id not in gone]
    assert not tail.indexed
    assert all(id not in tail for id in (901, 860, 701, 2, 1, 200))


def test_past_run_limit_runs_ids_are_looked_up_in_an_index(codec):
    limit = codec.ReplayTail.RUN_LIMIT
    ids = list(range(limit, 0, -1))  # every id starts a run
    tail = filled(codec, ids)
    assert not tail.indexed
    tail.add(0, 5)  # one run more
    assert tail.indexed
    assert tail.pop(limit // 2) == 1000 + ids.index(limit // 2)
    assert tail.pop(limit) == 1000 and tail.pop(0) == 5
    assert list(tail) == [id for id in ids if id not in (limit // 2, limit)]
    assert all(id in tail for id in range(1, limit) if id != limit // 2)


def test_runs_already_removed_do_not_count_against_the_limit(codec):
    limit = codec.ReplayTail.RUN_LIMIT
    tail = filled(codec, range(limit + 10, 10, -1))
    assert tail.pop(limit + 10) == 1000 and tail.pop(limit + 9) == 1001  # the two oldest
    tail.add(5, 7)
    assert not tail.indexed
    tail.add(4, 8)
    tail.add(3, 9)
    assert tail.indexed
    assert list(tail)[-3:] == [5, 4, 3] and tail.pop(4) == 8


def test_a_live_id_is_not_added_twice_but_a_removed_one_comes_back_last(codec):
    tail = filled(codec, [1, 2, 3])
    with pytest.raises(ValueError):
        tail.add(2, 50)
    assert tail.pop(2) == 1001
    tail.add(2, 77)
    assert list(tail.items()) == [(1, 1000), (3, 1002), (2, 77)]
    tail.add(4, 78)
    assert tail.pop(2) == 77 and 2 not in tail
    tail.add(2, 79)
    assert list(tail.items()) == [(1, 1000), (3, 1002), (4, 78), (2, 79)]


def test_add_rejects_what_an_unsigned_64_bit_int_cannot_hold(codec):
    tail = codec.ReplayTail()
    with pytest.raises(OverflowError):
        tail.add(-1, 0)
    with pytest.raises(OverflowError):
        tail.add(1, 2**64)
    with pytest.raises(TypeError):
        tail.add(1.5, 0)
    assert len(tail) == 0 and tail.slots == 0
    tail.add(2**64 - 1, 2**64 - 2)
    tail.add(0, 2**64 - 1)  # an id past the greatest is not the next of an id run
    tail.add(1, 0)
    assert list(tail.items()) == [(2**64 - 1, 2**64 - 2), (0, 2**64 - 1), (1, 0)]
    assert tail.pop(0) == 2**64 - 1 and tail.pop(2**64 - 1) == 2**64 - 2
    assert list(tail.items()) == [(1, 0)]


def test_clear_drops_every_entry_and_the_tail_is_usable_again(codec):
    tail = filled(codec, [5, 3, 9, 1])
    tail.pop(3)
    tail.clear()
    assert len(tail) == 0 and tail.slots == 0 and list(tail) == [] and 5 not in tail
    tail.add(5, 1)
    tail.add(2, 2)
    assert list(tail.items()) == [(5, 1), (2, 2)] and not tail.indexed


def test_take_offsets_hands_over_the_live_positions_in_add_order_a_group_at_a_time(codec):
    tail = filled(codec, [10, 20, 30, 40, 50, 60])
    tail.pop(10)
    tail.pop(40)
    ((group, offsets),) = tail.take_offsets(40)
    assert group == 0 and isinstance(offsets, array) and offsets.itemsize == 4
    assert list(offsets) == [1001, 1002, 1004, 1005]
    assert len(tail) == 0 and tail.slots == 0 and tail.nbytes == 0 and 20 not in tail
    offsets.append(7)  # the caller owns it: no view of it is left behind
    tail.add(20, 3)
    assert list(tail.items()) == [(20, 3)]
    assert codec.ReplayTail().take_offsets(40) == []
    for shift in (31, 65):
        with pytest.raises(ValueError):
            codec.ReplayTail().take_offsets(shift)


def test_take_offsets_cuts_where_the_group_changes_and_widens_offsets_past_32_bits(codec):
    g = 1 << 40  # recovery's positions: segment << 40 | offset
    positions = [
        3 * g + 40,
        3 * g + 90,
        5 * g + 32,
        5 * g + (5 << 32) + 7,
        5 * g + (6 << 32),
        6 * g,
    ]
    positions += [6 * g + 100 + i for i in range(10)]
    tail = codec.ReplayTail()
    for id, position in enumerate(positions, 1):
        tail.add(id, position)
    tail.pop(2)
    pieces = tail.take_offsets(40)
    assert [group for group, _ in pieces] == [3, 5, 6]
    assert [offsets.itemsize for _, offsets in pieces] == [4, 8, 4]
    assert [list(offsets) for _, offsets in pieces] == [
        [40],
        [32, (5 << 32) + 7, 6 << 32],
        [0, *range(100, 110)],
    ]
    # Positions out of order (not recovery's): a group met again is a piece again.
    tail = codec.ReplayTail()
    for id, position in enumerate([g + 1, 2 * g + 2, g + 3, g + 4], 1):
        tail.add(id, position)
    pieces = tail.take_offsets(40)
    assert [(group, list(offsets)) for group, offsets in pieces] == [
        (1, [1]),
        (2, [2]),
        (1, [3, 4]),
    ]
    tail = filled(codec, [7, 8], 2**64 - 2)  # shift 64: one group, whole positions
    assert [(group, list(offsets)) for group, offsets in tail.take_offsets(64)] == [
        (0, [2**64 - 2, 2**64 - 1])
    ]


def test_adds_compact_the_tombstones_once_they_outnumber_the_live_entries(codec):
    m = codec.ReplayTail.COMPACT_MIN
    tail = filled(codec, range(1, 2 * m + 1))
    for id in range(2, 2 * m + 1, 2):  # every other one: m tombstones among m live
        tail.pop(id)
    tail.add(10**6, 1)
    assert tail.slots == 2 * m + 1  # as many tombstones as live entries: not yet
    tail.pop(1)  # now m + 1 tombstones, m live
    tail.add(10**6 + 1, 2)
    assert tail.slots == len(tail) == m + 1
    odd = list(range(3, 2 * m, 2))
    assert list(tail) == [*odd, 10**6, 10**6 + 1]
    # Lookups after the move: the oldest, the middle, the newest.
    assert tail.pop(3) == 1002 and tail.pop(m + 1) == 1000 + m and tail.pop(10**6 + 1) == 2
    assert not tail.indexed


def test_compaction_leaves_the_index_once_the_runs_fit_again(codec):
    m, runs = codec.ReplayTail.COMPACT_MIN, codec.ReplayTail.RUN_LIMIT + 1
    ids = [*range(10 * runs, 0, -10), *range(10**6, 10**6 + 2 * m)]  # the last run goes on
    tail = filled(codec, ids)
    assert tail.indexed
    for id in ids[: runs + m]:  # the decreasing head and m of the increasing rest
        tail.pop(id)
    tail.add(10**7, 1)  # the add compacts: one run left
    assert not tail.indexed and tail.slots == len(tail) == m + 1
    assert list(tail) == [*ids[runs + m :], 10**7]
    assert tail.pop(10**6 + m + 5) == 1000 + ids.index(10**6 + m + 5)


def test_a_queue_that_drains_and_refills_keeps_its_arrays_bounded(codec):
    rng = random.Random(5)
    tail = codec.ReplayTail()
    expected: deque[int] = deque()
    next_id = 1
    for turn in range(40):
        for _ in range(rng.randrange(200, 3000)):
            tail.add(next_id, next_id * 8)
            expected.append(next_id)
            next_id += 1
            assert tail.slots <= 2 * len(tail) + tail.COMPACT_MIN
        drain = len(expected) if turn % 7 == 6 else rng.randrange(len(expected))
        for _ in range(drain):
            id = expected.popleft()
            assert tail.pop(id) == id * 8
    assert list(tail) == list(expected)
    assert next_id > 20 * tail.slots


def test_entries_cost_about_4_bytes_each_plus_growth_slack(codec):
    """Ids in runs that go up by one, positions in one segment: 4 bytes and a bit an entry.
    With two 64-bit arrays (16 bytes an entry), a restart over 30,000,000 items of 10 bytes
    peaked at 494 MiB, against 143 MiB for the server that queued them (now 163 MiB)."""
    n = 200_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tail = filled(codec, range(1, n + 1))
        cost = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(tail) == n and tail.nbytes == 4 * n + n // 8 + 32
    assert cost <= 4.2 * n * 1.1 + 4096  # a dict of Python ints costs about 110 bytes each
    # Every other entry removed: compacted, each one left starts an id run of its own.
    for id in range(2, n + 1, 2):
        tail.pop(id)
    tail.pop(1)
    tail.add(n + 1, 2)
    assert tail.slots == len(tail) and tail.nbytes <= 21 * len(tail)


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["new", "again", "pop", "oldest", "clear"]), st.integers(1, 40)),
        max_size=200,
    )
)
def test_twins_and_a_dict_agree(both, ops):
    tails = [codec.ReplayTail() for codec in both]
    model: dict[int, int] = {}
    next_id = 41
    for position, (op, id) in enumerate(ops):
        if op == "new":  # an id greater than every other: the common case
            id, next_id = next_id, next_id + 1
        if op in ("new", "again"):
            if id in model:
                for tail in tails:
                    with pytest.raises(ValueError):
                        tail.add(id, position)
            else:
                model[id] = position
                for tail in tails:
                    tail.add(id, position)
        elif op == "clear":
            model.clear()
            for tail in tails:
                tail.clear()
        else:
            if op == "oldest" and model:
                id = next(iter(model))
            want = model.pop(id, None)
            assert [tail.pop(id) for tail in tails] == [want, want]
        for tail in tails:
            assert list(tail.items()) == list(model.items()) and len(tail) == len(model)
        assert tails[0].slots == tails[1].slots and tails[0].indexed == tails[1].indexed
        assert tails[0].nbytes == tails[1].nbytes


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_twins_and_a_dict_agree_through_compactions(both, seed):
    """Long random runs (compactions need COMPACT_MIN tombstones): mostly new ids and the
    oldest removed, some removed ids added again (out of order: runs, then the index)."""
    rng = random.Random(seed)
    tails = [codec.ReplayTail() for codec in both]
    model: dict[int, int] = {}
    removed: list[int] = []
    next_id = 1
    compactions, indexed = 0, set()
    for step in range(30_000):
        r = rng.random()
        if r < 0.5 or not model:
            id = next_id
            next_id += 1
            model[id] = step
        elif r < 0.53 and removed:
            id = removed.pop(rng.randrange(len(removed)))
            model[id] = step
        else:
            if r < 0.85:
                id = next(iter(model))
            elif r < 0.98:
                id = rng.choice(list(model)) if len(model) < 64 else next(iter(model)) + 7
            else:
                id = rng.randrange(next_id + 5)
            want = model.pop(id, None)
            assert [tail.pop(id) for tail in tails] == [want, want]
            if want is not None:
                removed.append(id)
            continue
        slots = tails[1].slots
        for tail in tails:
            tail.add(id, step)
        compactions += tails[1].slots <= slots
        indexed.add(tails[1].indexed)
        assert tails[0].slots == tails[1].slots and tails[0].indexed == tails[1].indexed
        assert tails[0].nbytes == tails[1].nbytes
        if step % 1000 == 0:
            for tail in tails:
                assert list(tail.items()) == list(model.items())
    for tail in tails:
        assert list(tail.items()) == list(model.items())
    assert compactions and indexed == {False, True}


# ---- replays with ADD ids out of order -----------------------------------------------------
MEMORY = 3000


@pytest.fixture
def journal_codec(impl, monkeypatch):
    return use_codec(impl, monkeypatch)


def open_journal(directory, **kw):
    kw.setdefault("fsync", "never")
    kw.setdefault("segment_size", 16 * KiB)
    kw.setdefault("max_memory_size", MEMORY)
    return QueueJournal.open(directory, **kw)


@pytest.mark.parametrize("aborted", [5, 60])  # a few runs; more than RUN_LIMIT: the index
def test_a_snapshot_in_queue_order_recovers_that_order(
    journal_codec, tmp_path, monkeypatch, aborted
):
    indexed = []
    replay_records = codec_selector.replay_records

    def spy(buffer, start, end, base, tail, *rest):
        out = replay_records(buffer, start, end, base, tail, *rest)
        indexed.append(tail.indexed)
        return out

    journal, _ = open_journal(tmp_path / "q")
    q, model = MiniQueue(journal, MEMORY), Model()
    for id in range(1, 301):
        it = item(id, size=40)
        q.add(it)
        model.apply(OP_ADD, it)
    reads = [q.take(reliable=True) for _ in range(aborted)]
    for it in reads:  # each abort puts its item at the head: newest id first
        model.apply(OP_OPEN, id=it.id)
    for it in reads:
        q.abort(it.id)
        model.apply(OP_UNREMOVE, id=it.id)
    for _ in range(2):  # open at the compaction: ADD + OPEN at the snapshot's start
        model.apply(OP_OPEN, id=q.take(reliable=True).id)
    journal.compact(list(q.open.values()), list(q.ring), wait=True)
    assert journal.rewrites == 1
    # After the snapshot: removals from its middle, from its head, a new item.
    for id in (aborted // 2, 150, 299, aborted - 2):
        journal.remove(id)
        model.apply(OP_REMOVE, id=id)
    it = item(301, size=40)
    journal.add(it.id, it.flags, it.add_time, it.expiry, it.data)
    model.apply(OP_ADD, it)
    journal.close()

    monkeypatch.setattr(codec_selector, "replay_records", spy)
    journal, rec = open_journal(tmp_path / "q")
    try:
        assert rec.warnings == []
        assert rec.items and journal.disk_items  # in memory and on disk
        restarted = copy.deepcopy(model)
        restarted.restarted()
        ids = [it.id for it in restarted.expected()]
        assert ids[:2] == [aborted, aborted - 1] and ids != sorted(ids)
        assert all_items(journal, rec) == restarted.expected()
        assert any(indexed) == (aborted - 2 > journal_codec.ReplayTail.RUN_LIMIT)
    finally:
        journal.close()


def damaged_journal(directory, codec) -> Model:
    """Items of many sizes (some larger than a replay window) in 64 KiB segments, a damaged
    record in the middle of a segment; returns the model of what replay gives back."""
    journal, _ = open_journal(directory, segment_size=64 * KiB, max_memory_size=1 << 20)
    model = Model()
    rng = random.Random(9)
    for id in range(1, 401):
        it = item(id, size=rng.choice([0, 10, 700, 1500, 5000]))
        journal.add(it.id, it.flags, it.add_time, it.expiry, it.data)
        model.apply(OP_ADD, it)
        if id % 3 == 0:
            journal.remove(id - 1)
            model.apply(OP_REMOVE, id=id - 1)
    journal.close()
    return model


def test_replay_in_windows_finds_what_one_pass_finds(journal_codec, tmp_path, monkeypatch):
    """Records straddle the windows, some are longer than one, a damaged record and the
    zeros after the data are judged on the whole segment: the same result either way."""
    model = damaged_journal(tmp_path / "a", journal_codec)
    segments = sorted((tmp_path / "a").iterdir())
    assert len(segments) > 4 and segments[3].stat().st_size == 64 * KiB
    data = bytearray(segments[3].read_bytes())
    data[20_000] ^= 0xFF  # inside some record of a full segment
    segments[3].write_bytes(bytes(data))
    for name in ("b", "c"):
        (tmp_path / name).mkdir()
        for path in (tmp_path / "a").iterdir():
            (tmp_path / name / path.name).write_bytes(path.read_bytes())

    journal, whole = open_journal(tmp_path / "b", max_memory_size=1 << 30)
    journal.close()
    drops = []
    real_drop = recovery.Segment.drop_pages
    monkeypatch.setattr(recovery, "_DROP_BYTES", 1000)
    monkeypatch.setattr(
        recovery.Segment, "drop_pages", lambda s, *a: (drops.append(a), real_drop(s, *a))
    )
    journal, windowed = open_journal(tmp_path / "c", max_memory_size=1 << 30)
    journal.close()
    assert len(whole.warnings) == 1 and "offset" in whole.warnings[0]
    assert windowed.warnings == [w.replace("/b/", "/c/") for w in whole.warnings]
    assert windowed.items == whole.items and windowed.next_id == whole.next_id
    assert len(drops) > 4 * 64 * KiB // 1000  # a drop per window
    assert [it.id for it in whole.items] != [it.id for it in model.expected()]


def test_a_nonzero_byte_far_into_the_zeros_is_still_a_torn_tail(
    journal_codec, tmp_path, monkeypatch
):
    journal, _ = open_journal(tmp_path / "q", segment_size=64 * KiB)
    for id in range(1, 4):
        journal.add(id, 0, 0, 0, b"x" * 100)
    journal.close()
    (segment,) = sorted((tmp_path / "q").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    far = len(data) - 10
    assert far > 3 * 1000 + 3 * 137  # windows of zeros before it
    data[far] = 1
    segment.write_bytes(bytes(data))
    monkeypatch.setattr(recovery, "_DROP_BYTES", 1000)
    journal, rec = open_journal(tmp_path / "q")
    journal.close()
    assert [it.id for it in rec.items] == [1, 2, 3]
    assert len(rec.warnings) == 1 and "torn record" in rec.warnings[0]
    assert segment.read_bytes()[far] == 0  # the last segment's tail is zeroed


def test_replay_of_queued_items_costs_a_few_bytes_each(journal_codec, tmp_path):
    n = 200_000
    journal, _ = open_journal(tmp_path / "q", segment_size=1 << 20)
    for id in range(1, n + 1):
        journal.add(id, 0, 0, 0, b"0123456789", in_memory=False)
    journal.close()
    tracemalloc.start()
    try:
        result = recovery.replay(tmp_path / "q", 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        assert result.recovery.disk_items == n and result.recovery.items == []
        assert result.live_record_bytes == n * (10 + 37)
        # About 4 bytes an item in the replay and while loading (the tail shrinks as it
        # hands its offsets over). Two 64-bit arrays peaked at 16.7 bytes an item (22.1 in
        # the pure build), and the dict before them cost about 110.
        assert peak <= 12 * n + (256 << 10)
    finally:
        for segment in result.segments:
            segment.close()
