"""Spare segments: a server's journal allocates its next segment's file on a worker thread, so
a rotation on the event loop does not wait for the file system to find blocks."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest
from test_journal_support import segment_files, use_codec

import erq.journal.journal as journal_module
from erq.journal import GroupCommit, QueueJournal, reclaim
from erq.journal.segment import Spare

from support import SERVES_ON_THEN_STOP, run_script, served_on

SEGMENT = 64 * 1024
RECORD = b"x" * 1000  # about 60 per segment


@pytest.fixture
def codec(impl, monkeypatch):
    monkeypatch.setattr(journal_module, "SPARE_MIN_SIZE", SEGMENT)  # small segments get spares
    return use_codec(impl, monkeypatch)


def spare_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("spare-"))


def fill_until_rotation(journal: QueueJournal, first_id: int) -> int:
    """Add records until the journal starts a new segment; returns the next free id."""
    rotations, id = journal.rotations, first_id
    while journal.rotations == rotations:
        journal.add(id, 0, 0, 0, RECORD)
        id += 1
    return id


def run(coro_fn):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        try:
            return await coro_fn(commit)
        finally:
            commit.close()

    return asyncio.run(main())


def open_journal(directory, commit, **kw):
    kw.setdefault("fsync", "never")
    kw.setdefault("segment_size", SEGMENT)
    return QueueJournal.open(directory, commit=commit, **kw)[0]


def test_a_rotation_takes_the_spare_allocated_ahead(codec, tmp_path):
    directory = tmp_path / "q"

    async def body(commit):
        journal = open_journal(directory, commit)
        journal.add(1, 0, 0, 0, RECORD)  # the first segment; its successor is allocated now
        spare = journal._spare.result(timeout=30)
        assert spare_files(directory) == ["spare-1.seg.new"]
        assert os.fstat(spare.fd).st_size == SEGMENT
        inode = os.fstat(spare.fd).st_ino
        next_id = fill_until_rotation(journal, 2)
        second = segment_files(directory)[-1]
        assert second.stat().st_ino == inode  # the spare's file became the segment
        journal._spare.result(timeout=30)
        assert spare_files(directory) == ["spare-2.seg.new"]  # and the next one is ready
        journal.close()
        return next_id

    next_id = run(body)
    assert spare_files(directory) == []  # close() removes the spare
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert [it.id for it in rec.items] == list(range(1, next_id))
    journal.close()


def test_a_record_larger_than_the_spare_gets_a_segment_of_its_own_size(codec, tmp_path):
    directory = tmp_path / "q"
    big = b"y" * (3 * SEGMENT)

    async def body(commit):
        journal = open_journal(directory, commit)
        journal.add(1, 0, 0, 0, RECORD)
        journal._spare.result(timeout=30)
        journal.add(2, 0, 0, 0, big)
        assert segment_files(directory)[-1].stat().st_size >= 3 * SEGMENT
        journal._spare.result(timeout=30)
        assert spare_files(directory) == ["spare-2.seg.new"]  # the small spare was dropped
        journal.close()

    run(body)
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert [(it.id, len(it.data)) for it in rec.items] == [(1, len(RECORD)), (2, len(big))]
    journal.close()


def test_a_failed_spare_leaves_the_rotation_to_allocate_itself(codec, tmp_path, monkeypatch):
    directory = tmp_path / "q"

    def no_space(cls, directory, number, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Spare, "allocate", classmethod(no_space))

    async def body(commit):
        journal = open_journal(directory, commit)
        journal.add(1, 0, 0, 0, RECORD)
        with pytest.raises(OSError):
            journal._spare.result(timeout=30)
        next_id = fill_until_rotation(journal, 2)
        journal.add(next_id, 0, 0, 0, RECORD)
        journal.close()
        return next_id + 1

    end = run(body)
    assert spare_files(directory) == []
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert [it.id for it in rec.items] == list(range(1, end))
    journal.close()


def test_a_spare_left_by_a_crash_is_removed_by_recovery(codec, tmp_path):
    directory = tmp_path / "q"
    journal, _ = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    journal.add(1, 0, 0, 0, RECORD)
    journal.close()
    (directory / "spare-7.seg.new").write_bytes(bytes(SEGMENT))
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    journal.close()
    assert rec.warnings == [] and [it.id for it in rec.items] == [1]
    assert spare_files(directory) == []


def test_journals_without_a_commit_allocate_no_spare(codec, tmp_path):
    directory = tmp_path / "q"
    journal, _ = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    fill_until_rotation(journal, 1)
    assert journal._spare is None and spare_files(directory) == []
    journal.close()


def test_segments_below_the_spare_size_get_no_spare(codec, tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "SPARE_MIN_SIZE", 2 * SEGMENT)
    directory = tmp_path / "q"

    async def body(commit):
        journal = open_journal(directory, commit)
        fill_until_rotation(journal, 1)
        assert journal._spare is None and spare_files(directory) == []
        journal.close()

    run(body)


def test_deleting_a_journal_waits_for_its_spare(codec, tmp_path):
    directory = tmp_path / "q"

    async def body(commit):
        journal = open_journal(directory, commit)
        journal.add(1, 0, 0, 0, RECORD)
        journal.delete()

    run(body)
    assert not directory.exists()


def file_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def grown_to_full_size(directory, commit, segment_size: int) -> tuple[QueueJournal, int]:
    """A journal written until its segments reached ``segment_size`` and its spare is made;
    returns it and the next free id."""
    journal = open_journal(directory, commit, segment_size=segment_size)
    next_id = 1
    while not journal._segments or journal._segments[-1].size < segment_size:
        next_id = fill_until_rotation(journal, next_id)
    journal._spare.result(timeout=30)
    return journal, next_id


def test_logsize_counts_the_allocated_spare(codec, tmp_path):
    directory = tmp_path / "q"

    async def body(commit):
        journal = open_journal(directory, commit)
        journal.add(1, 0, 0, 0, RECORD)
        journal._spare.result(timeout=30)
        assert journal.logsize == file_bytes(directory) == 2 * SEGMENT
        journal.close()

    run(body)


def test_an_idle_empty_queue_gives_back_its_large_segment_and_its_spare(
    codec, tmp_path, monkeypatch
):
    """Segments double up to the segment size as a queue writes, and from SPARE_MIN_SIZE on
    the next one is allocated ahead: a burst leaves up to two files of the segment size.
    Once the queue is empty and has written nothing for IDLE_SHRINK_SECONDS, it goes back
    to one segment of the first size, as a new queue has; a queue empty only for a moment
    keeps its files."""
    directory = tmp_path / "q"
    monkeypatch.setattr(reclaim, "IDLE_SHRINK_SECONDS", 3600.0)
    monkeypatch.setattr(journal_module, "SPARE_MIN_SIZE", 4 * SEGMENT)  # as 16 of 64 MiB

    async def body(commit):
        journal, next_id = grown_to_full_size(directory, commit, 8 * SEGMENT)
        for id in range(1, next_id):
            journal.remove(id)
        journal.compact([], [])  # drained: the older segments go at once
        assert journal.segment_count == 1
        held = journal.logsize
        assert held == file_bytes(directory) == 2 * 8 * SEGMENT  # the big one and its spare
        assert not journal.wants_compaction and not journal.wants_compaction  # not idle yet

        monkeypatch.setattr(reclaim, "IDLE_SHRINK_SECONDS", 0.0)
        journal.add(next_id, 0, 0, 0, b"one more")  # written and taken: the queue is in use
        journal.remove(next_id)
        assert not journal.wants_compaction  # first sight of this position
        assert journal.wants_compaction  # the same position a sweep later: idle
        journal.compact([], [])
        assert journal.segment_count == 1 and spare_files(directory) == []
        assert journal.logsize == file_bytes(directory) == SEGMENT  # the first size
        assert not journal.wants_compaction

        journal.add(next_id + 1, 0, 0, 0, b"after")  # and it grows again from there
        journal.close()
        return next_id + 1

    last = run(body)
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=8 * SEGMENT)
    assert [it.id for it in rec.items] == [last] and rec.next_id == last + 1
    assert rec.warnings == []  # the shrink released segments: none is taken for lost
    journal.close()


def test_an_idle_queue_with_items_keeps_its_segment_and_its_spare(codec, tmp_path, monkeypatch):
    directory = tmp_path / "q"
    monkeypatch.setattr(reclaim, "IDLE_SHRINK_SECONDS", 0.0)

    async def body(commit):
        journal, next_id = grown_to_full_size(directory, commit, 4 * SEGMENT)
        held = journal.logsize
        assert not journal.wants_compaction and not journal.wants_compaction
        assert journal.logsize == held and len(spare_files(directory)) == 1
        journal.close()

    run(body)


IDLE_SERVER_SCRIPT = (
    SERVES_ON_THEN_STOP
    + r"""
import asyncio, json, sys, time
from pathlib import Path
import erq.journal.journal as journal_module
import erq.journal.reclaim as reclaim
from erq.config import load_config
from erq.server import Server

def held(directory):
    return sum(p.stat().st_size for p in directory.iterdir())

async def main(data_dir):
    journal_module.SPARE_MIN_SIZE = 256 * 1024
    reclaim.IDLE_SHRINK_SECONDS = 0.5
    server = Server(load_config(None, cli={"port": 0, "admin_port": 0, "data_dir": data_dir}))
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    value = b"v" * 10000
    for _ in range(400):
        writer.write(b"set burst 0 0 %d\r\n%s\r\n" % (len(value), value))
    await writer.drain()
    for _ in range(400):
        assert await reader.readline() == b"STORED\r\n"
    taken = 0
    for _ in range(400):
        writer.write(b"get burst\r\n")
        await writer.drain()
        line = await reader.readline()
        if line.startswith(b"VALUE"):
            taken += 1
            await reader.readexactly(len(value) + 2)
            await reader.readline()
    directory = Path(data_dir) / "burst"
    after_burst = held(directory)
    deadline = time.monotonic() + 15
    while held(directory) > 64 * 1024 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    after_idle = sorted((p.name, p.stat().st_size) for p in directory.iterdir())
    replies = await serves_on_then_stop(server, reader, writer)
    print(json.dumps({"taken": taken, "after_burst": after_burst, "after_idle": after_idle,
                      "replies": replies}))

asyncio.run(main(sys.argv[1]))
"""
)


def test_a_server_gives_back_an_idle_drained_queues_segments_over_a_socket(impl, tmp_path):
    result = run_script(impl, IDLE_SERVER_SCRIPT, str(tmp_path / "data"))
    assert result["taken"] == 400, result
    assert result["after_burst"] >= 2 * 512 * 1024, result  # a big segment and its spare
    segments = [size for name, size in result["after_idle"] if name.endswith(".seg")]
    assert segments == [64 * 1024], result
    assert served_on(result["replies"]), result


def test_a_lower_max_journal_size_drops_the_spare_made_for_the_old_cap(codec, tmp_path):
    """A reload that lowers max_journal_size: the spare allocated for the old segment size
    goes, and the next segment is of the new cap (it was the spare's: 32 MiB segments in a
    journal capped at 2 MiB)."""
    directory = tmp_path / "q"

    async def body(commit):
        journal = open_journal(directory, commit, segment_size=4 * SEGMENT)
        journal.add(1, 0, 0, 0, RECORD)
        assert journal._spare.result(timeout=30).size == 2 * SEGMENT
        journal.update_policy(max_journal_size=4 * SEGMENT)  # segments of a quarter: SEGMENT
        assert journal._spare is None
        fill_until_rotation(journal, 2)
        assert [p.stat().st_size for p in segment_files(directory)] == [SEGMENT, SEGMENT]
        assert journal._spare.result(timeout=30).size == SEGMENT
        journal.close()

    run(body)
    assert spare_files(directory) == []
