"""Journal files deleted under an open journal: noticed, reported once, and the live state
written again, read-behind items and open reads included (both codecs). The server-level
tests (a real process, SIGKILL, restart) are in test_durability.py, section 9."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from test_journal_support import (
    KiB,
    MiniQueue,
    all_items,
    delete_journal,
    item,
    segment_files,
    use_codec,
)

from erq.journal import GroupCommit, QueueJournal, compaction
from erq.journal_api import JournalError

SEGMENT = 16 * KiB
MEMORY = 3000


@pytest.fixture
def codec(impl, monkeypatch):
    return use_codec(impl, monkeypatch)


def open_journal(directory: Path, **kw):
    kw.setdefault("fsync", "never")
    kw.setdefault("segment_size", SEGMENT)
    kw.setdefault("max_memory_size", MEMORY)
    return QueueJournal.open(directory, **kw)


def deleted_files_held(directory: Path) -> list[str]:
    """What this process still holds open of the deleted files of ``directory``."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)) and target.endswith(" (deleted)"):
            held.append(target)
    return held


class Scenario:
    """A queue over a journal with items in RAM, on disk only and open, and the items a
    restart must give back (open reads first, then the queue, in order)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.journal, _ = open_journal(directory)
        self.queue = MiniQueue(self.journal, MEMORY)
        self.next_id = 1
        self.expected = []

    def add(self, n: int) -> None:
        for _ in range(n):
            it = item(self.next_id, 100)
            self.next_id += 1
            self.queue.add(it)
            self.expected.append(it)

    def take(self, n: int, reliable: bool) -> None:
        for _ in range(n):
            taken = self.queue.take(reliable)
            if not reliable:
                self.expected.remove(taken)

    def heal(self) -> None:
        self.journal.heal(list(self.queue.open.values()), self.queue.ring)

    def restarted(self) -> list:
        self.journal.close()
        journal, recovery = open_journal(self.directory)
        try:
            assert recovery.warnings == []
            assert recovery.next_id == self.next_id
            return all_items(journal, recovery)
        finally:
            journal.close()


@pytest.mark.usefixtures("codec")
@pytest.mark.parametrize("what", ["directory", "segments"])
def test_deleted_files_are_reported_once_and_the_live_state_written_again(tmp_path, caplog, what):
    s = Scenario(tmp_path / "q")
    s.add(150)  # several segments; all but the first ~25 only on disk
    s.take(5, reliable=False)
    s.take(3, reliable=True)
    assert s.queue.disk and len(segment_files(s.directory)) > 1
    assert not s.journal.files_lost()
    delete_journal(s.directory, what)
    s.add(10)  # before anyone notices: into the deleted files
    with caplog.at_level(logging.ERROR, logger="erq.journal"):
        assert s.journal.files_lost() and s.journal.files_lost()
    reports = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(reports) == 1 and str(s.directory) in reports[0], reports
    s.heal()
    s.journal.wait_compaction()
    assert not s.journal.files_lost()
    assert deleted_files_held(s.directory) == []  # the deleted segments are released
    s.take(2, reliable=False)  # read-behind goes on, from the new files
    s.add(10)
    assert s.restarted() == s.expected


@pytest.mark.usefixtures("codec")
def test_the_fsync_period_check_hands_a_deletion_to_the_owner_once(tmp_path):
    s = Scenario(tmp_path / "q")
    s.add(5)
    calls = []
    s.journal.on_lost = lambda: calls.append(s.journal.files_lost())
    s.journal.check_current()
    assert calls == []
    delete_journal(s.directory, "segments")
    s.journal.check_current()
    s.journal.check_current()
    assert calls == [True]
    s.heal()
    s.journal.wait_compaction()
    s.journal.check_current()
    assert calls == [True]
    assert s.restarted() == s.expected


@pytest.mark.usefixtures("codec")
def test_a_settled_directory_costs_one_stat_and_a_segment_deleted_later_is_still_noticed(
    tmp_path, monkeypatch
):
    from erq.journal import healing
    from erq.journal.segment import Segment

    monkeypatch.setattr(healing, "DIR_SETTLE", 0.05)
    asked = []
    unlinked = Segment.unlinked
    monkeypatch.setattr(Segment, "unlinked", lambda seg: asked.append(seg) or unlinked(seg))
    s = Scenario(tmp_path / "q")
    s.add(150)
    segments = len(segment_files(s.directory))
    assert segments > 1

    def asked_per_check() -> int:
        asked.clear()
        assert not s.journal.files_lost()
        return len(asked)

    assert asked_per_check() == segments  # first sight of the directory's mtime
    time.sleep(0.06)
    assert asked_per_check() == segments  # the same mtime, long enough: settled
    assert [asked_per_check() for _ in range(3)] == [0, 0, 0]
    s.journal.check_current()  # the fsync period's check still asks the current segment
    assert len(asked) == 1
    segment_files(s.directory)[0].unlink()  # the oldest: only the thorough check sees it
    assert s.journal.files_lost()
    s.heal()
    s.journal.wait_compaction()
    assert asked_per_check() > 0  # the heal changed the directory: asked again
    assert s.restarted() == s.expected


@pytest.mark.usefixtures("codec")
def test_a_rotation_that_finds_the_directory_gone_starts_the_heal_at_the_next_pass(tmp_path):
    """Under a server (a commit, hence a loop) with fsync = "never", no period check would
    notice the deletion before the sweep's next second, and every write meanwhile would be
    refused: the failed rotation hands it to the owner itself, once, after the append."""

    async def main() -> None:
        commit = GroupCommit(asyncio.get_running_loop())
        directory = tmp_path / "q"
        journal, _ = open_journal(directory, segment_size=4 * KiB, commit=commit)
        queue = MiniQueue(journal, 64 * KiB)
        calls = []

        def on_lost() -> None:
            calls.append(journal.files_lost())
            journal.heal(list(queue.open.values()), queue.ring)

        journal.on_lost = on_lost
        expected = [item(i, 1000) for i in range(1, 4)]
        for it in expected:
            queue.add(it)
        delete_journal(directory, "directory")
        for id in (4, 5):  # no room left in the current segment: both need a new one
            with pytest.raises(JournalError, match="cannot"):
                queue.add(item(id, 1000))
        assert calls == []  # not from inside the append
        await asyncio.sleep(0)
        assert calls == [True]  # once, for both
        journal.wait_compaction()
        assert not journal.files_lost()
        expected.append(item(6, 1000))
        queue.add(expected[-1])
        await asyncio.sleep(0)
        assert calls == [True]
        journal.close()
        commit.close()
        journal, recovery = open_journal(directory)
        try:
            assert all_items(journal, recovery) == expected
        finally:
            journal.close()

    asyncio.run(main())


@pytest.mark.usefixtures("codec")
def test_a_directory_put_in_the_place_of_the_journals_is_noticed(tmp_path):
    s = Scenario(tmp_path / "q")
    s.add(20)
    s.directory.rename(tmp_path / "moved")
    s.directory.mkdir()
    assert s.journal.files_lost()
    s.heal()
    s.journal.wait_compaction()
    assert s.restarted() == s.expected


@pytest.mark.usefixtures("codec")
def test_an_empty_queue_is_written_again_and_keeps_its_next_id(tmp_path):
    s = Scenario(tmp_path / "q")
    s.add(3)
    s.take(3, reliable=False)
    delete_journal(s.directory, "directory")
    assert s.journal.files_lost()
    s.heal()
    s.journal.wait_compaction()
    assert not s.journal.files_lost() and segment_files(s.directory)
    assert s.restarted() == []


@pytest.mark.usefixtures("codec")
def test_a_journal_that_cannot_be_written_again_refuses_appends_until_it_can(tmp_path):
    s = Scenario(tmp_path / "data" / "q")
    s.add(40)
    shutil.rmtree(tmp_path / "data")  # the parent too: the journal cannot make it again
    assert s.journal.files_lost()
    s.heal()
    assert s.journal.files_lost()
    with pytest.raises(JournalError, match="deleted"):
        s.journal.add(s.next_id, 0, 0, 0, b"refused")
    with pytest.raises(JournalError):
        s.journal.remove(1)
    s.heal()  # tries again, still in vain
    (tmp_path / "data").mkdir()
    s.heal()
    s.add(5)  # appends go to the new directory at once
    s.journal.wait_compaction()
    assert not s.journal.files_lost()
    assert deleted_files_held(s.directory) == []
    assert s.restarted() == s.expected


@pytest.mark.usefixtures("codec")
def test_the_segments_a_compaction_is_deleting_are_not_taken_for_a_deletion(tmp_path, monkeypatch):
    s = Scenario(tmp_path / "q")
    s.add(150)
    s.take(140, reliable=False)
    unlinked, release = threading.Event(), threading.Event()

    def slow_unlink(path: Path) -> None:
        os.unlink(path)
        unlinked.set()
        release.wait(10)

    monkeypatch.setattr(compaction, "_unlink", slow_unlink)
    s.journal.compact([], s.queue.ring)
    assert unlinked.wait(10)
    try:
        assert not s.journal.files_lost()
    finally:
        release.set()
    s.journal.wait_compaction()
    assert not s.journal.files_lost()
    assert s.restarted() == s.expected


def held_in_its_fsync(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """(writing, release): a heal's snapshot, once written, waits in its fsync (``writing``
    set) until ``release`` is set."""
    writing, release = threading.Event(), threading.Event()
    real_fsync = compaction._fsync_file

    def slow_fsync(fd: int) -> None:
        writing.set()
        release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(compaction, "_fsync_file", slow_fsync)
    return writing, release


@pytest.mark.usefixtures("codec")
def test_appends_made_while_a_heal_writes_sync_in_the_new_segment(tmp_path, monkeypatch):
    """While the live state is being written again, new appends go to a new segment in the
    directory made again: their sync must not wait on (and fail with) the deleted files,
    whose contents the snapshot holds."""
    s = Scenario(tmp_path / "q")
    s.add(20)
    writing, release = held_in_its_fsync(monkeypatch)
    delete_journal(s.directory, "directory")
    assert s.journal.files_lost()
    s.heal()
    assert writing.wait(10)
    try:
        s.add(5)
        s.journal.sync()  # the new segment and the directory made again; not the deleted ones
    finally:
        release.set()
    s.journal.wait_compaction()
    assert not s.journal.files_lost()
    assert s.restarted() == s.expected


@pytest.mark.usefixtures("codec")
def test_closing_during_a_heal_finishes_it_first(tmp_path, monkeypatch, caplog):
    """A stop (the server's shutdown closes every journal) while the live state is being
    written again waits for it: aborted, the state would exist only in the deleted files."""
    s = Scenario(tmp_path / "q")
    s.add(20)
    writing, release = held_in_its_fsync(monkeypatch)
    delete_journal(s.directory, "directory")
    with caplog.at_level(logging.INFO, logger="erq.journal"):
        assert s.journal.files_lost()
        s.heal()
        assert writing.wait(10)
        threading.Timer(0.1, release.set).start()
        s.journal.close()  # waits for the rewrite, then syncs what came after it
    reports = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(reports) == 1 and "was deleted" in reports[0], reports
    assert deleted_files_held(s.directory) == []
    journal, recovery = open_journal(s.directory)
    try:
        assert all_items(journal, recovery) == s.expected
    finally:
        journal.close()
