"""Group commit: one fsync job per loop iteration, tickets, periodic sync, drain and close."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import threading

import pytest
import uvloop
from test_journal_support import use_codec

from erq.journal import GroupCommit, JournalError, QueueJournal


@pytest.fixture
def codec(impl, monkeypatch):
    return use_codec(impl, monkeypatch)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Run a coroutine to completion on a fresh loop of either kind."""

    def _run(coro):
        loop = asyncio.new_event_loop() if request.param == "asyncio" else uvloop.new_event_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()

    return _run


class FsyncSpy:
    """Records os.fdatasync calls (then makes them). With ``hold``, each call waits for
    ``release()``; ``entered`` counts calls that started."""

    def __init__(self, monkeypatch, hold: bool = False, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.hold = hold
        self.fail = fail
        self.entered = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            self.calls.append(fd)
            self.entered.release()
            if self.hold:
                assert self.gate.acquire(timeout=30)
            if self.fail:
                raise OSError(errno.EIO, "injected I/O error")
            real(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    async def wait_entered(self, n: int = 1) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            assert await loop.run_in_executor(None, self.entered.acquire, True, 30)


def open_journals(tmp_path, commit, n, fsync="always"):
    return [QueueJournal.open(tmp_path / f"q{k}", fsync=fsync, commit=commit)[0] for k in range(n)]


def test_appends_in_one_iteration_share_one_fsync_job(codec, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        journals = open_journals(tmp_path, commit, 3)
        spy = FsyncSpy(monkeypatch)
        synced_before_resolve = []
        tickets = []
        for i in range(300):
            ticket = journals[i % 3].add(i + 1, 0, 0, 0, b"item %d" % i)
            tickets.append(ticket)
        for j in journals:
            tickets.append(j.remove(1))
        assert len({id(t) for t in tickets}) == 3  # one ticket per journal and batch
        assert not any(t.done() for t in tickets)
        for t in set(tickets):
            t.add_done_callback(lambda _: synced_before_resolve.append(len(spy.calls)))
        await asyncio.gather(*tickets)
        assert commit.batches == 1
        assert len(spy.calls) == 3  # one fdatasync per journal, not per append
        assert synced_before_resolve == [3, 3, 3]  # tickets resolve after the fsync
        for j in journals:
            j.close()
        commit.close()

    run(main())


def test_writes_during_a_running_fsync_wait_for_the_next_one(codec, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = FsyncSpy(monkeypatch, hold=True)
        first = journal.add(1, 0, 0, 0, b"a")
        await spy.wait_entered()  # batch 1 is inside fdatasync
        second = journal.add(2, 0, 0, 0, b"b")
        third = journal.add(3, 0, 0, 0, b"c")
        assert second is third and second is not first
        assert commit.batches == 1
        spy.release()
        await first
        assert commit.batches == 2 and not second.done()  # batch 2 started, still syncing
        await spy.wait_entered()
        spy.release()
        await second
        assert len(spy.calls) == 2
        journal.close()
        commit.close()

    run(main())


def test_a_failed_fsync_fails_its_tickets_and_is_retried(codec, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = FsyncSpy(monkeypatch, fail=True)
        ticket = journal.add(1, 0, 0, 0, b"a")
        with pytest.raises(JournalError, match="fsync"):
            await ticket
        spy.fail = False
        await journal.add(2, 0, 0, 0, b"b")
        assert len(spy.calls) == 2 and spy.calls[0] == spy.calls[1]
        journal.close()
        commit.close()

    run(main())


def test_periodic_fsync_runs_on_a_timer_and_appends_get_no_ticket(
    codec, tmp_path, monkeypatch, run
):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1, fsync=1)
        spy = FsyncSpy(monkeypatch)
        assert journal.add(1, 0, 0, 0, b"a") is None
        assert journal.add(2, 0, 0, 0, b"b") is None
        await spy.wait_entered()  # the timer fired and synced in a thread
        assert len(spy.calls) == 1
        assert journal.remove(1) is None
        await spy.wait_entered()
        assert len(spy.calls) == 2
        journal.close()
        commit.close()

    run(main())


def test_never_does_not_fsync_until_close(codec, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1, fsync="never")
        spy = FsyncSpy(monkeypatch)
        for i in range(50):
            assert journal.add(i + 1, 0, 0, 0, b"n") is None
        await asyncio.sleep(0)
        assert spy.calls == []
        journal.close()
        assert len(spy.calls) == 1
        commit.close()

    run(main())


def test_drain_finishes_batches_and_syncs_every_journal(codec, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        always, never = open_journals(tmp_path, commit, 2)
        never.update_policy(fsync="never")
        periodic = QueueJournal.open(tmp_path / "p", fsync=60_000, commit=commit)[0]
        spy = FsyncSpy(monkeypatch)
        ticket = always.add(1, 0, 0, 0, b"a")
        never.add(1, 0, 0, 0, b"b")
        periodic.add(1, 0, 0, 0, b"c")
        await commit.drain()
        assert ticket.done() and ticket.exception() is None
        assert len(spy.calls) == 3
        for j in (always, never, periodic):
            j.close()  # nothing left to sync
        assert len(spy.calls) == 3
        commit.close()

    run(main())


def test_close_syncs_registered_journals_and_later_tickets_sync_inline(
    codec, tmp_path, monkeypatch, run
):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1, fsync="never")
        spy = FsyncSpy(monkeypatch)
        journal.add(1, 0, 0, 0, b"a")
        commit.close()
        assert len(spy.calls) == 1
        journal.update_policy(fsync="always")
        ticket = journal.add(2, 0, 0, 0, b"b")
        assert ticket.done() and len(spy.calls) == 2
        journal.close()

    run(main())


def test_rotation_inside_a_batch_syncs_both_segments_and_the_directory(
    codec, tmp_path, monkeypatch, run
):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        journal = QueueJournal.open(
            tmp_path / "q", fsync="always", segment_size=4096, commit=commit
        )[0]
        await journal.add(1, 0, 0, 0, b"x")
        spy = FsyncSpy(monkeypatch)
        dir_syncs = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (dir_syncs.append(fd), real_fsync(fd)))
        tickets = [journal.add(i, 0, 0, 0, b"y" * 1000) for i in range(2, 6)]  # crosses a segment
        await asyncio.gather(*tickets)
        assert journal.segment_count == 2
        assert len(set(spy.calls)) == 2 and len(dir_syncs) == 1
        journal.close()
        commit.close()

    run(main())


def test_batches_run_on_one_reused_thread_that_close_stops(codec, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = FsyncSpy(monkeypatch)
        for i in range(5):  # one batch each: the next append waits for the previous sync
            await journal.add(i + 1, 0, 0, 0, b"x")
        assert commit.batches == 5 and len(spy.calls) == 5
        threads = [t for t in threading.enumerate() if t.name == "erq-group-commit"]
        assert len(threads) == 1
        journal.close()
        commit.close()
        assert not threads[0].is_alive()

    run(main())


def test_each_finished_batch_costs_the_loop_one_threadsafe_callback(codec, tmp_path, monkeypatch):
    loop = asyncio.new_event_loop()  # a pure-Python loop, whose method can be wrapped
    posted = []
    real = loop.call_soon_threadsafe

    def call_soon_threadsafe(callback, *args, **kw):
        posted.append(threading.current_thread().name)
        return real(callback, *args, **kw)

    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        journals = open_journals(tmp_path, commit, 3)
        for j in journals:
            await j.add(1, 0, 0, 0, b"x")
        posted.clear()
        batches = commit.batches
        for _ in range(4):
            tickets = [j.add(2, 0, 0, 0, b"y") for j in journals for _ in range(10)]
            await asyncio.gather(*tickets)
        assert commit.batches - batches == 4
        assert posted == ["erq-group-commit"] * 4
        for j in journals:
            j.close()
        commit.close()

    monkeypatch.setattr(loop, "call_soon_threadsafe", call_soon_threadsafe)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_close_answers_the_batch_that_is_still_syncing(codec, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        await journal.add(1, 0, 0, 0, b"a")
        spy = FsyncSpy(monkeypatch, hold=True)
        ticket = journal.add(2, 0, 0, 0, b"b")
        await spy.wait_entered()
        spy.hold = False
        spy.release()  # the fsync ends while the loop is inside close(), not yet told
        commit.close()
        assert ticket.done() and ticket.exception() is None
        journal.close()

    run(main())


def test_drain_waits_for_the_batch_in_flight_and_the_one_behind_it(
    codec, tmp_path, monkeypatch, run
):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = FsyncSpy(monkeypatch, hold=True)
        first = journal.add(1, 0, 0, 0, b"a")
        await spy.wait_entered()
        second = journal.add(2, 0, 0, 0, b"b")  # waits behind the running batch
        drain = asyncio.ensure_future(commit.drain())
        await asyncio.sleep(0)
        assert not drain.done()
        spy.release()
        await spy.wait_entered()  # the second batch started after the first ended
        assert commit.batches == 2 and first.done() and not second.done()
        spy.release()
        spy.hold = False
        await drain
        assert first.done() and second.done() and second.exception() is None
        journal.close()
        commit.close()

    run(main())


def test_a_failed_batch_does_not_stop_the_next_one(codec, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = FsyncSpy(monkeypatch, hold=True, fail=True)
        first = journal.add(1, 0, 0, 0, b"a")
        await spy.wait_entered()
        second = journal.add(2, 0, 0, 0, b"b")
        spy.release()
        with pytest.raises(JournalError):
            await first
        await spy.wait_entered()  # the second batch started at once, with the failed work
        spy.fail = False
        spy.hold = False
        spy.release()
        await second
        assert len(spy.calls) == 2
        assert journal.take_dirty().empty  # nothing left to retry
        journal.close()
        commit.close()

    run(main())


def test_a_group_commit_dropped_without_close_stops_its_thread(codec, tmp_path, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        await journal.add(1, 0, 0, 0, b"a")
        (thread,) = [t for t in threading.enumerate() if t.name == "erq-group-commit"]
        journal.close()
        del journal, commit
        gc.collect()
        thread.join(timeout=30)
        assert not thread.is_alive()

    run(main())
