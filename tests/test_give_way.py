"""A pipeline whose requests work on the file system on the loop (queues made or deleted, the
status saved) gives the loop back every few of them: one client's thousands of such requests
in one write no longer hold every other client up for the whole batch (4,000 gets of new
names held them ~270 ms, 4,000 status changes ~1.7 s)."""

from __future__ import annotations

import os
import signal
import socket

from support import END, STORED, config, poll


def replies_so_far(client, wanted: bytes) -> int:
    """How many ``wanted`` replies ``client`` has been sent by now (read without waiting)."""
    client.sock.setblocking(False)
    try:
        while True:
            try:
                chunk = client.sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            client.buf += chunk
    finally:
        client.sock.setblocking(True)
    return client.buf.count(wanted)


def served_midway(server, batch: bytes, reply: bytes, replies: int) -> None:
    """Send ``batch`` (one write: one read for the server); once its first replies are in,
    another client's request is answered before the batch's last reply has gone out; then
    the batch is answered whole, in order."""
    busy, other = server.client(), server.client()
    busy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    busy.send(batch)
    assert busy.line() == reply  # the batch has started
    assert other.call(b"version\r\n").startswith(b"VERSION ")
    assert replies_so_far(busy, reply) + 1 < replies
    busy.sock.settimeout(30)
    rest = b"".join(busy.line() for _ in range(replies - 1))
    assert rest == reply * (replies - 1)


def test_a_client_is_served_while_another_makes_thousands_of_queues_in_one_write(erq_factory):
    server = erq_factory()
    n = 2000
    served_midway(server, b"".join(b"get new%04d\r\n" % i for i in range(n)), END, n)
    watcher = server.client()
    stats = watcher.stats()
    assert stats["queue_creates"] == str(n)
    # And deletes, as many.
    batch = b"".join(b"delete new%04d\r\n" % i for i in range(n))
    served_midway(server, batch, b"DELETED\r\n", n)
    assert watcher.stats()["queue_deletes"] == str(n)


def test_a_client_is_served_while_another_changes_the_status_thousands_of_times(erq_factory):
    server = erq_factory()
    n = 1000
    served_midway(server, b"status READONLY\r\nstatus UP\r\n" * n, END, 2 * n)
    assert server.client().call(b"status\r\n") == b"UP\r\n"


def test_a_client_is_served_while_another_pipelines_tens_of_thousands_of_requests(erq_factory):
    """Cheap requests too: one write of 60,000 gets of an empty queue held every other
    client until a whole read of them (256 KiB, ~23,000) was answered, ~0.1 s compiled and
    ~0.5 s pure Python here, and a few such clients many times that. A pipeline runs REQUESTS_PER_PASS
    of them, then gives the others their turn; it is answered whole and in order."""
    from erq.session import REQUESTS_PER_PASS

    server = erq_factory()
    n = 60000
    assert n > 100 * REQUESTS_PER_PASS
    busy, other = server.client(), server.client()
    busy.send(b"get empty\r\n" * n)
    assert other.call(b"version\r\n").startswith(b"VERSION ")  # sent while busy's run
    # Answered a few turns in (a read's worth, ~15,000-23,000, without them).
    assert replies_so_far(busy, END) < 20 * REQUESTS_PER_PASS
    busy.sock.settimeout(30)
    assert b"".join(busy.line() for _ in range(n)) == END * n
    # Sets and gets, interleaved, in order: every item once.
    busy = server.client()
    batch = b"".join(b"set q 0 0 5\r\n%05d\r\nget q\r\n" % i for i in range(n // 2))
    busy.send(batch)
    busy.sock.settimeout(30)
    for i in range(n // 2):
        assert busy.line() == STORED
        assert busy.line() == b"VALUE q 0 5\r\n"
        assert busy.line() == b"%05d\r\n" % i
        assert busy.line() == END
    assert busy.call(b"get q\r\n") == END


def test_a_large_write_with_big_items_and_a_blocked_get_runs_whole_and_in_order(erq_factory):
    """A large read is parsed a turn at a time (MemcacheProtocol.PARSED_WHOLE): items of
    tens of KiB, and a get that waits in the middle of a large write for another client's
    set, with thousands of requests behind it, come out whole and in order."""
    server = erq_factory()
    busy, other = server.client(), server.client()
    items = [bytes([65 + i % 26]) * (40_000 + i) for i in range(40)]
    batch = b"".join(b"set big 0 0 %d\r\n%s\r\n" % (len(v), v) for v in items)
    batch += b"get w/t=30000\r\n" + b"get big\r\n" * 40 + b"get empty\r\n" * 20000
    busy.send(batch + b"version\r\n")
    for _ in items:
        assert busy.line() == STORED
    assert other.call(b"set w 0 0 2\r\nhi\r\n") == STORED
    busy.sock.settimeout(30)
    assert busy.line() == b"VALUE w/t=30000 0 2\r\n"
    assert busy.line() + busy.line() == b"hi\r\nEND\r\n"
    for v in items:
        assert busy.line() == b"VALUE big 0 %d\r\n" % len(v)
        assert busy.line() == v + b"\r\n"
        assert busy.line() == END
    assert b"".join(busy.line() for _ in range(20000)) == END * 20000
    assert busy.line().startswith(b"VERSION ")


def test_a_set_that_came_whole_in_a_large_read_takes_no_room(erq_factory):
    """A set whose data came in one read is not held in max_pending_data, also behind
    hundreds of requests of the same read that wait their turn (a read cut into slices
    made its data look as if it came in pieces, and a small limit refused it)."""
    server = erq_factory(config=config(server='max_pending_data = "12KiB"'))
    c = server.client()
    value = b"v" * 12000
    batch = b"set qa 0 0 1\r\nx\r\n" * 850 + b"set qb 0 0 12000\r\n" + value + b"\r\n"
    c.send(batch)
    c.sock.settimeout(30)
    assert b"".join(c.line() for _ in range(851)) == STORED * 851
    assert c.get("qb") == b"VALUE qb 0 12000\r\n" + value + b"\r\nEND\r\n"


def test_a_stop_runs_the_requests_read_behind_a_blocked_get(erq_factory):
    """PROTOCOL §6: a graceful stop finishes in-flight requests. Behind a get that waits,
    thousands of sets were read; the stop answers the get END and then runs them all (a turn
    of REQUESTS_PER_PASS a pass: one pass ran only the first turn, and the close dropped the
    rest unrun), and every one is there after a restart."""
    server = erq_factory()
    busy, watcher = server.client(), server.client()
    n = 3000
    batch = b"get qw/t=60000\r\n" + b"".join(b"set qa 0 0 5\r\n%05d\r\n" % i for i in range(n))
    asked = [int(watcher.stats()["bytes_read"])]

    def batch_read() -> bool:  # bytes_read counts the watcher's stats requests too
        asked.append(int(watcher.stats()["bytes_read"]))
        return asked[-1] - 7 * (len(asked) - 1) >= asked[0] + len(batch)

    busy.send(batch)
    poll(batch_read, "the batch to be read")
    watcher.close()
    server.proc.send_signal(signal.SIGTERM)
    busy.sock.settimeout(30)
    assert busy.line() == END
    assert b"".join(busy.line() for _ in range(n)) == STORED * n
    busy.close()
    assert server.proc.wait(30) == 0
    server.start()
    c = server.client()
    assert int(c.stats()["curr_items"]) == n
    assert c.get("qa") == b"VALUE qa 0 5\r\n00000\r\nEND\r\n"


def test_the_status_it_has_already_is_not_saved_again(erq_factory):
    server = erq_factory()
    client = server.client()
    assert client.call(b"status READONLY\r\n") == END
    path = server.data_dir / "erq.status"
    saved = os.stat(path)
    assert client.call(b"status readonly\r\n") == END
    again = os.stat(path)
    assert (again.st_ino, again.st_mtime_ns) == (saved.st_ino, saved.st_mtime_ns)
    assert client.call(b"status UP\r\n") == END
    assert path.read_text() == "UP\n"


def test_the_status_it_has_is_saved_again_when_its_file_says_otherwise(erq_factory):
    """A start that cannot read the status file runs UP and leaves the file as it is: an
    operator's `status UP` must then reach the file, or the next start reads the old one."""
    server = erq_factory()
    path = server.data_dir / "erq.status"
    server.stop()
    path.write_text("QUIESC\n")  # damaged: no status
    server.start()
    client = server.client()
    assert client.call(b"status\r\n") == b"UP\r\n"
    assert client.call(b"status UP\r\n") == END
    assert path.read_text() == "UP\n"
