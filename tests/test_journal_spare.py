"""Spare segments: a server's journal allocates its next segment's file on a worker thread, so
a rotation on the event loop does not wait for the file system to find blocks."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest
from test_journal_support import segment_files, use_codec

import erq.journal.journal as journal_module
from erq.journal import GroupCommit, QueueJournal
from erq.journal.segment import Spare

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
    return QueueJournal.open(directory, segment_size=SEGMENT, commit=commit, **kw)[0]


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
