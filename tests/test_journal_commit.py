"""Group commit: one fsync job per loop iteration on the FsyncWorker, tickets that call their
waiters directly, periodic sync, drain and close; and the executor path of systems where
fdatasync does not cover the mapped segments."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import threading
import weakref

import pytest
import uvloop
from test_fsync_worker import started_thread, thread_ended, worker_class, worker_threads
from test_journal_support import item, use_codec

import erq.journal.fsync_worker as fsync_worker
from erq.config import Config
from erq.journal import GroupCommit, JournalError, QueueJournal, Ticket, compaction

from conftest import impl_module


@pytest.fixture
def codec(impl, monkeypatch):
    """The journal codec and the FsyncWorker of ``impl``."""
    monkeypatch.setattr(fsync_worker, "FsyncWorker", worker_class(impl))
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


async def settled(*tickets: Ticket) -> None:
    """Wait until every ticket resolved, through its waiters (no polling)."""
    loop = asyncio.get_running_loop()
    for ticket in tickets:
        if not ticket.done:
            fut = loop.create_future()
            ticket.add_waiter(lambda _, fut=fut: fut.done() or fut.set_result(None))
            await fut


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class WorkerSpy:
    """Stands in for FsyncWorker in GroupCommit, around the real worker of ``impl``, which
    does the syncing. ``calls`` lists the file (device, inode) of every data descriptor
    synced, ``dir_calls`` every directory; ``jobs`` counts jobs handed over. With
    ``hold`` a job waits for ``release()``. With ``fail`` (True, or a set of file
    identities) its descriptors are swapped for pipe ends when it is released, on which the
    real worker's fdatasync fails with EINVAL."""

    def __init__(self, monkeypatch, impl: str, hold: bool = False, fail=False) -> None:
        self.real_cls = worker_class(impl)
        self.hold = hold
        self.fail = fail
        self.calls: list[tuple[int, int]] = []
        self.dir_calls: list[tuple[int, int]] = []
        self.jobs = 0
        self.workers: list[SpiedWorker] = []
        self._held: list[tuple[SpiedWorker, list[int], list[int]]] = []
        self._entered: list[asyncio.Future] = []
        monkeypatch.setattr(fsync_worker, "FsyncWorker", self._make)

    def _make(self) -> SpiedWorker:
        worker = SpiedWorker(self, self.real_cls())
        self.workers.append(worker)
        return worker

    def _submitted(self, worker: SpiedWorker, fds: list[int], dirs: list[int]) -> None:
        self.calls += [identity(fd) for fd in fds]
        self.dir_calls += [identity(fd) for fd in dirs]
        self.jobs += 1
        for fut in self._entered:
            if not fut.done():
                fut.set_result(None)
        if self.hold:
            self._held.append((worker, fds, dirs))
        else:
            self._forward(worker, fds, dirs)

    def _failing(self, fd: int) -> bool:
        return self.fail is True or (bool(self.fail) and identity(fd) in self.fail)

    def _forward(self, worker: SpiedWorker, fds: list[int], dirs: list[int]) -> None:
        def swap(fd: int) -> int:
            if not self._failing(fd):
                return fd
            r, w = os.pipe()
            os.close(w)
            os.close(fd)
            return r

        worker.real.submit([swap(fd) for fd in fds], [swap(fd) for fd in dirs])

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._forward(*self._held.pop(0))

    async def wait_jobs(self, total: int) -> None:
        """Until ``total`` jobs in all were handed over."""
        while self.jobs < total:
            fut = asyncio.get_running_loop().create_future()
            self._entered.append(fut)
            await fut
            self._entered.remove(fut)


class SpiedWorker:
    def __init__(self, spy: WorkerSpy, real) -> None:
        self.spy = spy
        self.real = real

    def fileno(self) -> int:
        return self.real.fileno()

    def submit(self, fds: list[int], dirs: list[int]) -> None:
        self.spy._submitted(self, fds, dirs)

    def collect(self, wait: bool = False):
        return self.real.collect(wait)

    def close(self) -> None:
        self.real.close()


def open_journals(tmp_path, commit, n, fsync="always"):
    return [QueueJournal.open(tmp_path / f"q{k}", fsync=fsync, commit=commit)[0] for k in range(n)]


def segment_identity(journal) -> tuple[int, int]:
    return identity(journal._segments[-1].fileno())


def test_a_ticket_calls_its_waiters_in_order_once_and_survives_a_broken_one(codec, caplog):
    ticket = codec.Ticket()
    assert (
        not ticket.done and ticket.error is None and repr(ticket) == "<Ticket pending, 0 waiting>"
    )
    calls = []

    def broken(t):
        calls.append("broken")
        raise RuntimeError("a waiter's bug")

    ticket.add_waiter(lambda t: calls.append(("first", t)))
    ticket.add_waiter(broken)
    ticket.add_waiter(lambda t: calls.append(("last", t.error)))
    assert repr(ticket) == "<Ticket pending, 3 waiting>" and calls == []
    error = JournalError("disk gone")
    ticket.resolve(error)
    assert calls == [("first", ticket), "broken", ("last", error)]
    assert "a commit ticket's waiter failed" in caplog.text
    assert ticket.done and ticket.error is error and ticket.waiters == []
    ticket.notify()  # once: the waiters were taken
    assert len(calls) == 3 and repr(ticket) == "<Ticket failed, 0 waiting>"
    ticket.add_waiter(lambda t: calls.append("late"))  # a settled ticket calls it at once
    assert calls[-1] == "late"
    synced = codec.Ticket()
    synced.resolve(None)
    assert repr(synced) == "<Ticket synced, 0 waiting>"


def test_appends_in_one_iteration_share_one_fsync_job(codec, impl, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        journals = open_journals(tmp_path, commit, 3)
        spy = WorkerSpy(monkeypatch, impl)
        synced_before_resolve = []
        tickets = []
        for i in range(300):
            ticket = journals[i % 3].add(i + 1, 0, 0, 0, b"item %d" % i)
            tickets.append(ticket)
        for j in journals:
            tickets.append(j.remove(1))
        assert len({id(t) for t in tickets}) == 3  # one ticket per journal and batch
        assert all(isinstance(t, codec.Ticket) and not t.done for t in tickets)
        for t in set(tickets):
            t.add_waiter(lambda _: synced_before_resolve.append(spy.jobs))
        await settled(*tickets)
        assert commit.batches == 1 and spy.jobs == 1
        assert sorted(spy.calls) == sorted(segment_identity(j) for j in journals)
        assert synced_before_resolve == [1, 1, 1]  # tickets resolve after the job
        assert all(t.error is None for t in tickets)
        for j in journals:
            j.close()
        commit.close()

    run(main())


def test_writes_during_a_running_fsync_wait_for_the_next_one(
    codec, impl, tmp_path, monkeypatch, run
):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = WorkerSpy(monkeypatch, impl, hold=True)
        first = journal.add(1, 0, 0, 0, b"a")
        await spy.wait_jobs(1)  # batch 1 is with the worker
        second = journal.add(2, 0, 0, 0, b"b")
        third = journal.add(3, 0, 0, 0, b"c")
        assert second is third and second is not first
        assert commit.batches == 1
        at_first = []
        first.add_waiter(lambda _: at_first.append((commit.batches, spy.jobs, second.done)))
        spy.release()
        await settled(first)
        # the first batch's waiters ran before the next batch started (it starts after the
        # loop's next pass, so that the writers just answered can join it)
        assert at_first == [(1, 1, False)]
        await spy.wait_jobs(2)
        spy.release()
        await settled(second)
        assert len(spy.calls) == 2 and second.error is None
        journal.close()
        commit.close()

    run(main())


def test_a_writer_answered_by_a_batch_joins_the_writes_that_waited_during_it(
    codec, impl, tmp_path, monkeypatch, run
):
    """Fifty writers must not split into two cohorts that take turns, each waiting for two
    fsyncs: the write that an answered client sends at once joins the next batch together
    with the writes that waited during the sync."""

    async def main():
        loop = asyncio.get_running_loop()
        commit = GroupCommit(loop)
        answered, waited = open_journals(tmp_path, commit, 2)
        spy = WorkerSpy(monkeypatch, impl, hold=True)
        first = answered.add(1, 0, 0, 0, b"a")
        await spy.wait_jobs(1)
        waiting = waited.add(1, 0, 0, 0, b"b")  # arrives while batch 1 syncs
        again: list[Ticket] = []

        def client_writes_again(_: Ticket) -> None:  # its next write, an iteration later
            loop.call_soon(lambda: again.append(answered.add(2, 0, 0, 0, b"c")))

        first.add_waiter(client_writes_again)
        spy.release()
        await spy.wait_jobs(2)
        assert len(again) == 1 and not waiting.done
        assert sorted(spy.calls[1:]) == sorted(
            [segment_identity(answered), segment_identity(waited)]
        )
        spy.release()
        await settled(waiting, again[0])
        assert commit.batches == 2 and spy.jobs == 2
        assert waiting.error is None and again[0].error is None
        answered.close()
        waited.close()
        commit.close()

    run(main())


class PwriteSpy:
    """Records os.pwrite calls made from Python, as (file identity, offset, bytes)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[tuple[int, int], int, int]] = []
        real = os.pwrite

        def pwrite(fd: int, data, offset: int) -> int:
            self.calls.append((identity(fd), offset, len(data)))
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)


def test_a_failed_fsync_fails_its_tickets_and_the_retry_writes_the_data_again(
    codec, impl, tmp_path, monkeypatch, run, caplog
):
    """After a failed fdatasync the kernel holds the data in clean pages, which the next
    fdatasync would not write: the retry writes everything since the last good sync again
    (through the executor, whose sync does that), then batches go back to the worker. The
    failure and the recovery are logged, as a periodic sync's are (a group commit's were
    answered SERVER_ERROR, counted, and not logged)."""

    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = WorkerSpy(monkeypatch, impl, fail=True)
        ticket = journal.add(1, 0, 0, 0, b"a")
        await settled(ticket)
        assert isinstance(ticket.error, JournalError)
        assert "fsync" in str(ticket.error) and os.strerror(errno.EINVAL) in str(ticket.error)
        assert journal.sync_errors == 1
        spy.fail = False
        written = PwriteSpy(monkeypatch)
        retry = journal.add(2, 0, 0, 0, b"b")
        end = journal._writer.position
        await settled(retry)
        assert retry.error is None
        assert spy.jobs == 1  # the retry was not the worker's
        segment = segment_identity(journal)
        assert [call for call in written.calls if call[0] == segment] == [(segment, 0, end)]
        third = journal.add(3, 0, 0, 0, b"c")
        await settled(third)
        assert third.error is None and spy.jobs == 2 and spy.calls == [segment, segment]
        assert [call for call in written.calls if call[0] == segment] == [(segment, 0, end)]
        journal.close()
        commit.close()

    with caplog.at_level("WARNING", logger="erq.journal"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if "fsync of" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "failed" in lines[0] and os.strerror(errno.EINVAL) in lines[0]
    assert "works again, after 1 failed" in lines[1]


def test_a_batch_with_no_descriptor_for_its_copies_syncs_in_the_executor(
    codec, impl, tmp_path, monkeypatch, run
):
    """The worker syncs copies of the segments' descriptors; where the process has none left
    (EMFILE), the batch goes to the executor, which syncs through the segments' own, and its
    tickets succeed instead of failing (every set of that batch answered SERVER_ERROR)."""
    import errno

    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        journals = open_journals(tmp_path, commit, 3)
        spy = WorkerSpy(monkeypatch, impl)
        await settled(*[j.add(1, 0, 0, 0, b"a") for j in journals])  # the worker is running
        assert spy.jobs == 1
        copies = [0]

        def dup(fd):
            copies[0] += 1
            if copies[0] == 2:  # the second journal's copy finds none left
                raise OSError(errno.EMFILE, "Too many open files")
            return real_dup(fd)

        real_dup = os.dup
        open_before = len(os.listdir("/proc/self/fd"))
        monkeypatch.setattr(os, "dup", dup)
        tickets = [j.add(2, 0, 0, 0, b"b") for j in journals]
        await settled(*tickets)
        assert all(t.error is None for t in tickets)
        assert copies[0] == 2, copies
        assert spy.jobs == 1  # not the worker's: the executor's
        monkeypatch.undo()
        for j in journals:
            assert j.take_dirty().empty  # all of it synced
        assert len(os.listdir("/proc/self/fd")) == open_before  # the first copy was closed
        for j in journals:
            j.close()
        commit.close()

    run(main())


def test_a_failure_fails_only_the_journals_it_hit(codec, impl, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        good, bad = open_journals(tmp_path, commit, 2)
        spy = WorkerSpy(monkeypatch, impl)
        await settled(good.add(1, 0, 0, 0, b"a"), bad.add(1, 0, 0, 0, b"a"))
        spy.fail = {segment_identity(bad)}
        good_ticket = good.add(2, 0, 0, 0, b"b")
        bad_ticket = bad.add(2, 0, 0, 0, b"b")
        seen = []
        # The first waiter of the batch sees every ticket of the batch settled already: a
        # session waits only for its latest ticket and may then answer for earlier ones.
        good_ticket.add_waiter(lambda _: seen.append((bad_ticket.done, bad_ticket.error)))
        await settled(good_ticket, bad_ticket)
        assert spy.jobs == 2
        assert good_ticket.error is None
        assert isinstance(bad_ticket.error, JournalError) and str(bad.directory) in str(
            bad_ticket.error
        )
        assert seen == [(True, bad_ticket.error)]
        assert good.take_dirty().empty and not bad.take_dirty().empty  # kept for the retry
        for j in (good, bad):
            j.close()
        commit.close()

    run(main())


def test_a_session_holds_its_replies_until_the_batch_and_fails_those_it_hit(
    codec, impl, tmp_path, monkeypatch, run
):
    session_mod = impl_module(impl, "_session", "_session_py")
    state_mod = impl_module(impl, "_state", "_state_py")
    queues_mod = impl_module(impl, "_queues", "_queues_py")

    async def main():
        loop = asyncio.get_running_loop()
        commit = GroupCommit(loop)
        j1, j2 = open_journals(tmp_path, commit, 2)
        spy = WorkerSpy(monkeypatch, impl)
        await settled(j1.add(1, 0, 0, 0, b"a"), j2.add(1, 0, 0, 0, b"a"))
        spy.hold, spy.fail = True, {segment_identity(j2)}
        state = state_mod.ServerState(Config(), queues_mod.QueueCollection(Config(), None), loop)
        written = []
        session = session_mod.Session(state, None, written.append, lambda: None)
        # j1 first in the batch, then j2; the last reply waits for j1's ticket again
        t1, t2 = j1.add(2, 0, 0, 0, b"x"), j2.add(2, 0, 0, 0, b"x")
        session.hold_for([t1], b"ONE\r\n")
        session.hold_for([t2], b"TWO\r\n")
        session.hold_for([j1.add(3, 0, 0, 0, b"x")], b"THREE\r\n")
        session.out.append(b"PLAIN\r\n")
        session.flush()
        assert written == []
        await spy.wait_jobs(2)
        assert written == []  # the job has not finished
        spy.release()
        await settled(t1, t2)  # the session's waiter came first
        assert written == [b"ONE\r\nSERVER_ERROR journal sync failed\r\nTHREE\r\nPLAIN\r\n"]
        for j in (j1, j2):
            j.close()
        commit.close()

    run(main())


def test_periodic_fsync_runs_on_a_timer_and_appends_get_no_ticket(
    codec, tmp_path, monkeypatch, run
):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1, fsync=1)
        spy = FdatasyncSpy(monkeypatch)
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


def test_periodic_syncs_due_together_go_to_the_executor_as_one_job_per_thread(
    codec, tmp_path, monkeypatch, run
):
    """Journals whose timers fire in one pass of the loop (a set to each of thousands of
    queues) are synced by a few executor jobs, one per thread, not one job each: a submit per
    journal stalled the loop for 0.4-1.2 s at 4,096-9,000 queues."""

    async def main():
        commit = GroupCommit(asyncio.get_running_loop(), max_workers=2)
        journals = open_journals(tmp_path, commit, 7, fsync=60_000)  # timers fired by hand
        submitted = []
        real_submit = commit._executor.submit
        monkeypatch.setattr(
            commit._executor,
            "submit",
            lambda fn, *args: (submitted.append(args), real_submit(fn, *args))[1],
        )
        spy = FdatasyncSpy(monkeypatch)
        for n, journal in enumerate(journals):
            journal.add(n + 1, 0, 0, 0, b"x")
        for journal in journals:  # their timers fire in one pass of the loop
            commit._periodic(journal)
        await spy.wait_entered(7)  # each journal synced once
        assert [len(work) for (work,) in submitted] == [4, 3]
        assert sorted(id(j) for (work,) in submitted for j, _ in work) == sorted(map(id, journals))
        for journal in journals:
            journal.close()
        commit.close()

    run(main())


def test_never_does_not_fsync_until_close(codec, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1, fsync="never")
        spy = FdatasyncSpy(monkeypatch)
        for i in range(50):
            assert journal.add(i + 1, 0, 0, 0, b"n") is None
        await asyncio.sleep(0)
        assert spy.calls == []
        journal.close()
        assert len(spy.calls) == 1
        commit.close()

    run(main())


def test_drain_finishes_batches_and_syncs_every_journal(codec, impl, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        always, never = open_journals(tmp_path, commit, 2)
        never.update_policy(fsync="never")
        periodic = QueueJournal.open(tmp_path / "p", fsync=60_000, commit=commit)[0]
        spy = WorkerSpy(monkeypatch, impl)
        direct = FdatasyncSpy(monkeypatch)  # the final sync runs in the executor
        ticket = always.add(1, 0, 0, 0, b"a")
        never.add(1, 0, 0, 0, b"b")
        periodic.add(1, 0, 0, 0, b"c")
        await commit.drain()
        assert ticket.done and ticket.error is None
        assert spy.calls == [segment_identity(always)] and len(direct.calls) == 2
        for j in (always, never, periodic):
            j.close()  # nothing left to sync
        assert len(direct.calls) == 2
        commit.close()

    run(main())


def test_close_syncs_registered_journals_and_later_tickets_sync_inline(
    codec, tmp_path, monkeypatch, run
):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1, fsync="never")
        spy = FdatasyncSpy(monkeypatch)
        journal.add(1, 0, 0, 0, b"a")
        commit.close()
        assert len(spy.calls) == 1
        journal.update_policy(fsync="always")
        ticket = journal.add(2, 0, 0, 0, b"b")
        assert ticket.done and ticket.error is None and len(spy.calls) == 2
        journal.close()

    run(main())


def test_an_append_after_close_never_joins_the_ticket_close_answered(
    codec, tmp_path, monkeypatch, run
):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = FdatasyncSpy(monkeypatch)
        pending = journal.add(1, 0, 0, 0, b"a")  # its batch has not started
        assert journal.add(2, 0, 0, 0, b"b") is pending  # appends join it meanwhile
        commit.close()  # answers it with a sync on this thread
        assert pending.done and pending.error is None and len(spy.calls) == 1
        later = journal.add(3, 0, 0, 0, b"c")
        # a new ticket, answered by a sync that covers the new record
        assert later is not pending
        assert later.done and later.error is None and len(spy.calls) == 2
        journal.close()

    run(main())


def test_rotation_inside_a_batch_syncs_both_segments_and_the_directory(
    codec, impl, tmp_path, monkeypatch, run
):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        journal = QueueJournal.open(
            tmp_path / "q", fsync="always", segment_size=4096, commit=commit
        )[0]
        spy = WorkerSpy(monkeypatch, impl)
        await settled(journal.add(1, 0, 0, 0, b"x"))
        del spy.calls[:], spy.dir_calls[:]
        tickets = [journal.add(i, 0, 0, 0, b"y" * 1000) for i in range(2, 6)]  # crosses a segment
        await settled(*tickets)
        assert journal.segment_count == 2 and spy.jobs == 2
        assert len(set(spy.calls)) == 2
        directory = os.open(journal.directory, os.O_RDONLY)
        assert spy.dir_calls == [identity(directory)]
        os.close(directory)
        journal.close()
        commit.close()

    run(main())


def test_a_journal_found_at_start_syncs_its_directory_and_their_parent_with_its_first_write(
    codec, impl, tmp_path, monkeypatch, run
):
    """Its names may never have been synced: the server that made them was killed first."""

    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        spy = WorkerSpy(monkeypatch, impl)
        journal = QueueJournal.open(tmp_path / "q", fsync="always", commit=commit)[0]
        await settled(journal.add(1, 0, 0, 0, b"x"))
        journal.close()
        del spy.calls[:], spy.dir_calls[:]
        journal = QueueJournal.open(tmp_path / "q", fsync="always", commit=commit)[0]
        await settled(journal.add(2, 0, 0, 0, b"y"))
        await settled(journal.add(3, 0, 0, 0, b"z"))
        dirs = [(st.st_dev, st.st_ino) for st in map(os.stat, (tmp_path / "q", tmp_path))]
        assert sorted(spy.dir_calls) == sorted(dirs), (spy.dir_calls, dirs)  # once, the first
        journal.close()
        commit.close()

    run(main())


def test_a_closed_segment_is_skipped_and_a_reused_number_is_never_synced(
    codec, impl, tmp_path, monkeypatch, run
):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = WorkerSpy(monkeypatch, impl, hold=True)
        first = journal.add(1, 0, 0, 0, b"a")
        await spy.wait_jobs(1)
        segment_file = segment_identity(journal)
        number = journal._segments[-1].fileno()
        journal.close()  # closes the segment while its batch is with the worker
        other = os.open(tmp_path / "other", os.O_CREAT | os.O_RDWR)
        assert other == number  # the number now names another file
        spy.release()
        await settled(first)
        assert first.error is None and spy.calls == [segment_file]  # the duplicate synced
        os.close(other)
        commit.close()

    run(main())


def test_batches_run_on_one_reused_worker_that_close_stops(codec, impl, tmp_path, monkeypatch, run):
    async def main():
        before = worker_threads(impl)
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = WorkerSpy(monkeypatch, impl)
        for i in range(5):  # one batch each: the next append waits for the previous sync
            await settled(journal.add(i + 1, 0, 0, 0, b"x"))
        assert commit.batches == 5 and spy.jobs == 5 and len(spy.workers) == 1
        thread = started_thread(impl, before)
        journal.close()
        commit.close()
        assert thread_ended(impl, thread)

    run(main())


def test_finished_batches_reach_the_loop_through_the_worker_descriptor_only(
    codec, tmp_path, monkeypatch
):
    loop = asyncio.new_event_loop()  # a pure-Python loop, whose methods can be wrapped
    threadsafe = []
    real = loop.call_soon_threadsafe
    monkeypatch.setattr(
        loop,
        "call_soon_threadsafe",
        lambda *a, **kw: threadsafe.append(threading.current_thread().name) or real(*a, **kw),
    )

    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        journals = open_journals(tmp_path, commit, 3)
        for j in journals:
            await settled(j.add(1, 0, 0, 0, b"x"))
        batches = commit.batches
        for _ in range(4):
            tickets = [j.add(2, 0, 0, 0, b"y") for j in journals for _ in range(10)]
            await settled(*tickets)
        assert commit.batches - batches == 4
        assert threadsafe == []
        for j in journals:
            j.close()
        commit.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_the_end_of_a_batch_calls_every_waiter_before_any_other_callback(
    codec, tmp_path, monkeypatch, run
):
    async def main():
        loop = asyncio.get_running_loop()
        commit = GroupCommit(loop)
        journals = open_journals(tmp_path, commit, 3)
        called = []
        at_next_callback = []
        tickets = [j.add(1, 0, 0, 0, b"x") for j in journals]
        tickets[0].add_waiter(
            lambda _: loop.call_soon(lambda: at_next_callback.append(len(called)))
        )
        for k in range(30):
            tickets[k % 3].add_waiter(lambda _, k=k: called.append(k))
        await settled(*tickets)
        assert at_next_callback == [30]
        assert called == list(range(0, 30, 3)) + list(range(1, 30, 3)) + list(range(2, 30, 3))
        for j in journals:
            j.close()
        commit.close()

    run(main())


async def second_batch_held(tmp_path, monkeypatch, impl):
    """One journal whose first append has synced, and the batch of its second held in the
    worker: (commit, journal, spy, the second append's ticket)."""
    commit = GroupCommit(asyncio.get_running_loop())
    (journal,) = open_journals(tmp_path, commit, 1)
    spy = WorkerSpy(monkeypatch, impl)
    await settled(journal.add(1, 0, 0, 0, b"a"))
    spy.hold = True
    ticket = journal.add(2, 0, 0, 0, b"b")
    await spy.wait_jobs(2)
    return commit, journal, spy, ticket


def test_close_answers_the_batch_that_is_still_syncing(codec, impl, tmp_path, monkeypatch, run):
    async def main():
        commit, journal, spy, ticket = await second_batch_held(tmp_path, monkeypatch, impl)
        spy.hold = False
        spy.release()  # the sync may end while the loop is inside close(), not yet told
        commit.close()
        assert ticket.done and ticket.error is None
        journal.close()

    run(main())


def test_a_segment_deleted_while_it_syncs_fails_the_batch_unless_erq_deleted_it(
    codec, impl, tmp_path, monkeypatch, run
):
    """The sync tells a file deleted under the server (no restart can find what it holds:
    the writes fail) from one that erq itself released or replaced while the sync ran (its
    records were consumed, or are in the snapshot that replaced it: the writes stand)."""

    async def main():
        commit, journal, spy, ticket = await second_batch_held(tmp_path, monkeypatch, impl)
        # erq releases the segment the batch is syncing (its head moved past it).
        old = journal._segments[-1]
        journal._rotate(0)
        journal._delete_oldest([old])
        spy.hold = False
        spy.release()
        await settled(ticket)
        assert ticket.error is None
        # Someone else deletes the segment the batch is syncing.
        spy.hold = True
        ticket = journal.add(3, 0, 0, 0, b"c")
        await spy.wait_jobs(3)
        os.unlink(journal._segments[-1].path)
        spy.hold = False
        spy.release()
        await settled(ticket)
        assert isinstance(ticket.error, JournalError), ticket
        assert os.strerror(errno.ENOENT) in str(ticket.error)
        commit.close()
        with pytest.raises(JournalError):  # its final sync says so too
            journal.close()

    run(main())


def unlink_held_by_compaction(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Compaction jobs stop after deleting an old segment: (deleted, go on)."""
    unlinked = threading.Event()
    go_on = threading.Event()
    real_unlink = compaction._unlink

    def unlink(path):
        real_unlink(path)
        unlinked.set()
        go_on.wait(30)

    monkeypatch.setattr(compaction, "_unlink", unlink)
    return unlinked, go_on


async def compacted_under_the_sync(journal, spy, ticket, unlinked, go_on) -> None:
    """A compaction seals the segment whose sync ``spy`` holds and deletes it (its snapshot
    in place) before the loop swaps the snapshot in; then the sync goes on: it fails nothing."""
    old = journal._segments[-1]
    journal.compact([], [item(1, 1), item(2, 1)])
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, unlinked.wait, 30)
    assert not old.closed and not os.path.exists(old.path)
    spy.hold = False
    spy.release()
    try:
        await settled(ticket)
    finally:
        go_on.set()
    assert ticket.error is None, ticket.error
    journal.wait_compaction()
    assert journal.last_compaction_error is None and journal.sync_errors == 0


def test_a_segment_a_compaction_deleted_while_it_synced_fails_nothing(
    codec, impl, tmp_path, monkeypatch, run
):
    """A compaction deletes the old segments on its own thread once its snapshot is durable,
    before the loop swaps it in: a batch syncing one of them meanwhile found it deleted and
    failed its writes, which the snapshot holds (SERVER_ERROR journal sync failed for sets
    that were stored, and for every set fanned out to that queue)."""
    unlinked, go_on = unlink_held_by_compaction(monkeypatch)

    async def main():
        commit, journal, spy, ticket = await second_batch_held(tmp_path, monkeypatch, impl)

        await compacted_under_the_sync(journal, spy, ticket, unlinked, go_on)
        commit.close()
        journal.close()

    run(main())


def test_a_sync_ending_while_the_loop_swaps_a_compaction_in_fails_nothing(
    codec, tmp_path, monkeypatch
):
    """The periodic sync of a segment a compaction deleted can end just as the loop swaps
    the snapshot in: the job is no longer the journal's and the segment not yet closed
    (close waits for the sync's lock). The segment was replaced all the same: no failure
    (it logged "periodic fsync ... failed: deleted while the server runs" and counted a
    sync error under fsync = "100ms" whenever a compaction ended during a sync)."""
    unlinked, go_on = unlink_held_by_compaction(monkeypatch)
    journal, _ = QueueJournal.open(tmp_path / "q", fsync=100)
    journal.add(1, 0, 0, 0, b"a")  # synced at once (no group commit: the first append)
    journal.add(2, 0, 0, 0, b"b")  # waits for the period
    work = journal.take_dirty()
    old = journal._segments[-1]
    assert work.segments == [old]
    journal.compact([], [item(1, 1), item(2, 1)])
    assert unlinked.wait(30)
    job, journal._job = journal._job, None  # the swap has begun on the loop
    try:
        assert not old.closed
        journal.sync_work(work)
    finally:
        go_on.set()
        job.join()
        journal._job = job
    journal.wait_compaction()
    assert old.closed and journal.last_compaction_error is None
    journal.close()


def test_a_failed_final_sync_is_tried_again_by_close_which_writes_the_data_again(
    codec, tmp_path, monkeypatch, run, caplog
):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        journal = QueueJournal.open(tmp_path / "p", fsync=60_000, commit=commit)[0]
        journal.add(1, 0, 0, 0, b"a")
        end = journal._writer.position
        segment = segment_identity(journal)
        direct = FdatasyncSpy(monkeypatch, fail=True)
        await commit.drain()
        assert journal.sync_errors == 1
        direct.fail = False
        written = PwriteSpy(monkeypatch)
        commit.close()
        assert len(direct.calls) == 2
        assert [call for call in written.calls if call[0] == segment] == [(segment, 0, end)]
        journal.close()  # nothing left to sync
        assert len(direct.calls) == 2

    with caplog.at_level("ERROR", logger="erq.journal"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert (
        len(lines) == 1 and "fsync of" in lines[0] and "at shutdown; trying once more" in lines[0]
    )


def test_drain_waits_for_the_batch_in_flight_and_the_one_behind_it(
    codec, impl, tmp_path, monkeypatch, run
):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = WorkerSpy(monkeypatch, impl, hold=True)
        first = journal.add(1, 0, 0, 0, b"a")
        await spy.wait_jobs(1)
        second = journal.add(2, 0, 0, 0, b"b")  # waits behind the running batch
        drain = asyncio.ensure_future(commit.drain())
        await asyncio.sleep(0)
        assert not drain.done()
        spy.release()
        await spy.wait_jobs(2)  # the second batch started after the first ended
        assert commit.batches == 2 and first.done and not second.done
        spy.release()
        spy.hold = False
        await drain
        assert first.done and second.done and second.error is None
        journal.close()
        commit.close()

    run(main())


def test_a_failed_batch_does_not_stop_the_next_one(codec, impl, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = WorkerSpy(monkeypatch, impl, hold=True, fail=True)
        first = journal.add(1, 0, 0, 0, b"a")
        await spy.wait_jobs(1)
        second = journal.add(2, 0, 0, 0, b"b")
        spy.release()
        await settled(first)
        assert isinstance(first.error, JournalError)
        # The second batch starts at once, with the failed work, which the executor writes
        # again before it syncs (the worker, still failing, never sees it).
        await settled(second)
        assert second.error is None
        assert spy.jobs == 1
        assert journal.take_dirty().empty  # nothing left to retry
        journal.close()
        commit.close()

    run(main())


def test_a_group_commit_dropped_without_close_stops_its_worker(codec, impl, tmp_path, run):
    async def main():
        before = worker_threads(impl)
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1)
        await settled(journal.add(1, 0, 0, 0, b"a"))
        thread = started_thread(impl, before)
        journal.close()
        ref = weakref.ref(commit)
        del journal, commit
        gc.collect()
        assert ref() is None  # the loop's reader does not keep it alive
        assert thread_ended(impl, thread)
        await asyncio.sleep(0)  # the loop goes on without the reader

    run(main())


# ---- the executor path (where fdatasync does not cover the mapped segments) ----------------


class FdatasyncSpy:
    """Records os.fdatasync calls made from Python (then makes them). With ``hold``, each
    call waits for ``release()``; ``entered`` counts calls that started."""

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


def test_executor_path_batches_fail_retry_and_finish_in_order(codec, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop(), use_worker=False)
        journals = open_journals(tmp_path, commit, 2)
        spy = FdatasyncSpy(monkeypatch, hold=True, fail=True)
        first = [j.add(1, 0, 0, 0, b"a") for j in journals]
        await spy.wait_entered()
        second = journals[0].add(2, 0, 0, 0, b"b")
        at_first = []
        first[0].add_waiter(lambda _: at_first.append((commit.batches, second.done)))
        spy.release()
        await spy.wait_entered()  # the other journal of the first batch
        spy.release()
        await settled(*first)
        assert all(isinstance(t.error, JournalError) for t in first)
        assert at_first == [(1, False)]  # the waiters ran before the next batch started
        await spy.wait_entered()
        spy.fail = False
        spy.hold = False
        spy.release()
        await settled(second)
        assert second.error is None and len(spy.calls) == 3  # two failed, one retried
        assert journals[0].take_dirty().empty
        for j in journals:
            j.close()
        commit.close()

    run(main())


def test_executor_path_close_answers_the_batch_in_flight(codec, tmp_path, monkeypatch, run):
    async def main():
        commit = GroupCommit(asyncio.get_running_loop(), use_worker=False)
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = FdatasyncSpy(monkeypatch, hold=True)
        ticket = journal.add(1, 0, 0, 0, b"a")
        await spy.wait_entered()
        spy.hold = False
        spy.release()
        commit.close()
        assert ticket.done and ticket.error is None
        journal.close()

    run(main())


def test_executor_path_a_segment_a_compaction_deleted_while_it_synced_fails_nothing(
    codec, tmp_path, monkeypatch, run
):
    unlinked, go_on = unlink_held_by_compaction(monkeypatch)

    async def main():
        commit = GroupCommit(asyncio.get_running_loop(), use_worker=False)
        (journal,) = open_journals(tmp_path, commit, 1)
        await settled(journal.add(1, 0, 0, 0, b"a"))
        spy = FdatasyncSpy(monkeypatch, hold=True)
        ticket = journal.add(2, 0, 0, 0, b"b")
        await spy.wait_entered()

        await compacted_under_the_sync(journal, spy, ticket, unlinked, go_on)
        commit.close()
        journal.close()

    run(main())


def test_a_worker_that_cannot_start_leaves_the_batches_to_the_executor(
    codec, tmp_path, monkeypatch, run, caplog
):
    def no_worker():
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(fsync_worker, "FsyncWorker", no_worker)

    async def main():
        commit = GroupCommit(asyncio.get_running_loop(), use_worker=True)
        (journal,) = open_journals(tmp_path, commit, 1)
        spy = FdatasyncSpy(monkeypatch)
        for i in range(3):
            ticket = journal.add(i + 1, 0, 0, 0, b"x")
            await settled(ticket)
            assert ticket.error is None
        assert commit.batches == 3 and len(spy.calls) == 3
        journal.close()
        commit.close()

    run(main())
    assert "cannot start the fsync worker" in caplog.text


@pytest.mark.parametrize("fsync", ["always", 100])
def test_deleting_a_journal_leaves_its_files_to_a_thread(codec, tmp_path, monkeypatch, run, fsync):
    """Only the rename runs on the loop (and its sync under always, whose writes all wait for
    one): the removal of the files, a disk flush and an unlink each, goes to a thread of its
    own."""
    from erq import datadir

    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        journal = QueueJournal.open(tmp_path / "q", fsync=fsync, commit=commit)[0]
        ticket = journal.add(1, 0, 0, 0, b"x")
        if ticket is not None:
            await settled(ticket)
        synced_on, removed_on = [], []
        sync, remove = datadir.fsync_directory, datadir._remove_tree
        monkeypatch.setattr(
            datadir, "fsync_directory", lambda d: (synced_on.append(threading.get_ident()), sync(d))
        )
        monkeypatch.setattr(
            datadir,
            "_remove_tree",
            lambda d: (removed_on.append(threading.current_thread().name), remove(d)),
        )
        journal.delete()
        assert not (tmp_path / "q").exists()
        commit.close()  # waits for the executor's work
        loop_thread = threading.get_ident()
        assert len(synced_on) == 1 and (synced_on[0] == loop_thread) == (fsync == "always")
        # Not the executor's threads (erq-fsync), which the periodic fsyncs wait for.
        assert len(removed_on) == 1 and removed_on[0].startswith("erq-bg"), removed_on
        assert list(tmp_path.iterdir()) == []

    run(main())


def test_failing_periodic_fsyncs_are_logged_once_then_their_recovery(
    codec, tmp_path, monkeypatch, run, caplog
):
    """A periodic fsync that keeps failing is retried every period; it logged a warning each
    time (an audit: 49 lines in 6 s for a deleted data directory), now one for the streak
    and one when a sync works again."""

    async def main():
        commit = GroupCommit(asyncio.get_running_loop())
        (journal,) = open_journals(tmp_path, commit, 1, fsync=1)
        spy = FdatasyncSpy(monkeypatch, fail=True)
        journal.add(1, 0, 0, 0, b"a")
        await spy.wait_entered(4)  # the first sync and three retries, a period apart
        spy.fail = False
        await spy.wait_entered()
        for _ in range(100):  # its done-callback runs on the loop after the sync returns
            if journal.sync_failures_in_a_row == 0:
                break
            await asyncio.sleep(0.01)
        journal.close()
        commit.close()

    with caplog.at_level("WARNING", logger="erq.journal"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if "fsync of" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "failed" in lines[0] and "injected I/O error" in lines[0]
    assert "works again" in lines[1]
