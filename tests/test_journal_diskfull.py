"""A full disk: segment allocation fails cleanly with JournalError, and works again later."""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess

import pytest
from test_journal_support import KiB, all_items, segment_files, use_codec

from erq.config import load_config
from erq.journal import JournalError, QueueJournal
from erq.journal import journal as journal_module

from conftest import impl_module
from support import run_script


@pytest.fixture
def codec(impl, monkeypatch):
    return use_codec(impl, monkeypatch)


def no_space(fd, offset, length):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_first_segment_on_a_full_disk_is_an_error_then_succeeds(codec, tmp_path, monkeypatch):
    journal, _ = QueueJournal.open(tmp_path / "q", fsync="never")
    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", no_space)
        with pytest.raises(JournalError, match="disk full"):
            journal.add(1, 0, 0, 0, b"first")
        assert list((tmp_path / "q").iterdir()) == []  # nothing half-made left behind
    journal.add(1, 0, 0, 0, b"first")
    journal.close()
    _, rec = QueueJournal.open(tmp_path / "q", fsync="never")
    assert [it.data for it in rec.items] == [b"first"]


def test_full_disk_at_rotation_fails_every_record_kind_until_space_returns(
    codec, tmp_path, monkeypatch
):
    journal, _ = QueueJournal.open(tmp_path / "q", fsync="never", segment_size=8 * KiB)
    for i in range(1, 8):  # seven 1000-byte items fill the first 8 KiB segment
        journal.add(i, 0, 0, 0, bytes([i]) * 1000)
    assert len(segment_files(tmp_path / "q")) == 1
    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", no_space)
        with pytest.raises(JournalError):
            journal.add(8, 0, 0, 0, b"\x08" * 1000)
        journal.remove(1)  # small records still fit in what is left of the segment
        while True:
            try:
                journal.remove(99)
            except JournalError:
                break
        with pytest.raises(JournalError):
            journal.open(2)
        assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
            "0000000000000001-0000000000000001.range",
            "0000000000000001.seg",
        ]
    journal.add(8, 0, 0, 0, b"\x08" * 1000)  # the same item, retried: now it is stored
    journal.open(2)
    journal.close()
    journal, rec = QueueJournal.open(tmp_path / "q", fsync="never", segment_size=8 * KiB)
    assert [it.id for it in all_items(journal, rec)] == [2, 3, 4, 5, 6, 7, 8]
    journal.close()


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "erq-test", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(
            f"mounting a 4 MiB tmpfs is not permitted here ({proc.stderr.strip()}); "
            "test_full_disk_at_rotation_fails_every_record_kind_until_space_returns injects ENOSPC instead"
        )
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk_refuses_the_write_and_recovers_when_space_is_freed(codec, small_tmpfs):
    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(b"\xaa" * (2560 * KiB))  # 2.5 of the 4 MiB
    directory = small_tmpfs / "q"
    journal, _ = QueueJournal.open(directory, fsync="always", segment_size=1024 * KiB)
    item = b"\x5a" * (60 * KiB)
    stored = 0
    with pytest.raises(JournalError, match="disk full"):
        while True:
            journal.add(stored + 1, 0, 0, 0, item)
            stored += 1
    # Segments of 64, 128, 256 and 512 KiB fit in the 1.5 MiB left; the next, of 1 MiB, does
    # not, so smaller ones take what is left, down to one that holds no item more.
    sizes = [p.stat().st_size for p in sorted(directory.glob("*.seg"))]
    assert sizes[:4] == [64 * KiB << k for k in range(4)]
    assert len(sizes) > 4 and all(size < 1024 * KiB for size in sizes[4:])
    assert stored == sum((size - 32) // (len(item) + 37) for size in sizes)
    assert stored > sum((64 * KiB << k) // (len(item) + 37) for k in range(4))
    ballast.unlink()
    journal.add(stored + 1, 0, 0, 0, item)  # space is back: the same write now succeeds
    journal.close()
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=1024 * KiB)
    assert [it.id for it in all_items(journal, rec)] == list(range(1, stored + 2))
    assert rec.warnings == []
    journal.close()


def test_open_reads_come_back_even_when_their_return_cannot_be_journaled(
    codec, tmp_path, monkeypatch
):
    journal, _ = QueueJournal.open(tmp_path / "q", fsync="never", segment_size=4 * KiB)
    journal.add(1, 0, 0, 0, b"a")
    journal.add(2, 0, 0, 0, b"b" * 3960)  # fills the first segment
    journal.open(1)
    journal.close()
    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", no_space)
        journal, rec = QueueJournal.open(tmp_path / "q", fsync="never", segment_size=4 * KiB)
        assert [it.id for it in rec.items] == [1, 2]
        assert len(rec.warnings) == 1 and "open read" in rec.warnings[0]
        journal.close()
    journal, rec = QueueJournal.open(tmp_path / "q", fsync="never", segment_size=4 * KiB)
    assert [it.id for it in rec.items] == [1, 2] and rec.warnings == []
    journal.close()


def test_an_expired_item_the_full_disk_keeps_from_its_expire_to_queue_is_logged_and_dropped(
    impl, tmp_path, monkeypatch, caplog
):
    """The target's journal cannot take the item: the source's expiry stands (it is journaled
    already), the loss is logged with the reason, nothing escapes the sweep, and once space
    returns the next expired item moves. (Both builds of QueueCollection; its queues and
    journals are the selected ones.)"""
    queues_mod = impl_module(impl, "_queues", "_queues_py")
    config_file = tmp_path / "erq.toml"
    config_file.write_text('[queues.src]\nexpire_to_queue = "dead"\n')
    config = load_config(config_file)
    now = [1_000_000]

    def open_journal(directory, qcfg):
        return QueueJournal.open(directory, fsync="never", segment_size=8 * KiB)

    queues = queues_mod.QueueCollection(
        config, tmp_path / "data", journal_factory=open_journal, clock=lambda: now[0]
    )
    src = queues.get_or_create("src")
    src.add(b"first", 3, now[0] + 10)
    src.add(b"second", 4, now[0] + 20)
    now[0] += 15
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, "erq.queues"):
        m.setattr(os, "posix_fallocate", no_space)
        queues.sweep(True)  # "dead" gets no first segment: its add raises JournalError
    # ...and "dead", made for the move, goes again: no queue outlives a move it refused.
    assert src.items == 1 and queues.get("dead") is None and not (tmp_path / "data/dead").exists()
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("queue src: expired item 1 dropped, dead refused it: ")
    assert "disk full" in message
    now[0] += 10
    queues.sweep(True)  # space is back
    dead = queues.get("dead")
    assert src.items == 0 and dead.items == 1
    item = dead.take(False)
    assert (item.data, item.flags) == (b"second", 4)
    queues.close()


def test_expired_items_their_full_expire_to_queue_refuses_take_one_log_line_not_one_each(
    impl, tmp_path, caplog
):
    """Every expired item the expire_to_queue refuses (full here; a full disk likewise) is
    dropped, and counted in expired_items; the log says so once per interval, not once per
    item, which on a full disk would write a line per item to the disk that is full. (Both
    builds of QueueCollection.)"""
    queues_mod = impl_module(impl, "_queues", "_queues_py")
    config_file = tmp_path / "erq.toml"
    config_file.write_text('[queues.src]\nexpire_to_queue = "dead"\n[queues.dead]\nmax_items = 0\n')
    now = [1_000_000]
    queues = queues_mod.QueueCollection(load_config(config_file), None, clock=lambda: now[0])
    src = queues.get_or_create("src")
    for _ in range(500):
        src.add(b"x", 0, now[0] + 10)
    now[0] += 15
    with caplog.at_level(logging.WARNING, "erq.queues"):
        queues.sweep(True)
    assert src.items == 0 and queues.get("dead") is None  # made for each move, gone again
    assert src.stats(now[0])["expired_items"] == 500
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("queue src: expired item 1 dropped, dead refused it: it is full")


def test_a_set_whose_new_queue_gets_no_first_segment_makes_no_queue(impl, tmp_path, monkeypatch):
    """A set that creates its queue, on a full disk: the first segment cannot be made, the set
    is refused (JournalError: SERVER_ERROR) and, refused, it creates no queue (PROTOCOL §10),
    neither in the collection (max_queues, stats) nor on disk, where a restart would find it.
    Once space is back the same set makes it. (Both builds of QueueCollection.)"""
    queues_mod = impl_module(impl, "_queues", "_queues_py")
    config = load_config(None)

    def open_journal(directory, qcfg):
        return QueueJournal.open(directory, fsync="never")

    data = tmp_path / "data"
    queues = queues_mod.QueueCollection(config, data, journal_factory=open_journal)
    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", no_space)
        with pytest.raises(JournalError, match="disk full"):
            queues.add("fresh", b"item", 0, 0)
    assert "fresh" not in queues and len(queues) == 0
    assert (queues.queue_creates, queues.queue_deletes, queues.total_items) == (0, 0, 0)
    assert not (data / "fresh").exists()
    queues.add("fresh", b"item", 0, 0)
    assert queues.get("fresh").items == 1 and queues.queue_creates == 1
    queues.close()


def test_a_set_refused_by_a_full_disk_creates_no_queue_in_the_server(erq_factory, small_tmpfs):
    """Through a server on a full file system: every set to a new queue is SERVER_ERROR, and
    none of them leaves a queue behind, in stats or after a restart."""
    server = erq_factory(start=False)
    server.args = ["--data-dir", str(small_tmpfs / "data")]
    server.start()
    c = server.client()
    item = b"f" * (60 * KiB)
    while c.call(b"set fill 0 0 %d\r\n%s\r\n" % (len(item), item)) == b"STORED\r\n":
        pass
    fd = os.open(small_tmpfs / "ballast", os.O_WRONLY | os.O_CREAT)  # the last KiBs too
    try:
        while os.write(fd, b"b" * 1024):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    for name in (b"new1", b"new2"):
        reply = c.call(b"set %s 0 0 3\r\nabc\r\n" % name)
        assert reply.startswith(b"SERVER_ERROR ") and b"disk full" in reply, reply
        assert str(small_tmpfs).encode() not in reply, reply  # the client learns no path
    stats = c.stats()
    assert stats["queue_creates"] == "1"
    assert not any(key.startswith("queue_new") for key in stats), stats
    queue_dirs = [
        p.name
        for p in (small_tmpfs / "data").iterdir()
        if p.is_dir() and not p.name.startswith("deleting.")  # removed on a worker thread
    ]
    assert queue_dirs == ["fill"]
    c.close()
    server.restart()
    assert not any(key.startswith("queue_new") for key in server.client().stats())


def test_a_journal_that_cannot_be_opened_is_a_journal_error_and_leaves_no_directory(
    codec, tmp_path, monkeypatch
):
    (tmp_path / "blocked").write_bytes(b"")  # a file where the queue's directory would go
    with pytest.raises(JournalError, match="cannot open the journal"):
        QueueJournal.open(tmp_path / "blocked", fsync="never")
    assert (tmp_path / "blocked").is_file()  # what was there stays
    with monkeypatch.context() as m:  # out of descriptors once the directory is made
        m.setattr(journal_module, "replay", out_of_descriptors)
        with pytest.raises(JournalError, match="Too many open files"):
            QueueJournal.open(tmp_path / "new", fsync="never")
    assert not (tmp_path / "new").exists()  # the new queue's directory is not left behind
    journal, recovery = QueueJournal.open(tmp_path / "new", fsync="never")  # and later opens
    assert recovery.items == []
    journal.close()


def out_of_descriptors(*args):
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def test_a_queue_whose_journal_cannot_be_opened_answers_server_error_and_the_connection_lives(
    erq_factory,
):
    """Out of descriptors or no permission when a request creates a queue: the request gets
    SERVER_ERROR naming the queue but not the server's paths, no queue is made, and the same
    connection goes on being served."""
    server = erq_factory(start=False)
    server.data_dir.mkdir(exist_ok=True)
    (server.data_dir / "blocked").write_bytes(b"")  # the queue's directory cannot be made
    server.start()
    c = server.client()
    for request in (b"set blocked 0 0 2\r\nhi\r\n", b"get blocked\r\n", b"get blocked/open\r\n"):
        c.send(request)
        reply = c.line()
        assert reply.startswith(b"SERVER_ERROR cannot open the journal in blocked"), reply
        # Where the server keeps its data is for its log, not its clients.
        assert str(server.data_dir).encode() not in reply, reply
    c.send(b"set other 0 0 2\r\nhi\r\nget other\r\n")
    assert c.line() == b"STORED\r\n"
    assert c.line() + c.line() + c.line() == b"VALUE other 0 2\r\nhi\r\nEND\r\n"
    stats = c.stats()
    assert "queue_other_items" in stats
    assert not any(name.startswith("queue_blocked") for name in stats), stats  # none made


def test_a_journal_error_that_every_request_meets_is_logged_once_per_interval(erq_factory):
    """A full disk or a journal that cannot be opened fails every request that writes. Each
    still gets its SERVER_ERROR, but the log takes one line per 10 s, not one per request: it
    may be filling the very disk that is full."""
    server = erq_factory(start=False)
    server.data_dir.mkdir(exist_ok=True)
    (server.data_dir / "blocked").write_bytes(b"")  # the queue's directory cannot be made
    server.start()
    c = server.client()
    requests = [b"set blocked 0 0 2\r\nhi\r\n", b"get blocked\r\n", b"monitor blocked 1\r\n"]
    c.send(b"".join(requests * 100))
    for _ in range(300):
        reply = c.line()
        assert reply.startswith(b"SERVER_ERROR cannot open the journal"), reply
    assert c.call(b"version\r\n").startswith(b"VERSION ")
    lines = [
        line
        for line in server.read_log().splitlines()
        if re.search(r"(set|get|monitor) blocked: ", line)
    ]
    assert len(lines) == 1, lines


REFUSED_ADMIN_SCRIPT = r"""
import asyncio, json, sys
from erq.config import load_config
from erq.journal.journal import QueueJournal
from erq.journal_api import JournalError
from erq.server import Server

async def main(data_dir):
    server = Server(load_config(None, cli={"port": 0, "admin_port": 0, "data_dir": data_dir}))
    await server.start()
    server._sweeper.cancel()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

    async def call(request, lines=1):
        writer.write(request)
        await writer.drain()
        return [(await reader.readline()).decode() for _ in range(lines)]

    out = {}
    await call(b"set old 0 1 1\r\na\r\nset old 0 0 1\r\nb\r\nset full 0 0 1\r\nc\r\n", 3)
    await call(b"set other 0 0 1\r\nd\r\n")
    await asyncio.sleep(1.1)  # old's first item has expired
    real_flush, real_remove = QueueJournal.flush, QueueJournal.remove

    def refuse_full(journal, *args):
        if journal.directory.name == "full":
            raise JournalError("no space left on the device (injected)")
        return real_flush(journal, *args)

    def refuse(journal, *args):
        raise JournalError("no space left on the device (injected)")

    QueueJournal.flush = refuse_full
    out["flush"] = await call(b"flush full\r\n")
    out["flush noreply, then version"] = await call(b"flush full noreply\r\nversion\r\n")
    QueueJournal.remove = refuse
    out["flush_expired"] = await call(b"flush_expired old\r\n")
    out["flush_all_expired"] = await call(b"flush_all_expired\r\n")
    QueueJournal.remove = real_remove
    out["flush_expired again"] = await call(b"flush_expired old\r\n")
    out["flush_all"] = await call(b"flush_all\r\n")
    QueueJournal.flush = real_flush
    out["after"] = await call(b"get full\r\nget other\r\nget old\r\n", 5)
    writer.close()
    server.request_shutdown("test")
    await server.shutdown()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"""


def test_admin_commands_whose_journal_record_fails_answer_server_error_and_keep_the_items(
    impl, tmp_path
):
    """flush, flush_all, flush_expired and flush_all_expired on a queue whose journal refuses
    the record (a full disk): SERVER_ERROR, as for a set, and the connection goes on. The
    queue keeps what its journal still holds (a flush cleared memory before its record, so
    the items a client saw flushed came back at the next start; and the error escaped the
    command and dropped the connection). flush_all flushes every other queue."""
    out = run_script(impl, REFUSED_ADMIN_SCRIPT, str(tmp_path / "data"))
    refused = ["SERVER_ERROR no space left on the device (injected)\r\n"]
    assert out["flush"] == refused, out
    assert out["flush noreply, then version"][0].startswith("VERSION "), out
    assert out["flush_expired"] == refused, out
    assert out["flush_all_expired"] == refused, out
    assert out["flush_expired again"] == ["1\r\n"], out  # the expired item was still there
    assert out["flush_all"] == refused, out
    assert out["after"] == [
        "VALUE full 0 1\r\n", "c\r\n", "END\r\n",  # kept
        "END\r\n", "END\r\n",  # flushed by the flush_all that full refused
    ], out  # fmt: skip


def test_a_fanout_child_on_a_full_disk_misses_its_copy_and_the_set_is_the_parents(
    impl, tmp_path, monkeypatch
):
    """PROTOCOL §7: the set's reply reflects the parent only. A child whose journal cannot
    take the copy (no room for its next segment) misses it, as one that refuses it; the
    parent keeps the item and the children after it get theirs."""
    queues_mod = impl_module(impl, "_queues", "_queues_py")

    def open_journal(directory, qcfg):
        return QueueJournal.open(directory, fsync="never", segment_size=8 * KiB)

    queues = queues_mod.QueueCollection(
        load_config(None, cli={}), tmp_path / "data", journal_factory=open_journal
    )
    for name in ("p", "p+full", "p+fine"):
        queues.get_or_create(name)
    full = queues.get("p+full")
    for _ in range(7):  # the child's 8 KiB segment is nearly full
        full.add(b"f" * 1000, 0, 0)

    real_fallocate = os.posix_fallocate

    def full_for_one_child(fd, offset, length):
        if "p+full" in os.readlink(f"/proc/self/fd/{fd}"):
            no_space(fd, offset, length)
        return real_fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", full_for_one_child)
    total = queues.total_items
    result, _tickets = queues.add("p", b"x" * 1000, 0, 0)
    assert result == queues_mod.STORED
    assert [queues.get(n).items for n in ("p", "p+full", "p+fine")] == [1, 7, 1]
    assert queues.total_items == total + 2  # the parent's and one copy
    monkeypatch.undo()
    queues.close()


def test_a_disk_short_of_the_next_segments_size_gets_a_smaller_one_that_holds_the_record(
    codec, tmp_path, monkeypatch
):
    """Segments grow by doubling; where the disk has no room for the size the journal grew
    to, the rotation asks for a quarter as much, down to one that holds the record, and the
    journal grows again from there."""
    journal, _ = QueueJournal.open(tmp_path / "q", fsync="never", segment_size=4 << 20)
    item = b"x" * 60_000
    for i in range(1, 60):  # past a few rotations: the next segment wants MiBs
        journal.add(i, 0, 0, 0, item)
    wanted = journal._next_size
    assert wanted >= 1 << 20
    real = os.posix_fallocate
    asked = []

    def short_disk(fd, offset, length):
        asked.append(length)
        if length > 256 * KiB:
            no_space(fd, offset, length)
        return real(fd, offset, length)

    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", short_disk)
        n = 60
        while not asked:  # until the current segment is full and a new one is made
            journal.add(n, 0, 0, 0, item)
            n += 1
    assert asked[0] == wanted and asked[-1] <= 256 * KiB
    journal.close()
    _, rec = QueueJournal.open(tmp_path / "q", fsync="never")
    assert len(rec.items) == n - 1  # every item, the one the smaller segment took too
