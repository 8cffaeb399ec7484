"""``erq journal pack`` on journals a real server wrote (both builds): what it leaves on disk
(one file per queue holding its live items' ADDs and nothing else), that a server started on
it gives back exactly the same items in the same order, and that a pack killed at any step
loses nothing."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_journal_support import segment_files, use_codec

from erq.journal import QueueJournal, compaction, reclaim, tool
from erq.journal.format import ADD_OVERHEAD, HEADER_FLAG_SNAPSHOT, HEADER_SIZE
from erq.journal.segment import Segment

from conftest import ROOT, RawClient
from support import END, STORED, poll, start

MiB = 1 << 20


def _env(impl: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ERQ_NO_EXTENSIONS", None)
    if impl == "py":
        env["ERQ_NO_EXTENSIONS"] = "1"
    return env


def run_pack(impl: str, data_dir: Path) -> subprocess.CompletedProcess:
    """``python -m erq journal pack`` on the given build, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "erq", "journal", "pack", str(data_dir)],
        capture_output=True,
        text=True,
        env=_env(impl),
        timeout=120,
    )


# ---- driving a server --------------------------------------------------------------------------
def payload(n: int, size: int) -> bytes:
    return (bytes((n * 7 + k) % 251 + 1 for k in range(64)) * (size // 64 + 1))[:size]


def items(n: int, size: int, first: int = 0) -> list[tuple[bytes, int, int]]:
    """(data, flags, exptime): distinct flags, an expiry on every third item."""
    return [(payload(first + i, size), first + i, 86_400 if i % 3 == 0 else 0) for i in range(n)]


def set_all(c: RawClient, queue: str, batch: list, per_write: int = 500) -> None:
    for start_at in range(0, len(batch), per_write):
        chunk = batch[start_at : start_at + per_write]
        c.send(
            b"".join(
                b"set %s %d %d %d\r\n%s\r\n" % (queue.encode(), flags, exp, len(data), data)
                for data, flags, exp in chunk
            )
        )
        for _ in chunk:
            assert c.line() == STORED


def take(c: RawClient, key: str, n: int, per_write: int = 500) -> list[tuple[bytes, int]]:
    """``n`` items from ``key`` (a queue name, maybe with options), pipelined."""
    out = []
    while n:
        k = min(n, per_write)
        c.send(b"get %s\r\n" % key.encode() * k)
        for _ in range(k):
            line = c.line()
            assert line.startswith(b"VALUE "), line
            size, flags = int(line.split()[3]), int(line.split()[2])
            out.append((c.read_exact(size + 2)[:-2], flags))
            assert c.line() == END
        n -= k
    return out


def served(batch: list) -> list[tuple[bytes, int]]:
    return [(data, flags) for data, flags, _ in batch]


# Each shape drives a fresh server and returns what each queue must serve after a restart,
# in order. A shape whose name ends in "_killed" is stopped by SIGKILL.
def drained(c, keep):
    set_all(c, "q", items(2000, 200))
    take(c, "q", 2000)
    return {"q": []}


def half_drained(c, keep):
    batch = items(2000, 200)
    set_all(c, "q", batch)
    take(c, "q", 1000)
    return {"q": served(batch[1000:])}


def open_reads_killed(c, keep):
    batch = items(60, 100)
    set_all(c, "q", batch)
    take(c, "q", 5)
    other = RawClient(c.sock.getpeername()[1])
    keep.append(other)  # open until the kill
    # Open on two connections, interleaved: their original order is the order of the opens.
    opened = take(c, "q/open", 2) + take(other, "q/open", 1) + take(c, "q/open", 1)
    assert opened == served(batch[5:9])
    assert c.call(b"get q/close\r\n") == END  # confirms c's oldest open read (item 5)
    return {"q": served(batch[6:])}  # 6, 7 and 8 back at the head in their order


def many_small(c, keep):
    batch = items(20_000, 10)
    set_all(c, "q", batch, 2000)
    take(c, "q", 10_000, 2000)
    return {"q": served(batch[10_000:])}


def large_items(c, keep):
    batch = items(5, MiB)
    set_all(c, "q", batch, 1)
    take(c, "q", 2, 1)
    return {"q": served(batch[2:])}


def fanout(c, keep):
    c.get("f+a")  # the children exist from here on
    c.get("f+b")
    batch = items(1000, 300)
    set_all(c, "f", batch)
    take(c, "f", 800)
    take(c, "f+a", 1000)
    take(c, "f+b", 500)
    return {"f": served(batch[800:]), "f+a": [], "f+b": served(batch[500:])}


def read_behind(c, keep):
    batch = items(600, 1000)
    set_all(c, "rb", batch)
    take(c, "rb", 100)
    stats = c.stats()
    assert int(stats["queue_rb_items"]) > int(stats["queue_rb_mem_items"])  # on disk only
    return {"rb": served(batch[100:])}


SHAPES = {
    "drained": drained,
    "half_drained": half_drained,
    "open_reads_killed": open_reads_killed,
    "many_small": many_small,
    "large_items": large_items,
    "fanout": fanout,
    "read_behind": read_behind,
}
QUEUES = '[queues."rb"]\nmax_memory_size = "64KiB"\n'


# ---- what is on disk ---------------------------------------------------------------------------
def journal_state(queue_dir: Path) -> tuple[list[tuple], int]:
    """Every item a start gives back (id, flags, add time, expiry, data), in order, and the
    next id; read from a copy (opening a journal writes to it)."""
    copy = queue_dir.parent.parent / f"copy-{queue_dir.name}"
    shutil.copytree(queue_dir, copy)
    try:
        journal, rec = QueueJournal.open(copy, fsync="never", max_memory_size=1 << 40)
        state = [tuple(it) for it in rec.items]
        journal.close()
    finally:
        shutil.rmtree(copy)
    return state, rec.next_id


def queue_dirs(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.iterdir() if p.is_dir())


def records(queue_dir: Path) -> list[str]:
    out = io.StringIO()
    assert tool.dump(queue_dir, out) == 0
    return [line.split()[1] for line in out.getvalue().splitlines() if not line.startswith("#")]


def assert_packed(queue_dir: Path, state: list[tuple]) -> None:
    """One file: a snapshot holding an ADD per live item and nothing else, no room after."""
    (only,) = segment_files(queue_dir)
    live = sum(ADD_OVERHEAD + len(it[4]) for it in state)
    assert only.stat().st_size == HEADER_SIZE + live
    assert records(queue_dir) == ["ADD"] * len(state)
    segment = Segment.open(only, writable=False)
    assert segment.flags & HEADER_FLAG_SNAPSHOT
    segment.close()


def drain(c: RawClient, queue: str) -> list[tuple[bytes, int]]:
    out = []
    while True:
        c.send(b"get %s\r\n" % queue.encode())
        line = c.line()
        if line == END:
            return out
        size, flags = int(line.split()[3]), int(line.split()[2])
        out.append((c.read_exact(size + 2)[:-2], flags))
        assert c.line() == END


@pytest.mark.parametrize("shape", list(SHAPES))
def test_pack_leaves_only_the_live_items_and_a_start_gives_them_back(
    shape, impl, erq_factory, tmp_path
):
    server = start(erq_factory, queues=QUEUES)
    c = server.client()
    keep: list = []  # connections that must stay open until the server stops
    expected = SHAPES[shape](c, keep)
    if shape.endswith("_killed"):
        server.kill()
    else:
        server.stop()
    data_dir = tmp_path / "data"
    before = {d.name: journal_state(d) for d in queue_dirs(data_dir)}
    assert set(before) == set(expected)
    files_before = sum(p.stat().st_size for d in queue_dirs(data_dir) for p in segment_files(d))

    done = run_pack(impl, data_dir)
    assert done.returncode == 0, done.stdout + done.stderr

    files_after = 0
    for directory in queue_dirs(data_dir):
        state, next_id = journal_state(directory)
        assert state == before[directory.name][0]  # ids, flags, times, expiry, data, order
        assert next_id == before[directory.name][1]
        assert_packed(directory, state)
        size = segment_files(directory)[0].stat().st_size
        files_after += size
        assert f"{directory.name}: {len(state)} item(s), records " in done.stdout
        assert f"-> {size:,} bytes, files " in done.stdout
    assert files_after < files_before
    assert tool.check(data_dir, io.StringIO()) == 0

    server.start()
    c = server.client()
    for queue, items_now in expected.items():
        assert drain(c, queue) == items_now, queue
    for queue in expected:  # and they take writes again (a fanout child gets its parent's)
        assert c.set(queue, b"after", 3) == STORED
    for queue in expected:
        copies = 1 + ("+" in queue and queue.partition("+")[0] in expected)
        assert drain(c, queue) == [(b"after", 3)] * copies, queue


def test_a_server_appends_after_a_pack_and_gives_the_snapshot_back_once_drained(
    impl, erq_factory, tmp_path
):
    server = start(erq_factory)
    c = server.client()
    batch = items(300, 100)
    set_all(c, "q", batch)
    take(c, "q", 100)
    server.stop()
    data_dir = tmp_path / "data"
    assert run_pack(impl, data_dir).returncode == 0
    (snapshot,) = segment_files(data_dir / "q")
    server.start()
    c = server.client()
    more = items(50, 100, 1000)
    set_all(c, "q", more)  # into a new segment: the snapshot has no room
    assert take(c, "q", 10) == served(batch[100:110])
    server.stop()
    server.start()
    c = server.client()
    assert drain(c, "q") == served(batch[110:] + more)
    assert c.set("q", b"next") == STORED
    poll(lambda: not snapshot.exists(), "the drained snapshot's release")


def test_pack_of_a_packed_journal_leaves_it_as_it_is(impl, erq_factory, tmp_path):
    server = start(erq_factory)
    c = server.client()
    set_all(c, "q", items(100, 50))
    take(c, "q", 30)
    server.stop()
    data_dir = tmp_path / "data"
    assert run_pack(impl, data_dir).returncode == 0
    (first,) = segment_files(data_dir / "q")
    image = first.read_bytes()
    done = run_pack(impl, data_dir)
    assert done.returncode == 0
    assert segment_files(data_dir / "q") == [first] and first.read_bytes() == image
    assert f"records {len(image):,} -> {len(image):,} bytes" in done.stdout


# ---- a pack killed at each step ----------------------------------------------------------------
KILL_SCRIPT = r"""
import os, signal, sys
from erq.journal import compaction, reclaim, tool

steps = [0]
kill_at = int(sys.argv[2])

def step(module, name):
    original = getattr(module, name)
    def counted(*args, **kwargs):
        steps[0] += 1
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(module, name, counted)

# Every write, sync, rename and unlink of a pack, besides recovery's own (a start's).
for name in ("_fsync_file", "_rename", "_fsync_dir", "_unlink"):
    step(compaction, name)
step(compaction._Output, "flush")
if hasattr(reclaim, "fsync_directory"):  # the sync of the deletions
    step(reclaim, "fsync_directory")
sys.exit(tool.pack(sys.argv[1], sys.stdout))
"""


def _kill_dir(root: Path) -> Path:
    """Three queues in-process, several segments each: one with open reads and history, one
    drained, one that was never read."""
    data = root / "data"
    a, _ = QueueJournal.open(data / "a", fsync="never", segment_size=8 << 10)
    for i in range(1, 201):
        a.add(i, i, 1000 + i, 0 if i % 2 else 5000 + i, payload(i, 120))
    for i in range(1, 151):
        a.remove(i)
    for i in (153, 151, 152):
        a.open(i)
    a.close()
    b, _ = QueueJournal.open(data / "b", fsync="never", segment_size=8 << 10)
    for i in range(1, 101):
        b.add(i, 0, 1, 0, payload(i, 200))
    for i in range(1, 101):
        b.remove(i)
    b.close()
    c, _ = QueueJournal.open(data / "c", fsync="never", segment_size=8 << 10)
    for i in range(1, 41):
        c.add(i, 0, 1, 0, payload(i, 500) if i % 4 else b"")
    c.close()
    return data


def test_pack_killed_at_any_step_loses_nothing(impl, tmp_path, monkeypatch):
    use_codec(impl, monkeypatch)  # for the packs and recoveries made here
    original = _kill_dir(tmp_path / "original")
    expected = {d.name: journal_state(d) for d in queue_dirs(original)}
    assert [len(s) for s, _ in expected.values()] == [50, 0, 40]
    kill_at = 1
    while True:
        data = tmp_path / f"run{kill_at}" / "data"
        shutil.copytree(original, data)
        done = subprocess.run(
            [sys.executable, "-c", KILL_SCRIPT, str(data), str(kill_at)],
            capture_output=True,
            text=True,
            env=_env(impl),
            timeout=120,
        )
        if done.returncode == 0:
            break
        assert done.returncode == -signal.SIGKILL, done.stderr
        for directory in queue_dirs(data):
            assert journal_state(directory) == expected[directory.name], (kill_at, directory)
        # What a kill left, packed again: the same items, each queue in one file.
        assert tool.pack(data, io.StringIO()) == 0
        for directory in queue_dirs(data):
            state = journal_state(directory)
            assert state == expected[directory.name], (kill_at, directory)
            assert_packed(directory, state[0])
        shutil.rmtree(data.parent)
        kill_at += 1
    # Every queue's writes, syncs, rename and deletions were kill points: per queue at least
    # a write, the file's sync, the rename, the directory's sync, an unlink per old segment
    # and the directory's sync again.
    assert kill_at > sum(5 + len(segment_files(d)) for d in queue_dirs(original))
    for directory in queue_dirs(data):
        assert journal_state(directory) == expected[directory.name]
        assert_packed(directory, expected[directory.name][0])


def test_a_pack_that_cannot_rename_its_snapshot_says_so_and_keeps_the_journal(
    impl, tmp_path, monkeypatch
):
    use_codec(impl, monkeypatch)
    data = _kill_dir(tmp_path)
    expected = {d.name: journal_state(d) for d in queue_dirs(data)}
    images = {p: p.read_bytes() for d in queue_dirs(data) for p in segment_files(d)}

    def refused(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(compaction, "_rename", refused)
    out = io.StringIO()
    assert tool.pack(data, out) == 1
    report = out.getvalue()
    for directory in queue_dirs(data):
        assert f"cannot pack {directory}: [Errno 13] Permission denied" in report
        before = sum(len(images[p]) for p in images if p.parent == directory)
        assert f"files {before:,} -> {before:,} bytes" in report
        assert journal_state(directory) == expected[directory.name]
        assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    # Recovery's own writes aside (the open reads' return to the head), nothing was changed.
    assert sorted(p for d in queue_dirs(data) for p in segment_files(d)) == sorted(images)


def test_a_pack_whose_last_directory_sync_fails_says_so(impl, tmp_path, monkeypatch):
    use_codec(impl, monkeypatch)
    data = _kill_dir(tmp_path)
    expected = {d.name: journal_state(d) for d in queue_dirs(data)}

    def failed(directory):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(reclaim, "fsync_directory", failed)
    out = io.StringIO()
    assert tool.pack(data, out) == 1
    for directory in queue_dirs(data):
        assert f"{directory}: packed, but the deletion of the old segments may not be durable" in (
            out.getvalue()
        )
        state = journal_state(directory)
        assert state == expected[directory.name]
        assert_packed(directory, state[0])
