"""The data directory's own files (erq/datadir.py): one process at a time holds it, a queue's
directory is removed all at once, and an unusable directory fails the start in one line."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from erq import datadir

from conftest import ROOT, ErqProcess
from support import DELETED, END, STORED, one, poll


def second_server(first: ErqProcess) -> ErqProcess:
    """Another server of the same build on the first one's data directory (own log)."""
    other = ErqProcess(first.impl, first.data_dir)
    other.log_path = first.data_dir.parent / "second.log"
    return other


def run_erq(*args: str, impl: str = "c") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ERQ_NO_EXTENSIONS", None)
    if impl == "py":
        env["ERQ_NO_EXTENSIONS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "erq", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_a_second_server_on_the_same_data_directory_is_refused(erq_factory):
    first = erq_factory()
    c = first.client()
    assert c.set("q", b"first") == STORED
    other = second_server(first)
    other.start(wait=False)
    assert other.proc.wait(30) == 1
    log = other.read_log()
    assert "cannot use the data directory" in log and f"pid {first.proc.pid}" in log, log
    assert "Traceback" not in log
    assert c.set("q", b"second") == STORED  # the first server never noticed
    first.kill()  # the kernel drops a killed process's lock: the next start takes it
    other.start()
    c = other.client()
    assert c.get("q") == one("q", b"first")
    assert c.get("q") == one("q", b"second")
    other.stop()


def test_a_lock_file_deleted_under_the_server_is_made_and_locked_again(erq_factory):
    """A tmp cleaner deletes an old erq.lock (it is never written after the start), or an
    rm -r the whole data directory, which the next new queue makes again: a second server
    then made a lock file of its own and started on the journals the first was appending to."""
    first = erq_factory()
    c = first.client()
    assert c.set("q", b"first") == STORED
    for lost in ("the lock file", "the data directory"):
        if lost == "the lock file":
            (first.data_dir / datadir.LOCK_FILE).unlink()
        else:
            shutil.rmtree(first.data_dir)
            assert c.set("new", b"x") == STORED  # makes the data directory again
        poll(lambda: datadir.in_use(first.data_dir), f"the lock taken again after {lost}")
        other = second_server(first)
        other.start(wait=False)
        assert other.proc.wait(30) == 1
        log = other.read_log()
        assert "cannot use the data directory" in log and f"pid {first.proc.pid}" in log, log
    assert "was deleted while the server runs: made and locked again" in first.read_log()
    assert c.set("q", b"second") == STORED


def test_journal_pack_refuses_a_directory_a_server_holds(erq_factory, impl):
    server = erq_factory()
    c = server.client()
    assert c.set("q", b"kept") == STORED
    done = run_erq("journal", "pack", str(server.data_dir), impl=impl)
    assert done.returncode == 2, done
    assert "in use by erq serve" in done.stderr and "stop it first" in done.stderr, done
    assert done.stdout == ""
    # One queue's directory: under the same lock (packing it under the server lost what the
    # server wrote after the pack, and brought back what it had handed out before).
    queue_dir = server.data_dir / "q"
    files = {p.name: p.read_bytes() for p in queue_dir.iterdir()}
    done = run_erq("journal", "pack", str(queue_dir), impl=impl)
    assert done.returncode == 2, done
    assert f"{server.data_dir} is in use by erq serve" in done.stderr, done
    assert {p.name: p.read_bytes() for p in queue_dir.iterdir()} == files  # not even a lock
    assert c.set("q", b"after") == STORED
    server.stop()
    done = run_erq("journal", "pack", str(server.data_dir), impl=impl)
    assert done.returncode == 0, done
    server.start()
    c = server.client()
    assert c.get("q") == one("q", b"kept")
    assert c.get("q") == one("q", b"after")


def test_a_deleted_queue_leaves_nothing_and_a_half_removed_one_is_not_replayed(erq_factory):
    server = erq_factory()
    c = server.client()
    for queue in ("gone", "kept"):
        assert c.set(queue, b"x") == STORED
    assert c.call(b"delete gone\r\n") == DELETED
    names = sorted(p.name for p in server.data_dir.iterdir() if p.is_dir())
    assert "gone" not in names  # renamed before the answer; its files go off the loop
    poll(lambda: [p.name for p in server.data_dir.iterdir() if p.is_dir()] == ["kept"], "removal")
    server.stop()
    # A stop between the rename and the last unlink leaves this behind: a directory under a
    # name no queue can have, with some of its segments. The next start removes it unread.
    (server.data_dir / "kept").rename(server.data_dir / (datadir.DELETING_PREFIX + "0123abcd"))
    server.start()
    c = server.client()
    assert c.get("kept") == END
    assert c.stats().get("queue_kept_items") == "0"  # made again, empty, by that get
    assert not any(p.name.startswith(datadir.DELETING_PREFIX) for p in server.data_dir.iterdir())


def test_a_queue_deleted_just_before_a_crash_stays_deleted(erq_factory):
    """The answer comes once the directory is renamed; its files go afterwards, off the loop.
    A SIGKILL right after the answer must not bring the queue back."""
    server = erq_factory()
    c = server.client()
    for n in range(50):
        assert c.set("gone", b"item %d" % n) == STORED
    assert c.set("kept", b"x") == STORED
    assert c.call(b"delete gone\r\n") == DELETED
    server.kill()
    server.start()
    c = server.client()
    stats = c.stats()
    assert "queue_gone_items" not in stats and stats.get("queue_kept_items") == "1"
    assert [p.name for p in server.data_dir.iterdir() if p.is_dir()] == ["kept"]
    assert c.get("gone") == END  # made again, empty


@pytest.mark.parametrize("shape", ["file", "under_a_file"])
def test_an_unusable_data_directory_fails_the_start_in_one_line(tmp_path, impl, shape):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory\n")
    data_dir = blocker if shape == "file" else blocker / "sub"
    done = run_erq(
        "serve", "--port", "0", "--admin-port", "0", "--data-dir", str(data_dir), impl=impl
    )
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"cannot use the data directory {data_dir}" in errors[0], errors


@pytest.mark.parametrize("where", ["host not here", "memcache port taken", "admin port taken"])
def test_a_start_refused_for_its_address_makes_no_data_directory(tmp_path, impl, where):
    """The data directory was made (and its lock file written) before the ports were tried."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    args = {
        "host not here": ["--host", "192.0.2.1", "--port", "0", "--admin-port", "0"],
        "memcache port taken": ["--port", port, "--admin-port", "0"],
        "admin port taken": ["--port", "0", "--admin-port", port],
    }[where]
    data_dir = tmp_path / "data"
    try:
        done = run_erq("serve", *args, "--data-dir", str(data_dir), impl=impl)
    finally:
        taken.close()
    assert done.returncode == 1, done
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot open the" in errors[0], done.stderr
    assert not data_dir.exists()


def test_remove_queue_dir_renames_first_and_tolerates_a_missing_directory(tmp_path):
    queue_dir = tmp_path / "q"
    queue_dir.mkdir()
    (queue_dir / "00000001.seg").write_bytes(b"x" * 100)
    datadir.remove_queue_dir(queue_dir)
    assert list(tmp_path.iterdir()) == []
    datadir.remove_queue_dir(queue_dir)  # gone already: nothing to do
    left = tmp_path / (datadir.DELETING_PREFIX + "feed")
    (left / "sub").mkdir(parents=True)
    (tmp_path / "deleting").mkdir()  # a queue may be called that: no dot, not a leftover
    assert datadir.remove_leftovers(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["deleting"]


@pytest.mark.parametrize("durable_now", [True, False])
def test_remove_queue_dir_leaves_the_disk_work_to_the_background(
    tmp_path, monkeypatch, durable_now
):
    queue_dir = tmp_path / "q"
    queue_dir.mkdir()
    (queue_dir / "00000001.seg").write_bytes(b"x" * 100)
    synced = []
    real = datadir.fsync_directory
    monkeypatch.setattr(datadir, "fsync_directory", lambda d: (synced.append(d), real(d)))
    later = []
    datadir.remove_queue_dir(queue_dir, later.append, durable_now=durable_now)
    [left] = tmp_path.iterdir()
    assert left.name.startswith(datadir.DELETING_PREFIX)  # renamed before it returns
    assert synced == ([tmp_path] if durable_now else [])
    assert len(later) == 1
    later[0]()
    assert synced == [tmp_path]  # the rename synced once, before the files went
    assert list(tmp_path.iterdir()) == []


def test_removals_waiting_for_the_background_share_one_sync_of_their_parent(tmp_path, monkeypatch):
    """A burst of deletes: the renames that wait for the worker's pass are synced with one
    flush of the data directory, not one each (~6 ms each on a disk: ~170 deletes a second),
    and no directory's files go before that sync."""
    events = []
    real = datadir.fsync_directory
    monkeypatch.setattr(datadir, "fsync_directory", lambda d: (events.append("sync"), real(d)))
    real_remove = datadir._remove_tree
    monkeypatch.setattr(datadir, "_remove_tree", lambda p: (events.append("rm"), real_remove(p)))
    later = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "00000001.seg").write_bytes(b"x")
        datadir.remove_queue_dir(tmp_path / name, later.append, durable_now=False)
    assert len(later) == 1 and events == []  # one pass asked for, nothing done on the caller
    later[0]()
    assert events == ["sync", "rm", "rm", "rm"]
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "d").mkdir()  # after the pass: the next removal asks for a pass of its own
    datadir.remove_queue_dir(tmp_path / "d", later.append, durable_now=False)
    assert len(later) == 2
    later[1]()
    assert events[-2:] == ["sync", "rm"] and list(tmp_path.iterdir()) == []


def test_deletes_faster_than_the_worker_removes_help_it_and_keep_what_waits_bounded(
    tmp_path, monkeypatch
):
    """Queues made and deleted faster than the worker removes their directories (it shares the
    server's core) would pile up on disk and in memory without end: past MAX_WAITING_REMOVALS
    waiting, each delete removes the two oldest itself, their renames synced first."""
    monkeypatch.setattr(datadir, "MAX_WAITING_REMOVALS", 8)
    monkeypatch.setattr(datadir, "REMOVAL_BATCH", 3)
    events = []
    real = datadir.fsync_directory
    monkeypatch.setattr(datadir, "fsync_directory", lambda d: (events.append("sync"), real(d)))
    real_remove = datadir._remove_tree
    monkeypatch.setattr(datadir, "_remove_tree", lambda p: (events.append("rm"), real_remove(p)))
    later = []  # the worker never gets to run meanwhile
    for n in range(40):
        (tmp_path / f"q{n}").mkdir()
        (tmp_path / f"q{n}" / "00000001.seg").write_bytes(b"x")
        datadir.remove_queue_dir(tmp_path / f"q{n}", later.append, durable_now=False)
        assert len(datadir._waiting) <= 8
        assert len(list(tmp_path.iterdir())) <= 8
    assert len(later) == 1 and events[:3] == ["sync", "rm", "rm"]  # synced before removed
    later[0]()  # the worker's pass takes what waits, REMOVAL_BATCH at a time
    assert list(tmp_path.iterdir()) == [] and datadir._waiting == []
    assert events.count("rm") == 40


def test_the_lock_names_its_holder_and_is_free_again_once_released(tmp_path: Path):
    held = datadir.lock(tmp_path, who="erq test")
    with pytest.raises(datadir.DataDirBusy) as busy:
        datadir.lock(tmp_path)
    assert f"erq test (pid {os.getpid()})" in busy.value.strerror
    held.release()
    datadir.lock(tmp_path).release()


def test_in_use_tells_a_held_data_directory_without_taking_its_lock(tmp_path):
    """For the read-only journal tools: a server's lock is seen (from /proc/locks on Linux,
    else by a shared lock dropped at once), and asking neither makes nor writes erq.lock."""
    assert not datadir.in_use(tmp_path) and not (tmp_path / datadir.LOCK_FILE).exists()
    held = datadir.lock(tmp_path, who="erq serve")
    before = (tmp_path / datadir.LOCK_FILE).read_bytes()
    try:
        assert datadir.in_use(tmp_path)
        assert datadir._held(tmp_path / datadir.LOCK_FILE)
    finally:
        held.release()
    assert not datadir.in_use(tmp_path)
    assert not datadir._held(tmp_path / datadir.LOCK_FILE)
    assert (tmp_path / datadir.LOCK_FILE).read_bytes() == before
