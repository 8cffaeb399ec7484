"""Compaction: drained queues, long queues, the disk bound, crashes at every step (both codecs)."""

from __future__ import annotations

import copy
import errno
import json
import random
import signal
import subprocess
import sys
import threading

import pytest
from test_journal_support import (
    KiB,
    MiniQueue,
    Model,
    all_items,
    env_for,
    item,
    record_spans,
    run_scenario,
    segment_files,
    use_codec,
)

import erq.journal.codec as codec_selector
from erq.journal import QueueJournal, compaction, reclaim
from erq.journal.format import ADD_OVERHEAD, OP_ADD, OP_FLUSH, OP_OPEN, OP_REMOVE, OP_UNREMOVE

from support import compacting_held

SEGMENT = 16 * KiB
MiB, GiB = 1 << 20, 1 << 30
MEMORY = 3000


@pytest.fixture
def codec(impl, monkeypatch):
    return use_codec(impl, monkeypatch)


def open_journal(directory, **kw):
    kw.setdefault("fsync", "never")
    kw.setdefault("segment_size", SEGMENT)
    kw.setdefault("max_memory_size", MEMORY)
    return QueueJournal.open(directory, **kw)


def restarted(model: Model) -> list:
    m = copy.deepcopy(model)
    m.restarted()
    return m.expected()


def assert_recovers(directory, expected) -> None:
    journal, rec = open_journal(directory)
    try:
        assert rec.warnings == []
        assert all_items(journal, rec) == expected
        assert not [p for p in directory.iterdir() if p.name.endswith((".tmp", ".new"))]
    finally:
        journal.close()


def test_draining_releases_old_segments_at_once(codec, tmp_path):
    journal, _ = open_journal(tmp_path / "q")
    for i in range(1, 201):
        journal.add(i, 0, 0, 0, b"d" * 500)
    assert len(segment_files(tmp_path / "q")) >= 5
    for i in range(1, 201):
        journal.remove(i)
    assert journal.wants_compaction
    journal.compact([], [])  # no thread, no wait: the files are gone when it returns
    assert len(segment_files(tmp_path / "q")) == 1 and journal.segment_count == 1
    assert journal.logsize <= SEGMENT and not journal.wants_compaction
    journal.add(201, 0, 0, 0, b"after")
    journal.close()
    journal, rec = open_journal(tmp_path / "q")
    assert [it.id for it in rec.items] == [201] and rec.next_id == 202
    journal.close()


def test_an_empty_queue_with_one_long_segment_starts_a_fresh_one(codec, tmp_path):
    journal, _ = open_journal(tmp_path / "q")
    for i in range(1, 61):  # more than half of the one segment
        journal.add(i, 0, 0, 0, b"e" * 100)
        journal.remove(i)
    assert journal.segment_count == 1 and journal.wants_compaction
    journal.compact([], [])
    assert journal.segment_count == 1 and journal.used_bytes == 32
    journal.close()
    journal, rec = open_journal(tmp_path / "q")
    assert rec.items == [] and rec.next_id == 61
    journal.close()


def test_a_snapshot_of_a_long_disk_run_drops_the_pages_it_reads_as_it_goes(
    codec, tmp_path, monkeypatch
):
    # The items kept only on disk are copied run by run; reading their lengths maps the run's
    # pages, which must be given back every so often, not only at the end of a run that may
    # span a whole (large) segment.
    monkeypatch.setattr(compaction, "_DROP_EVERY", 100)
    journal, _ = open_journal(tmp_path / "q", segment_size=1 << 20, max_memory_size=0)
    for i in range(1, 1001):
        it = item(i, 20)
        journal.add(it.id, it.flags, it.add_time, it.expiry, it.data, False)  # on disk only
    assert [it.id for it in journal.read_behind(10 * 20)] == list(range(1, 11))
    for i in range(1, 11):
        journal.remove(i)
    drops = []
    real_drop = compaction.Segment.drop_pages
    monkeypatch.setattr(
        compaction.Segment,
        "drop_pages",
        lambda self: (drops.append(threading.current_thread().name), real_drop(self))[1],
    )
    journal.compact([], [], wait=True)
    assert journal.rewrites == 1
    from_job = [name for name in drops if name.startswith("erq-compact")]
    assert len(from_job) >= 990 // 100
    journal.close()
    journal, rec = open_journal(tmp_path / "q", segment_size=1 << 20, max_memory_size=10**9)
    assert [it.id for it in all_items(journal, rec)] == list(range(11, 1001))
    journal.close()


def test_long_queue_rewrite_keeps_only_live_records(codec, tmp_path):
    journal, _ = open_journal(tmp_path / "q", max_memory_size=10**9)
    live = [item(i, 200) for i in range(251, 301)]
    for i in range(1, 301):
        it = item(i, 200)
        journal.add(it.id, it.flags, it.add_time, it.expiry, it.data)
    for i in range(1, 251):
        journal.remove(i)
    assert journal.wants_compaction
    journal.compact([], live, wait=True)
    assert journal.rewrites == 1 and not journal.wants_compaction
    snapshot, current = segment_files(tmp_path / "q")
    spans = record_spans(snapshot.read_bytes())
    assert len(spans) == 50 and snapshot.stat().st_size == 32 + 50 * (ADD_OVERHEAD + 200)
    assert record_spans(current.read_bytes()) == []
    journal.close()
    journal, rec = open_journal(tmp_path / "q", max_memory_size=10**9)
    assert rec.items == live
    journal.close()


def test_max_journal_size_rewrites_only_a_queue_whose_live_data_fits_in_it(codec, tmp_path):
    """Kestrel's rule: past max_journal_size the journal is rewritten once its live data is
    smaller than that size. A longer (or draining) queue is not: the rewrite would copy it."""
    journal, _ = open_journal(tmp_path / "q", max_memory_size=10**9)
    for i in range(1, 301):
        it = item(i, 200)
        journal.add(it.id, it.flags, it.add_time, it.expiry, it.data)
    for i in range(1, 101):
        journal.remove(i)
    used, live = journal.used_bytes, journal._live_bytes()
    assert used - live > SEGMENT and used <= 2 * live  # only the size limit can ask for it
    journal.update_policy(max_journal_size=live)
    assert not journal.wants_compaction
    journal.update_policy(max_journal_size=live + 1)
    assert journal.wants_compaction
    journal.compact([], [item(i, 200) for i in range(101, 301)], wait=True)
    assert journal.rewrites == 1 and not journal.wants_compaction
    journal.close()


def test_segments_stay_within_a_quarter_of_max_journal_size(codec, tmp_path):
    """Segments double up to the segment size, but a journal kept to 256 KiB is not written
    in 1 MiB files: it would hold four times its limit in one preallocated file. A reload
    that lowers the limit caps the segments made after it."""
    limited, _ = open_journal(tmp_path / "limited", segment_size=MiB, max_journal_size=256 * KiB)
    free, _ = open_journal(tmp_path / "free", segment_size=MiB, max_journal_size=GiB)
    for i in range(1, 3001):
        limited.add(i, 0, 0, 0, b"s" * 1000)
        free.add(i, 0, 0, 0, b"s" * 1000)
    assert max(s.size for s in limited._segments) == 64 * KiB
    assert max(s.size for s in free._segments) == MiB
    free.update_policy(max_journal_size=512 * KiB)
    for i in range(3001, 4001):
        free.add(i, 0, 0, 0, b"s" * 1000)
    assert free._segments[-1].size == 128 * KiB
    big = b"b" * (200 * KiB)  # a record larger than the cap still gets a segment of its own
    limited.add(3001, 0, 0, 0, big)
    assert limited._segments[-1].size >= len(big)
    limited.close()
    free.close()
    journal, rec = open_journal(tmp_path / "limited")
    assert len(rec.items) + rec.disk_items == 3001 and rec.next_id == 3002
    # but does not lend its size to the segment a compaction starts for the appends
    journal.compact([], rec.items, wait=True)
    assert journal._segments[-1].size <= 64 * KiB
    for i in range(1, 3002):
        journal.remove(i)
    journal.add(3002, 0, 0, 0, big)
    journal.remove(3002)
    journal.compact([], [], wait=True)  # drained: the history goes
    assert journal._segments[-1].size <= 64 * KiB
    journal.close()


def test_snapshot_keeps_open_reads_then_memory_then_disk_items(codec, tmp_path):
    journal, _ = open_journal(tmp_path / "q")
    q, model = run_scenario(journal, MEMORY, seed=3, steps=600)
    opened = list(q.open.values())
    journal.compact(opened, list(q.ring), wait=True)
    assert journal.rewrites == 1
    snapshot = segment_files(tmp_path / "q")[0]
    ops = [op for op in _opcodes(snapshot)]
    n = len(opened)
    assert ops[:n] == [OP_ADD] * n and ops[n : 2 * n] == [OP_OPEN] * n
    assert set(ops[2 * n :]) == {OP_ADD}
    # the queue goes on, reading back through the snapshot
    taken = []
    while (got := q.take()) is not None:
        taken.append(got)
    assert taken == model.queued
    journal.close()


def _opcodes(path):
    data = path.read_bytes()
    return [data[start + 8] for start, _ in record_spans(data)]


def test_disk_stays_within_twice_live_plus_two_segments(codec, tmp_path):
    rng = random.Random(21)
    journal, _ = open_journal(tmp_path / "q")
    q = MiniQueue(journal, MEMORY)
    live: dict[int, int] = {}
    written = 0
    next_id = 1
    backlog = 40
    while written < 12 * SEGMENT or live:
        if written >= 12 * SEGMENT:
            backlog = 0
        elif rng.random() < 0.01:
            backlog = rng.randrange(0, 120)
        if len(live) < backlog:
            it = item(next_id, rng.randrange(1, 600))
            next_id += 1
            q.add(it)
            live[it.id] = ADD_OVERHEAD + len(it.data)
            written += ADD_OVERHEAD + len(it.data)
        else:
            got = q.take()
            del live[got.id]
        q.maybe_compact()
        assert journal.logsize <= 2 * sum(live.values()) + 2 * SEGMENT, (written, len(live))
    assert journal.rewrites > 3
    q.maybe_compact()
    assert journal.segment_count == 1
    journal.close()


def compacting_q_held(journal, q, monkeypatch) -> threading.Event:
    """compacting_held, to ``q``'s state."""
    return compacting_held(journal, list(q.open.values()), list(q.ring), monkeypatch)


def test_appends_reads_and_aborts_go_on_during_compaction(codec, tmp_path, monkeypatch):
    journal, _ = open_journal(tmp_path / "q")
    q, model = run_scenario(journal, MEMORY, seed=8, steps=500)
    old = segment_files(tmp_path / "q")
    gate = compacting_q_held(journal, q, monkeypatch)
    assert not journal.wants_compaction  # one at a time
    for i in range(10_000, 10_030):
        it = item(i, 300)
        q.add(it)  # the queue is in read-behind: these go to disk, in the new segment
        model.apply(OP_ADD, it)
    for _ in range(25):  # drains RAM and reads back from the old segments
        got = q.take()
        model.apply(OP_REMOVE, id=got.id)
    oldest = next(iter(q.open))
    q.abort(oldest)
    model.apply(OP_UNREMOVE, id=oldest)
    gate.set()
    journal.wait_compaction()
    assert journal.rewrites == 1
    assert not any(p.exists() for p in old)
    journal.close()
    assert_recovers(tmp_path / "q", restarted(model))


@pytest.mark.parametrize("end", ["delete", "close"])
def test_a_compaction_stopped_by_a_delete_or_close_is_no_failure(
    codec, tmp_path, monkeypatch, caplog, end
):
    """Deleting a queue (or closing its journal) while it compacts stops the job: nothing
    failed, nothing to log (it logged 'compaction of ... failed (retry in 1s): ' with no
    reason)."""
    journal, _ = open_journal(tmp_path / "q")
    q, _ = run_scenario(journal, MEMORY, seed=10, steps=300)
    gate = compacting_q_held(journal, q, monkeypatch)
    threading.Timer(0.2, gate.set).start()  # after the stop has asked the job to give up
    getattr(journal, end)()
    assert journal.last_compaction_error is None
    assert "compaction" not in caplog.text, caplog.text


def test_flush_during_compaction(codec, tmp_path, monkeypatch):
    journal, _ = open_journal(tmp_path / "q")
    q, model = run_scenario(journal, MEMORY, seed=9, steps=500)
    gate = compacting_q_held(journal, q, monkeypatch)
    journal.flush()
    model.apply(OP_FLUSH)
    gate.set()
    journal.wait_compaction()
    assert journal.disk_items == 0
    journal.close()
    assert_recovers(tmp_path / "q", restarted(model))


STEPS = ["write", "_fsync_file", "_rename", "_fsync_dir", "_unlink"]


@pytest.mark.parametrize("step", STEPS)
def test_a_failed_compaction_step_loses_nothing(codec, tmp_path, monkeypatch, step):
    journal, _ = open_journal(tmp_path / "q")
    q, model = run_scenario(journal, MEMORY, seed=4, steps=500)

    def fail(*args):
        raise OSError(errno.EIO, "injected")

    with monkeypatch.context() as m:
        if step == "write":
            calls = [0]
            real_encode = codec_selector.encode_add

            def encode(*args):
                calls[0] += 1
                if calls[0] > 3:
                    fail()
                return real_encode(*args)

            m.setattr(codec_selector, "encode_add", encode)
        else:
            m.setattr(compaction, step, fail)
        journal.compact(list(q.open.values()), list(q.ring), wait=True)
    # Before the rename the old segments stay in charge; after it the snapshot does, and a
    # failed directory fsync or delete only leaves superseded files for recovery to remove.
    fatal = step in ("write", "_fsync_file", "_rename")
    assert (journal.last_compaction_error is not None) == fatal
    assert journal.rewrites == (0 if fatal else 1)
    if fatal:
        assert not journal.wants_compaction  # backs off before trying again
    for i in range(20_000, 20_010):  # the journal goes on working
        it = item(i, 50)
        q.add(it)
        model.apply(OP_ADD, it)
    journal.close()
    assert_recovers(tmp_path / "q", restarted(model))


def test_compaction_retries_after_the_back_off(codec, tmp_path, monkeypatch):
    journal, _ = open_journal(tmp_path / "q")
    q, model = run_scenario(journal, MEMORY, seed=4, steps=500)
    now = [1000.0]

    class Clock:
        @staticmethod
        def monotonic():
            return now[0]

    monkeypatch.setattr(reclaim, "time", Clock)  # the back-off's clock
    with monkeypatch.context() as m:
        m.setattr(compaction, "_rename", lambda a, b: (_ for _ in ()).throw(OSError("no")))
        journal.compact(list(q.open.values()), list(q.ring), wait=True)
    assert journal.last_compaction_error is not None
    for i in range(1, 300):  # plenty of garbage
        journal.remove(10**6 + i)
    assert not journal.wants_compaction
    now[0] += 1.5
    assert journal.wants_compaction
    journal.compact(list(q.open.values()), list(q.ring), wait=True)
    assert journal.rewrites == 1
    journal.close()
    assert_recovers(tmp_path / "q", restarted(model))


KILL_SCRIPT = r"""
import json, os, signal, sys
from test_journal_support import run_scenario, KiB
import erq.journal.codec as codec_selector
from erq.journal import QueueJournal, compaction

directory, point = sys.argv[1], sys.argv[2]
journal, _ = QueueJournal.open(directory, fsync="never", segment_size=16 * KiB, max_memory_size=3000)
q, model = run_scenario(journal, 3000, seed=int(sys.argv[3]), steps=500)
model.restarted()
print(json.dumps([[it.id, len(it.data)] for it in model.expected()]), flush=True)

def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)

name, _, when = point.partition(":")
if name == "write":
    real = codec_selector.encode_add
    calls = [0]
    def encode(*args):
        calls[0] += 1
        if calls[0] > 3:
            die()
        return real(*args)
    codec_selector.encode_add = encode
elif name != "done":
    real = getattr(compaction, name)
    def step(*args):
        if when == "before":
            die()
        real(*args)
        die()
    setattr(compaction, name, step)
journal.compact(list(q.open.values()), list(q.ring), wait=True)
die()
"""

KILL_POINTS = [
    "write",
    "_fsync_file:before",
    "_fsync_file:after",
    "_rename:after",
    "_fsync_dir:after",
    "_unlink:after",
    "done",
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_any_compaction_step_loses_and_duplicates_nothing(impl, codec, tmp_path, point):
    directory = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(directory), point, "5"],
        env=env_for(impl),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    expected = [item(i, size) for i, size in json.loads(proc.stdout)]
    assert len(expected) > 20
    # the process died where it was meant to
    names = sorted(p.name for p in directory.iterdir())
    tmp = [n for n in names if n.endswith(".tmp")]
    assert len(tmp) == (1 if point in ("write", "_fsync_file:before", "_fsync_file:after") else 0)
    segments = len([n for n in names if n.endswith(".seg")])
    if point in ("_rename:after", "_fsync_dir:after"):
        assert segments > 3  # the snapshot beside every old segment
    elif point == "done":
        assert segments == 2  # the snapshot and the segment taking appends
    assert_recovers(directory, expected)
    # and the recovered journal compacts fine afterwards
    journal, rec = open_journal(directory)
    items = all_items(journal, rec)
    journal.compact([], items[:10], wait=True)  # the rest came back via read-behind: in RAM now
    assert journal.last_compaction_error is None
    journal.close()
    assert_recovers(directory, items[:10])
