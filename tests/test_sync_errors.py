"""A failed fsync is written again, not just retried.

When writeback fails, Linux marks the pages clean with their data never stored and reports
the error to the next fsync; the fsync after that succeeds without writing them. A journal
that only retried the fsync would log that syncing works again while the items acknowledged
before the failure are in memory only, and a power cut loses them. These tests put erq's
data directory on a FUSE file system whose writes fail on demand (tests/failfs.py), make a
sync fail, let a later one succeed, then SIGKILL the server and unmount the file system,
which drops the page cache as a power cut would: every item must come back. The first tests
show the same on the journal alone, with an fdatasync that fails when told to, anywhere.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_journal_support import use_codec

from erq.journal import JournalError, QueueJournal

from conftest import ErqProcess, RawClient
from support import STORED, config, poll

HERE = Path(__file__).resolve().parent
BIG = 10_000  # below the journal's pwrite threshold (written through the mapping), > 2 pages


def _fuse_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "FUSE tests run on Linux"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "needs fusermount3 (Debian: fuse3; ci/test.sh installs it)"
    probe = subprocess.run(
        [sys.executable, "-c", "import mfusepy"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return f"mfusepy does not load (pip install mfusepy; apt-get install fuse3): {probe.stderr}"
    return None


_FUSE_MISSING = _fuse_unavailable()
needs_fuse = pytest.mark.skipif(_FUSE_MISSING is not None, reason=_FUSE_MISSING or "")


# ---- the journal alone -----------------------------------------------------------------------
class Disk:
    """os.fdatasync that fails with EIO while ``failing``; ``writes`` records every os.pwrite
    as (file identity, offset, bytes)."""

    def __init__(self, monkeypatch) -> None:
        self.failing = False
        self.writes: list[tuple[tuple[int, int], int, int]] = []
        real_sync, real_pwrite = os.fdatasync, os.pwrite

        def fdatasync(fd: int) -> None:
            if self.failing:
                raise OSError(errno.EIO, "injected I/O error")
            real_sync(fd)

        def pwrite(fd: int, data, offset: int) -> int:
            st = os.fstat(fd)
            self.writes.append(((st.st_dev, st.st_ino), offset, len(data)))
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "pwrite", pwrite)

    def writes_to(self, segment) -> list[tuple[int, int]]:
        st = os.fstat(segment.fileno())
        return [(at, n) for who, at, n in self.writes if who == (st.st_dev, st.st_ino)]


@pytest.fixture
def journal(impl, tmp_path, monkeypatch):
    use_codec(impl, monkeypatch)
    journal = QueueJournal.open(tmp_path / "q", fsync=100)[0]
    yield journal
    journal.close()


def fail_a_sync(journal: QueueJournal, disk: Disk) -> int:
    """One item synced, then one whose sync fails (left failing); where the good sync ended."""
    journal.add(1, 0, 0, 0, b"a")
    journal.sync()
    good = journal._writer.position
    disk.failing = True
    journal.add(2, 0, 0, 0, b"b" * 100)
    with pytest.raises(JournalError, match="injected I/O error"):
        journal.sync()
    return good


def test_the_sync_after_a_failed_one_writes_everything_since_the_last_good_one(
    journal, monkeypatch
):
    disk = Disk(monkeypatch)
    good = fail_a_sync(journal, disk)
    assert journal.sync_errors == 1
    journal.add(3, 0, 0, 0, b"c")
    end = journal._writer.position
    disk.failing = False
    segment = journal._segments[-1]
    before = len(disk.writes_to(segment))  # its header, written when it was made
    journal.sync()
    assert disk.writes_to(segment)[before:] == [(good, end - good)]
    journal.add(4, 0, 0, 0, b"d")
    journal.sync()  # synced as usual again: nothing written twice
    assert disk.writes_to(segment)[before:] == [(good, end - good)]
    assert journal.sync_errors == 1


def test_records_the_page_cache_lost_after_a_failed_sync_are_logged(journal, monkeypatch, caplog):
    """Clean pages can be reclaimed: if those of a failed sync were, the mapping reads back
    what the disk holds, and the sync that writes them again says which records are lost."""
    disk = Disk(monkeypatch)
    good = fail_a_sync(journal, disk)
    end = journal._writer.position
    segment = journal._segments[-1]
    segment.mm[good + 20 : end] = bytes(end - good - 20)  # as if read back from the disk
    with caplog.at_level(logging.ERROR, logger="erq.journal"):
        with pytest.raises(JournalError):
            journal.sync()  # the disk still fails: the loss is told once, not every retry
        disk.failing = False
        journal.sync()
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"from offset {good} to {end} were lost by a failed fsync" in line
    assert str(segment.path) in line


# ---- a server on a file system whose writes fail ----------------------------------------------


class FailingFS:
    """tests/failfs.py mounted over a backing directory, with its failure switch."""

    def __init__(self, base: Path) -> None:
        self.backing = base / "backing"
        self.mountpoint = base / "mnt"
        self.backing.mkdir()
        self.mountpoint.mkdir()
        self.log = base / "failfs.log"
        self.proc: subprocess.Popen | None = None

    def mount(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "failfs.py"), str(self.backing), str(self.mountpoint)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"failfs did not mount:\n{self.log.read_text()}")
            time.sleep(0.02)

    def unmount(self) -> None:
        """Unmount, which drops the file system's page cache (the server must be stopped)."""
        if self.proc is None:
            return
        if os.path.ismount(self.mountpoint):
            done = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def fail_writes(self, failing: bool) -> None:
        switch = self.backing / ".fail-writes"
        if failing:
            switch.touch()
        else:
            switch.unlink()


@pytest.fixture
def failing_fs(tmp_path: Path):
    fs = FailingFS(tmp_path)
    fs.mount()
    yield fs
    fs.unmount()


@pytest.fixture
def fs_server(impl: str, tmp_path: Path, failing_fs: FailingFS):
    """A factory of one server whose data directory is on the failing file system (its config
    and log stay off it); killed at teardown, before the file system is unmounted."""
    made: list[ErqProcess] = []

    def make(queues: str = "") -> ErqProcess:
        proc = ErqProcess(impl, tmp_path / "data", config(queues=queues))
        proc.data_dir = failing_fs.mountpoint / "data"
        proc.data_dir.mkdir(exist_ok=True)
        made.append(proc)
        return proc.start()

    yield make
    for proc in made:
        proc.kill()


def sync_errors(client: RawClient, queue: str) -> int:
    return int(client.stats()[f"queue_{queue}_journal_sync_errors"])


def drain(client: RawClient, queue: str) -> list[bytes]:
    items = []
    while True:
        reply = client.get(queue)
        if reply == b"END\r\n":
            return items
        head, data, _ = reply.split(b"\r\n", 2)
        assert head.startswith(b"VALUE "), reply
        items.append(data)


def power_cut(server: ErqProcess, fs: FailingFS) -> RawClient:
    """SIGKILL the server, drop the page cache by unmounting, mount again, restart."""
    server.stop(signal.SIGKILL)
    fs.unmount()
    fs.mount()
    server.start()
    return server.client()


@needs_fuse
def test_items_stored_before_a_failed_periodic_sync_survive_a_power_cut(fs_server, failing_fs):
    server = fs_server()
    client = server.client()
    assert client.set("q", b"before") == b"STORED\r\n"
    time.sleep(0.3)  # its periodic sync (100 ms) works
    failing_fs.fail_writes(True)
    items = [b"item %03d " % i + b"x" * 200 for i in range(100)]  # ~5 pages
    for item in items:
        assert client.set("q", item) == b"STORED\r\n"
    poll(lambda: sync_errors(client, "q") >= 1, "a failed periodic sync")
    failing_fs.fail_writes(False)
    poll(lambda: "works again" in server.read_log(), "a periodic sync that works")

    client = power_cut(server, failing_fs)
    assert drain(client, "q") == [b"before", *items]
    assert "damaged" not in server.read_log()


@needs_fuse
def test_an_item_whose_sync_failed_is_kept_and_written_again(fs_server, failing_fs):
    """fsync = "always": the set whose sync failed is answered SERVER_ERROR but stays queued
    (a retrying client may see it twice); the next sync writes it again, so after a power cut
    the queue holds what it held before."""
    server = fs_server('[queues.q]\nfsync = "always"\n')
    client = server.client()
    assert client.set("q", b"first") == b"STORED\r\n"
    failing_fs.fail_writes(True)
    big = b"b" * BIG
    assert client.set("q", big) == b"SERVER_ERROR journal sync failed\r\n"
    assert sync_errors(client, "q") == 1
    failing_fs.fail_writes(False)
    assert client.set("q", b"third") == b"STORED\r\n"
    assert client.set("q", b"fourth") == b"STORED\r\n"  # the fsync worker's path again

    client = power_cut(server, failing_fs)
    assert drain(client, "q") == [b"first", big, b"third", b"fourth"]
    assert "damaged" not in server.read_log()


@needs_fuse
def test_a_stop_whose_last_fsync_fails_closes_every_queue_and_exits_1(fs_server, failing_fs):
    """The last fsync of a graceful stop fails for two queues: both are closed (the first
    failure used to end the shutdown with a traceback, the other queue never closed), the
    log names them, and the exit status tells a supervisor the last writes may be lost."""
    server = fs_server()
    client = server.client()
    for queue in ("a", "b"):
        assert client.set(queue, b"synced") == STORED
    time.sleep(0.3)  # their periodic syncs (100 ms) work
    failing_fs.fail_writes(True)
    for queue in ("a", "b"):
        assert client.set(queue, b"not synced") == STORED
    assert server.stop(signal.SIGTERM) == 1
    log = server.read_log()
    assert "the last writes of 2 queue(s) may not be on disk" in log and ": a, b" in log, log
    assert "Traceback" not in log, log
    failing_fs.fail_writes(False)

    client = power_cut(server, failing_fs)  # (the server is stopped already)
    assert drain(client, "a")[:1] == [b"synced"] and drain(client, "b")[:1] == [b"synced"]
