"""Every command and get option of PROTOCOL.md sections 3-5 (with sections 8 and 10), exact
replies over real sockets to a real server process.

Waits are never guessed: a test that needs a blocked get polls ``stats`` until the queue's
``waiters`` count says the server registered it.
"""

from __future__ import annotations

import socket
import time
from collections import deque

import pytest

import erq

from conftest import ErqProcess, RawClient
from support import (
    DEFAULT_CONFIG,
    DELETED,
    END,
    ERROR,
    NOT_STORED,
    OK,
    RELOADED,
    STORED,
    VERSION_LINE,
    assert_closed,
    assert_open,
    config,
    one,
    parse_blocks,
    poll,
    queue_names,
    set_req,
    start,
    value,
    wait_for_stat,
)

PER_QUEUE_FIELDS = {
    "items",
    "bytes",
    "total_items",
    "logsize",
    "expired_items",
    "mem_items",
    "mem_bytes",
    "age",
    "discarded",
    "waiters",
    "open_transactions",
    "transactions",
    "canceled_transactions",
    "total_flushes",
    "journal_rewrites",
    "journal_rotations",
    "journal_sync_errors",
}
GENERAL_FIELDS = {
    "pid",
    "uptime",
    "time",
    "version",
    "curr_connections",
    "total_connections",
    "rejected_connections",
    "cmd_get",
    "cmd_set",
    "get_hits",
    "get_misses",
    "bytes_read",
    "bytes_written",
    "curr_items",
    "total_items",
    "bytes",
    "cmd_peek",
    "queue_creates",
    "queue_deletes",
    "queue_expires",
}


def queue_stats(stats: dict[str, str], name: str) -> dict[str, str]:
    prefix = f"queue_{name}_"
    fields = {k[len(prefix) :]: v for k, v in stats.items() if k.startswith(prefix)}
    return {k: v for k, v in fields.items() if k in PER_QUEUE_FIELDS or k == "children"}


def block_on(c: RawClient, key: str, watcher: RawClient, queue: str, waiters: int = 1) -> None:
    """Send a blocking get on ``c`` and wait until the server counts it as a waiter."""
    c.send(b"get %s\r\n" % key.encode())
    wait_for_stat(watcher, f"queue_{queue}_waiters", waiters)


# ---- set, get, gets ------------------------------------------------------------------------------
def test_set_get_and_gets_return_items_in_order_with_flags_and_the_item_id_as_cas(server):
    c = server.client()
    assert c.set("q", b"hello") == STORED
    assert c.set("q", b"world", flags=42) == STORED
    assert c.set("q", b"", flags=4294967295) == STORED
    head, _, rest = c.call(b"gets q\r\n", END).partition(b"\r\n")
    assert head.startswith(b"VALUE q 0 5 ") and rest == b"hello\r\nEND\r\n"
    first_id = int(head.split()[4])
    assert c.get("q") == one("q", b"world", 42)
    assert c.get("q") == one("q", b"", 4294967295)
    assert c.get("q") == END
    # The cas field is the item's id: distinct per item, the same when the item comes back.
    assert c.set("q", b"again") == STORED
    opened = c.call(b"gets q/open\r\n", END)
    cas = int(opened.split(b"\r\n")[0].split()[4])
    assert cas != first_id
    assert opened == b"VALUE q/open 0 5 %d\r\nagain\r\nEND\r\n" % cas
    assert c.get("q/abort") == END
    assert c.call(b"gets q/peek\r\n", END) == b"VALUE q/peek 0 5 %d\r\nagain\r\nEND\r\n" % cas
    assert c.call(b"gets q\r\n", END) == b"VALUE q 0 5 %d\r\nagain\r\nEND\r\n" % cas


def test_value_line_echoes_the_key_exactly_as_requested(server):
    c = server.client()
    for _ in range(4):
        assert c.set("jobs", b"hello") == STORED
    assert c.get("jobs/t=500/open") == one("jobs/t=500/open", b"hello")
    assert c.get("jobs/t=500/close") == END
    assert c.get("jobs/peek/t=1") == one("jobs/peek/t=1", b"hello")
    assert c.get("jobs/open/close") == one("jobs/open/close", b"hello")
    assert c.get("jobs/close") == END
    assert c.get("jobs/unknown/x=y") == one("jobs/unknown/x=y", b"hello")  # unknown options ignored
    assert c.call(b"get jobs/\r\n", END) == one("jobs/", b"hello")
    assert c.stats()["queue_jobs_items"] == "0"


def test_command_words_are_case_insensitive_arguments_case_sensitive_and_spaces_repeatable(
    server,
):
    c = server.client()
    assert c.call(b"SET q 0 0 1\r\na\r\n") == STORED
    assert c.call(b"Set Q 0 0 1\r\nB\r\n") == STORED
    assert c.call(b"set   q   7  0    2\r\nbc\r\n") == STORED
    assert c.call(b"GeT q\r\n", END) == one("q", b"a")
    assert c.call(b"get Q\r\n", END) == one("Q", b"B")
    assert c.call(b"get    q   \r\n", END) == one("q", b"bc", 7)
    assert c.call(b"VERSION\r\n") == VERSION_LINE
    assert c.call(b"get q\n", END) == END  # a bare LF ends a line too
    assert c.call(b"get q/OPEN\r\n", END) == END  # "OPEN" is an unknown option: a plain get
    assert c.stats()["queue_q_open_transactions"] == "0"


def test_multi_key_get_runs_each_key_as_its_own_get_and_ends_once(server):
    c = server.client()
    c.send(set_req(b"a", b"1") + set_req(b"a", b"2") + set_req(b"c", b"3", flags=5))
    assert [c.line() for _ in range(3)] == [STORED] * 3
    assert (
        c.call(b"get a b c a b\r\n", END)
        == value("a", b"1") + value("c", b"3", 5) + value("a", b"2") + END
    )
    assert c.call(b"get a b\r\n", END) == END
    assert c.set("a", b"x") == STORED
    # Each key with its own options: peek, then open, then close (which only confirms).
    assert (
        c.call(b"get a/peek a/open a/close\r\n", END)
        == value("a/peek", b"x") + value("a/open", b"x") + END
    )
    stats = c.stats()
    assert (stats["queue_a_items"], stats["queue_a_open_transactions"]) == ("0", "0")
    assert stats["queue_a_transactions"] == "1"
    # gets adds each item's id.
    c.send(set_req(b"a", b"y") + set_req(b"c", b"z"))
    assert [c.line() for _ in range(2)] == [STORED] * 2
    reply = c.call(b"gets a nosuch c\r\n", END).split(b"\r\n")
    assert reply[0].startswith(b"VALUE a 0 1 ") and reply[1] == b"y"
    assert reply[2].startswith(b"VALUE c 0 1 ") and reply[3] == b"z"
    assert reply[4:] == [b"END", b""]
    # Each key with its own wait: the second key runs once the first one got its item.
    assert c.set("c", b"w") == STORED
    other = server.client()
    block_on(c, "a/t=60000 c", other, "a")
    assert other.set("a", b"v") == STORED
    assert c.until() == value("a/t=60000", b"v") + value("c", b"w") + END


# ---- blocking gets ----------------------------------------------------------------------------------
def test_blocking_get_is_woken_by_a_set_on_another_connection_or_times_out_with_end(server):
    c = server.client()
    setter = server.client()
    block_on(c, "q/t=60000", setter, "q")
    assert setter.set("q", b"wake", flags=3) == STORED
    assert c.until() == one("q/t=60000", b"wake", 3)
    assert setter.stats()["queue_q_waiters"] == "0"
    block_on(c, "q/t=60000/open", setter, "q")
    assert setter.set("q", b"reliably") == STORED
    assert c.until() == one("q/t=60000/open", b"reliably")
    assert setter.stats()["queue_q_open_transactions"] == "1"
    assert c.get("q/close") == END
    assert c.get("q/t=1") == END
    assert c.get("q/t=0") == END
    assert c.get("fresh/t=20") == END
    stats = setter.stats()
    assert (stats["queue_q_waiters"], stats["queue_fresh_waiters"]) == ("0", "0")


def test_requests_sent_while_a_get_waits_run_after_it_in_order_woken_or_timed_out(server):
    """What a client sends while its get waits for an item waits unparsed, reading stopped
    (a pipeline of many-key gets so held cost 13 MB a client), and runs after the get, in
    order, whether an item wakes it or its t= elapses."""
    c = server.client()
    setter = server.client()
    keys = b" ".join(b"k%d" % i for i in range(600))
    behind = (b"get " + keys + b"\r\n") * 40 + set_req(b"r", b"hi") + b"get r\r\n"
    for woken in (True, False):
        block_on(c, "q/t=60000" if woken else "q/t=300", setter, "q")
        c.send(behind)  # 24,000 keys: many turns of a read's 256
        if woken:
            assert setter.set("q", b"wake") == STORED
            assert c.until() == one("q/t=60000", b"wake")
        else:
            assert c.until() == END
        assert [c.until() for _ in range(40)] == [END] * 40
        assert c.line() == STORED
        assert c.until() == one("r", b"hi")
        assert c.call(b"version\r\n").startswith(b"VERSION ")


def test_a_client_that_leaves_a_pipeline_behind_a_waiting_get_is_heard_and_gets_no_item(
    server,
):
    """A client sends a get that waits and 200 KB of requests behind it, then closes. The
    server reads on behind the get up to 256 KiB, kept as it came (not parsed), so the
    client's FIN reaches it: the get stops waiting and the next item stays queued rather
    than going to a client that is gone."""
    c = server.client()
    watcher = server.client()
    c.send(b"get q/t=60000\r\n")
    wait_for_stat(watcher, "queue_q_waiters", "1")
    c.send(b"version\r\n" * 22_000)
    c.close()
    wait_for_stat(watcher, "queue_q_waiters", "0")
    assert watcher.set("q", b"kept") == STORED
    assert watcher.stats()["queue_q_items"] == "1"


def test_blocked_gets_are_served_in_the_order_they_started_waiting(server):
    setter = server.client()
    waiters = [server.client() for _ in range(3)]
    for i, w in enumerate(waiters):
        block_on(w, "q/t=60000", setter, "q", waiters=i + 1)
    setter.send(set_req(b"q", b"x1") + set_req(b"q", b"x2") + set_req(b"q", b"x3"))
    assert [setter.line() for _ in range(3)] == [STORED] * 3
    for w, data in zip(waiters, (b"x1", b"x2", b"x3"), strict=True):
        assert w.until() == one("q/t=60000", data)


def test_waiter_whose_connection_died_does_not_swallow_an_item(server):
    setter = server.client()
    for key in ("q/t=60000", "q/t=60000/open", "q/peek/t=60000"):
        dead = server.client()
        block_on(dead, key, setter, "q")
        dead.close()
        wait_for_stat(setter, "queue_q_waiters", 0)
        assert setter.set("q", b"kept") == STORED
        assert server.client().get("q") == one("q", b"kept")


def test_blocking_get_holds_back_later_replies_on_its_connection_only(server):
    c = server.client()
    other = server.client()
    c.send(b"get q/t=60000\r\nversion\r\nget r\r\n")
    wait_for_stat(other, "queue_q_waiters", 1)
    assert_open(other)  # other connections are served meanwhile
    assert other.set("r", b"later") == STORED
    c.sock.settimeout(0.2)
    try:
        early = c.sock.recv(100)
    except TimeoutError:
        early = b""
    assert early == b""  # the version behind the blocked get is not answered yet
    c.sock.settimeout(5)
    assert other.set("q", b"first") == STORED
    assert c.until() == one("q/t=60000", b"first")
    assert c.line() == VERSION_LINE
    assert c.until() == one("r", b"later")


# ---- reliable reads ----------------------------------------------------------------------------------
def test_open_close_abort_and_peek_follow_reliable_read_rules(server):
    c = server.client()
    c.send(set_req(b"q", b"a") + set_req(b"q", b"b") + set_req(b"q", b"c"))
    assert [c.line() for _ in range(3)] == [STORED] * 3
    assert c.get("q/open") == one("q/open", b"a")
    stats = c.stats()
    assert (stats["queue_q_items"], stats["queue_q_bytes"]) == ("2", "2")
    assert (stats["queue_q_open_transactions"], stats["queue_q_transactions"]) == ("1", "1")
    assert c.get("q/peek") == one("q/peek", b"b")  # the open read is not the head
    assert c.get("q/abort") == END
    stats = c.stats()
    assert (stats["queue_q_items"], stats["queue_q_open_transactions"]) == ("3", "0")
    assert stats["queue_q_canceled_transactions"] == "1"
    assert c.get("q/peek") == one("q/peek", b"a")  # an aborted read is back at the head
    assert c.get("q/open") == one("q/open", b"a")
    other = server.client()
    assert other.get("q/close") == END  # another connection cannot close it
    assert other.get("q/abort") == END
    assert c.stats()["queue_q_open_transactions"] == "1"
    assert c.get("q/close") == END
    stats = c.stats()
    assert (stats["queue_q_items"], stats["queue_q_open_transactions"]) == ("2", "0")
    assert c.get("q/close") == END  # nothing open: silently nothing
    assert c.get("q/abort") == END
    assert c.get("q") == one("q", b"b")
    # A peek may wait; it leaves the item in place.
    block_on(c, "p/peek/t=60000", other, "p")
    assert other.set("p", b"z", flags=8) == STORED
    assert c.until() == one("p/peek/t=60000", b"z", 8)
    assert other.get("p") == one("p", b"z", 8)


def test_close_open_worker_loop_confirms_the_last_read_and_reserves_the_next(server):
    c = server.client()
    c.send(set_req(b"q", b"a") + set_req(b"q", b"b") + set_req(b"q", b"c"))
    assert [c.line() for _ in range(3)] == [STORED] * 3
    assert c.get("q/close/open") == one("q/close/open", b"a")
    assert c.get("q/close/open") == one("q/close/open", b"b")
    assert c.get("q/open/close") == one("q/open/close", b"c")
    assert c.stats()["queue_q_open_transactions"] == "1"
    assert c.get("q/close/open") == END
    stats = c.stats()
    assert (stats["queue_q_items"], stats["queue_q_open_transactions"]) == ("0", "0")
    assert (stats["queue_q_transactions"], stats["queue_q_canceled_transactions"]) == ("3", "0")


def test_disconnect_returns_open_reads_to_the_head_in_original_order(server):
    watcher = server.client()
    watcher.send(b"".join(set_req(b"q", b"%d" % i) for i in range(5)))
    assert [watcher.line() for _ in range(5)] == [STORED] * 5
    c = server.client()
    c.send(b"get q/open\r\n" * 3)
    for i in range(3):
        assert c.until() == one("q/open", b"%d" % i)
    assert c.get("q/close") == END  # confirms 0
    assert c.get("q/open") == one("q/open", b"3")
    c.close()
    stats = wait_for_stat(watcher, "queue_q_open_transactions", 0)
    assert (stats["queue_q_items"], stats["queue_q_canceled_transactions"]) == ("4", "3")
    watcher.send(b"get q\r\n" * 5)
    for data in (b"1", b"2", b"3", b"4"):
        assert watcher.until() == one("q", data)
    assert watcher.until() == END


def test_reads_returned_together_reach_a_blocked_get_oldest_first(erq_factory):
    """A disconnect (or open_timeout) returns several reads at once: all are back at the head
    in their original order before a blocked get is handed one, so it gets the oldest."""
    server = start(erq_factory, queues='[queues."timed"]\nopen_timeout = "200ms"\n')
    watcher = server.client()
    for queue in ("q", "timed"):
        watcher.send(b"".join(set_req(queue.encode(), b"r%d" % i) for i in (1, 2, 3)))
        assert [watcher.line() for _ in range(3)] == [STORED] * 3
        holder = server.client()
        holder.send(f"get {queue}/open\r\n".encode() * 3)
        for i in (1, 2, 3):
            assert holder.until() == one(f"{queue}/open", b"r%d" % i)
        waiter = server.client()
        block_on(waiter, f"{queue}/t=60000", watcher, queue)
        if queue == "q":
            holder.close()
        assert waiter.until() == one(f"{queue}/t=60000", b"r1")
        watcher.send(f"get {queue}\r\n".encode() * 3)
        assert [watcher.until() for _ in range(3)] == [one(queue, b"r2"), one(queue, b"r3"), END]


def test_open_reads_are_outside_the_full_check_and_come_back_after_open_timeout(erq_factory):
    server = start(
        erq_factory,
        queues='[queues."full"]\nmax_items = 1\n[queues."timed"]\nopen_timeout = "100ms"\n',
    )
    c = server.client()
    watcher = server.client()
    assert c.set("full", b"a") == STORED
    assert c.set("full", b"b") == NOT_STORED
    assert c.get("full/open") == one("full/open", b"a")
    assert c.set("full", b"b") == STORED  # the open read is not counted
    stats = c.stats()
    assert (stats["queue_full_items"], stats["queue_full_open_transactions"]) == ("1", "1")
    assert c.set("timed", b"x") == STORED
    assert c.get("timed/open") == one("timed/open", b"x")
    stats = wait_for_stat(watcher, "queue_timed_canceled_transactions", 1)
    assert (stats["queue_timed_items"], stats["queue_timed_open_transactions"]) == ("1", "0")
    assert c.get("timed/close") == END  # nothing of ours is open any more
    assert c.get("timed") == one("timed", b"x")  # so a plain get is allowed


def test_reads_open_at_a_restart_or_crash_are_back_at_the_head_in_original_order(server):
    for stop in (server.stop, server.kill):
        c = server.client()
        c.send(b"".join(set_req(b"q", b"%d" % i) for i in range(5)) + b"get empty\r\n")
        assert [c.line() for _ in range(6)] == [STORED] * 5 + [END]
        c.send(b"get q/open\r\n" * 3 + b"get q/close\r\n" + b"get q/open\r\n")
        for data in (b"0", b"1", b"2"):
            assert c.until() == one("q/open", data)
        assert c.until() == END  # confirms 0
        assert c.until() == one("q/open", b"3")
        stop()
        server.start()
        c = server.client()
        # Queues outlive a restart, empty or not; the open reads 1, 2, 3 lead again.
        assert queue_names(c) == {"q", "empty"}
        c.send(b"get q\r\n" * 5)
        for data in (b"1", b"2", b"3", b"4"):
            assert c.until() == one("q", data)
        assert c.until() == END
        c.close()
    # A graceful stop journals the reads' return before the journals close: no warning.
    assert "not journaled" not in server.read_log()


def test_a_half_closed_client_gets_every_reply_due_then_the_connection_closes(erq_factory):
    """``shutdown(SHUT_WR)`` after a pipeline (``nc -N``): with fsync = "always" the STORED
    waits for the sync, and the connection stays half open until it went out."""
    server = start(erq_factory, queues='[queues.default]\nfsync = "always"\n')
    for tail in (b"", b"get empty/t=60000\r\nversion\r\n"):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(set_req(b"q", b"hello") + b"get q/peek\r\nversion\r\n" + tail)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        sock.close()
        # A get still blocked at the end of the stream ends unanswered, with what follows it.
        assert got == STORED + one("q/peek", b"hello") + VERSION_LINE, got
    c = server.client()
    assert c.get("q") == one("q", b"hello")
    assert c.get("q") == one("q", b"hello")
    assert c.stats()["queue_empty_waiters"] == "0"


@pytest.mark.parametrize("leave", ["shutdown", "close"])
def test_a_client_that_ends_its_stream_in_a_blocked_get_is_closed_and_the_next_item_stays_queued(
    server, leave
):
    """``get q/t=3000``, then the end of the stream: ``shutdown(SHUT_WR)`` (``nc -N``), or a
    close (a worker killed in its blocking get, a client whose own timeout ran out). The
    server sees the same FIN either way and cannot tell a client that still reads from one
    that left, to which an item would be written and lost. So the replies due before the get
    go out, the get ends unanswered at once (not at its timeout), and the next item stays
    queued for a reader that is there."""
    watcher = server.client()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"version\r\nget q/t=3000\r\n")
    wait_for_stat(watcher, "queue_q_waiters", 1)
    started = time.monotonic()
    if leave == "shutdown":
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        assert got == VERSION_LINE
    sock.close()
    wait_for_stat(watcher, "queue_q_waiters", 0)
    assert time.monotonic() - started < 2
    assert watcher.set("q", b"next") == STORED
    assert watcher.get("q") == one("q", b"next")


def test_a_half_closed_client_gets_the_replies_of_requests_held_back_for_its_output(erq_factory):
    """Past the output budget, requests wait until the replies before them go out (here: a
    STORED waiting for its sync holds 4 MiB of peeks behind it). A client that shut its side
    meanwhile still gets every one of them, in order, then the end of the stream."""
    server = start(erq_factory, queues='[queues.default]\nfsync = "always"\n')
    c = server.client()
    item = b"p" * (512 << 10)
    assert c.set("big", item) == STORED
    peeks = 8
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(set_req(b"q", b"x") + b"get big/peek\r\n" * peeks + b"get q/open\r\nversion\r\n")
    sock.shutdown(socket.SHUT_WR)
    got = bytearray()
    while chunk := sock.recv(1 << 20):
        got += chunk
    sock.close()
    expected = STORED + one("big/peek", item) * peeks + one("q/open", b"x") + VERSION_LINE
    assert bytes(got) == expected
    assert c.get("q") == one("q", b"x")  # the read went back once the connection closed


# ---- delete, flush, flush_all, flush_expired ----------------------------------------------------------
def test_delete_drops_items_and_open_reads_answers_blocked_gets_and_creates_nothing(server):
    admin = server.client()
    admin.send(set_req(b"q", b"a") + set_req(b"q", b"b"))
    assert [admin.line() for _ in range(2)] == [STORED] * 2
    reader = server.client()
    assert reader.get("q/open") == one("q/open", b"a")
    waiter = server.client()
    block_on(waiter, "w/t=60000", admin, "w")
    assert admin.call(b"delete q\r\n") == DELETED
    assert admin.call(b"delete w\r\n") == DELETED
    assert waiter.until() == END  # the blocked get is answered
    assert_open(waiter)
    assert reader.get("q/abort") == END
    assert queue_names(admin) == set()  # the abort neither restored the read nor made a queue
    reader.close()
    wait_for_stat(admin, "curr_connections", 2)
    assert queue_names(admin) == set()  # nor did the disconnect
    assert admin.call(b"delete nosuch\r\n") == DELETED
    assert admin.call(b"delete q\r\n") == DELETED
    assert queue_names(admin) == set()
    assert admin.set("q", b"new") == STORED
    assert admin.get("q") == one("q", b"new")
    assert admin.get("q") == END


def test_delete_takes_memcacheds_hold_time_of_zero_and_a_queue_named_noreply(server):
    c = server.client()
    for request, silent in (
        (b"delete q 0\r\n", False),
        (b"delete q 0 noreply\r\n", True),
    ):
        assert c.set("q", b"x") == STORED
        c.send(request)
        if not silent:
            assert c.line() == DELETED
        assert queue_names(c) == set()
    # A queue named noreply: the word is the flag only after a name (as memcached reads it).
    for request in (b"delete noreply\r\n", b"delete noreply 0\r\n", b"flush noreply\r\n"):
        assert c.set("noreply", b"x") == STORED
        assert c.call(request) == (END if request.startswith(b"flush") else DELETED)
        assert c.get("noreply") == END
    c.send(b"delete noreply noreply\r\n")
    assert c.call(b"version\r\n").startswith(b"VERSION ")
    assert c.call(b"delete noreply\r\n") == DELETED
    assert c.set("q", b"x") == STORED
    for request in (b"delete q 5\r\n", b"delete q 0 0\r\n", b"delete q x\r\n"):
        assert c.call(request) == b"CLIENT_ERROR bad command line format\r\n"
    assert queue_names(c) == {"q"}


def test_flush_drops_queued_items_but_not_open_reads_or_waiters(server):
    admin = server.client()
    admin.send(set_req(b"q", b"a") + set_req(b"q", b"b") + set_req(b"q", b"c"))
    assert [admin.line() for _ in range(3)] == [STORED] * 3
    reader = server.client()
    assert reader.get("q/open") == one("q/open", b"a")
    assert admin.call(b"flush q\r\n") == END
    stats = admin.stats()
    assert (stats["queue_q_items"], stats["queue_q_bytes"]) == ("0", "0")
    assert (stats["queue_q_open_transactions"], stats["queue_q_total_flushes"]) == ("1", "1")
    assert reader.get("q/abort") == END
    assert admin.get("q") == one("q", b"a")
    waiter = server.client()
    block_on(waiter, "q/t=60000", admin, "q")
    assert admin.call(b"flush q\r\n") == END
    assert admin.stats()["queue_q_waiters"] == "1"  # still waiting
    assert admin.set("q", b"d") == STORED
    assert waiter.until() == one("q/t=60000", b"d")
    assert admin.call(b"flush nosuch\r\n") == END
    assert queue_names(admin) == {"q"}


def test_flush_all_answers_ok_flushes_now_whatever_the_delay_and_leaves_waiters(server):
    c = server.client()
    for delay in (b"", b" 0", b" 30"):
        c.send(set_req(b"a", b"x") + set_req(b"b", b"y"))
        assert [c.line() for _ in range(2)] == [STORED] * 2
        assert c.call(b"flush_all%s\r\n" % delay) == OK
        stats = c.stats()
        assert (stats["queue_a_items"], stats["queue_b_items"]) == ("0", "0")
    assert c.stats()["queue_a_total_flushes"] == "3"
    waiter = server.client()
    block_on(waiter, "a/t=60000", c, "a")
    assert c.call(b"flush_all\r\n") == OK
    assert c.stats()["queue_a_waiters"] == "1"
    assert c.set("a", b"z") == STORED
    assert waiter.until() == one("a/t=60000", b"z")


def test_flush_expired_and_flush_all_expired_answer_the_number_of_expired_items(server):
    c = server.client()
    # One send: the periodic expiry sweep cannot run between these requests.
    c.send(
        set_req(b"q", b"a", exptime=-1)  # negative: already expired
        + set_req(b"q", b"b", exptime=-5)
        + set_req(b"q", b"c")
        + set_req(b"r", b"d", exptime=2592001)  # over 30 days: absolute Unix time, long past
        + set_req(b"r", b"e", exptime=2592000)  # 30 days: relative
        + set_req(b"r", b"g", exptime=1000001)  # relative here; absolute only for Kestrel
        + set_req(b"s", b"f", exptime=-1)
        + b"flush_expired q\r\nflush_all_expired\r\nflush_expired nosuch\r\nflush_all_expired\r\n"
    )
    assert [c.line() for _ in range(7)] == [STORED] * 7
    assert [c.line() for _ in range(4)] == [b"2\r\n", b"2\r\n", b"0\r\n", b"0\r\n"]
    assert c.get("q") == one("q", b"c")
    assert c.get("r") == one("r", b"e")
    assert c.get("r") == one("r", b"g")
    stats = c.stats()
    assert [stats[f"queue_{n}_expired_items"] for n in "qrs"] == ["2", "1", "1"]
    assert queue_names(c) == {"q", "r", "s"}
    # A get skips (and removes) an expired head.
    c.send(set_req(b"t", b"old", exptime=-1) + set_req(b"t", b"new") + b"get t\r\n")
    assert [c.line() for _ in range(2)] == [STORED] * 2
    assert c.until() == one("t", b"new")


# ---- monitor / confirm -------------------------------------------------------------------------------
def test_monitor_streams_open_reads_until_max_or_timeout_and_confirm_closes_them(erq_factory):
    server = start(erq_factory, server="max_open_reads = 3")
    c = server.client()
    setter = server.client()
    c.send(b"".join(set_req(b"q", x) for x in (b"a", b"b", b"c", b"d", b"e")))
    assert [c.line() for _ in range(5)] == [STORED] * 5
    assert c.call(b"monitor q 60 2\r\n", END) == one("q", b"a")
    assert c.until() == one("q", b"b")
    assert c.line() == END
    stats = c.stats()
    assert (stats["queue_q_open_transactions"], stats["queue_q_items"]) == ("2", "3")
    assert c.call(b"confirm q 1\r\n") == END  # the oldest: a
    assert c.stats()["queue_q_open_transactions"] == "1"
    # Without max it stops at max_open_reads (b is still open: two more).
    assert c.call(b"monitor q 60\r\n", END) == one("q", b"c")
    assert c.until() == one("q", b"d")
    assert c.line() == END
    assert c.call(b"confirm q 3\r\n") == END
    # It waits for items set meanwhile.
    assert c.call(b"monitor q 60 2\r\n", END) == one("q", b"e")
    assert setter.stats()["queue_q_waiters"] == "0"  # a waiting monitor is not a waiter
    assert setter.set("q", b"f") == STORED
    assert c.until() == one("q", b"f")
    assert c.line() == END
    assert c.call(b"confirm q 2\r\n") == END
    # When the seconds pass, one more END (leading zeros are the number's, as in set).
    assert c.call(b"monitor q 0001 " + b"0" * 25 + b"9\r\n") == END
    stats = c.stats()
    assert (stats["queue_q_open_transactions"], stats["queue_q_transactions"]) == ("0", "6")
    assert (stats["queue_q_waiters"], stats["cmd_get"]) == ("0", "6")  # each item counts
    # Monitor reads are open reads: a disconnect returns them.
    assert setter.set("q", b"g") == STORED
    assert c.call(b"monitor q 60 1\r\n", END) == one("q", b"g")
    assert c.line() == END
    c.close()
    wait_for_stat(setter, "queue_q_open_transactions", 0)
    assert setter.get("q") == one("q", b"g")


def test_a_monitor_whose_client_does_not_read_takes_no_more_items_until_it_does(erq_factory):
    """A monitor's items are replies like a get's: once the client stops taking them, the
    monitor waits (a client that does not read costs OUT_BUDGET, not up to max items, read
    back from disk past max_memory_size). It goes on as the client reads: every item comes,
    in order, each an open read, then the final END; the queue ends empty."""
    count = 60
    server = start(
        erq_factory,
        server=f"max_open_reads = {count}",
        queues='[queues.default]\nmax_memory_size = "1MiB"',
    )
    items = [bytes([65 + i % 26]) * (1 << 20) for i in range(count)]
    c = server.client()
    for item in items:
        assert c.set("q", item) == STORED
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(b"monitor q 60 %d\r\n" % count)
    time.sleep(0.5)
    stats = c.stats()
    assert int(stats["queue_q_open_transactions"]) < count // 2, stats
    reader = RawClient.__new__(RawClient)
    reader.sock, reader.buf = sock, b""
    for item in items:
        assert reader.until() == one("q", item)
    assert reader.line() == END
    stats = c.stats()
    assert (stats["queue_q_open_transactions"], stats["queue_q_items"]) == (str(count), "0")
    assert reader.call(b"confirm q %d\r\n" % count) == END
    assert c.stats()["queue_q_open_transactions"] == "0"


@pytest.mark.parametrize("compat", ["erq", "kestrel"])
def test_monitor_sends_the_items_flags_or_kestrels_zero_for_items_queued_and_awaited(
    erq_factory, compat
):
    """A monitored item's VALUE line names the queue and carries its flags; in Kestrel's wire
    mode (which sends no flags) a 0, as a get there does."""
    server = start(erq_factory, server=f'compat = "{compat}"')
    c = server.client()
    setter = server.client()
    assert c.call(set_req(b"m", b"queued", flags=7)) == STORED
    flags = 0 if compat == "kestrel" else 7
    assert c.call(b"monitor m 60 2\r\n", END) == one("m", b"queued", flags)
    time.sleep(0.2)  # the monitor now waits for the second item
    assert setter.call(set_req(b"m", b"awaited", flags=9)) == STORED
    assert c.until() == one("m", b"awaited", 0 if compat == "kestrel" else 9)
    assert c.line() == END
    assert c.call(b"confirm m 2\r\n") == END


def test_waits_longer_than_any_clock_are_cut_short_not_refused(server):
    """``monitor q <seconds>`` takes up to 18 digits and ``t=`` any number of them: a wait
    past ~31 years is cut to that (a C deadline would overflow), leading zeros are read."""
    c = server.client()
    setter = server.client()
    c.send(b"monitor m 999999999999999999 1\r\n")
    time.sleep(0.3)  # so that it waits (a monitor is not counted among the waiters)
    assert setter.set("m", b"late") == STORED
    assert c.until() == one("m", b"late")
    assert c.line() == END
    assert c.call(b"confirm m 1\r\n") == END
    assert setter.set("m", b"next") == STORED  # the queue still takes and hands out items
    assert setter.get("m") == one("m", b"next")
    assert c.get("q/t=0000000000001") == END
    key = "q/t=" + "9" * 40
    block_on(c, key, setter, "q")
    assert setter.set("q", b"woken") == STORED
    assert c.until() == one(key, b"woken")
    assert c.get("q/t=" + "0" * 5000) == END  # no int() of 5,000 digits


def test_a_signed_wait_is_an_integer_and_a_negative_one_does_not_wait(server):
    """``t=`` takes an integer as Kestrel's ``toInt`` does, sign included: a consumer that
    computes its wait from a deadline already past asks for a negative one and is answered at
    once (Kestrel's deadline in the past), not refused; a bare sign is still no integer."""
    c = server.client()
    setter = server.client()
    started = time.monotonic()
    assert c.get("q/t=-5") == END
    assert c.get("q/t=-99999999999999999999/open") == END
    assert time.monotonic() - started < 5  # neither waited (a blocked get would hold us)
    assert setter.set("q", b"ready") == STORED
    assert c.get("q/t=-5") == one("q/t=-5", b"ready")
    key = "q/t=+60000"
    block_on(c, key, setter, "q")
    assert setter.set("q", b"woken") == STORED
    assert c.until() == one(key, b"woken")
    for bad in ("q/t=-", "q/t=+", "q/t=--5", "q/t=+-5", "q/t= 5"):
        assert c.call(b"get %s\r\n" % bad.encode()) == b"CLIENT_ERROR bad command line format\r\n"
    assert c.get("q/t=0") == END  # the connection stays usable


# ---- status ------------------------------------------------------------------------------------------
def test_a_queue_may_be_called_STATUS_and_an_earlier_status_file_is_taken_over(erq_factory):
    server = erq_factory(start=False)
    server.data_dir.mkdir(parents=True, exist_ok=True)
    (server.data_dir / "STATUS").write_text("READONLY\n")  # where earlier builds kept it
    server.start()
    c = server.client()
    assert c.call(b"status\r\n") == b"READONLY\r\n"
    assert c.call(b"status up\r\n") == END
    assert c.set("STATUS", b"a queue") == STORED
    assert c.call(b"status readonly\r\n") == END
    assert c.call(b"status\r\nversion\r\n", VERSION_LINE) == b"READONLY\r\n" + VERSION_LINE
    c.close()
    server.restart()
    c = server.client()
    assert c.call(b"status\r\n") == b"READONLY\r\n"
    assert c.call(b"status up\r\n") == END
    assert c.get("STATUS") == one("STATUS", b"a queue")
    assert sorted(p.name for p in server.data_dir.iterdir() if p.is_file()) == [
        "erq.lock",
        "erq.status",
    ]


def test_a_status_that_cannot_be_saved_is_refused_and_left_as_it_was(server):
    c = server.client()
    assert c.set("q", b"x") == STORED
    (server.data_dir / "erq.status").mkdir()  # the status file cannot be replaced now
    reply = c.call(b"status readonly\r\n")
    assert reply.startswith(b"SERVER_ERROR cannot save the status: "), reply
    assert c.call(b"status\r\n") == b"UP\r\n"
    assert c.set("q", b"y") == STORED
    assert "cannot save it" in server.read_log()
    # Asked again and again, it is refused each time and logged once per 10 s.
    c.send(b"status readonly\r\n" * 200)
    for _ in range(200):
        assert c.line().startswith(b"SERVER_ERROR cannot save the status: ")
    assert server.read_log().count("cannot save it") == 1
    (server.data_dir / "erq.status").rmdir()
    assert c.call(b"status readonly\r\n") == END
    assert c.call(b"status\r\n") == b"READONLY\r\n"


def test_status_words_are_case_insensitive_and_survive_a_restart(server):
    c = server.client()
    assert c.call(b"status\r\n") == b"UP\r\n"
    for word, shown in ((b"readonly", b"READONLY"), (b"Quiescent", b"QUIESCENT"), (b"UP", b"UP")):
        assert c.call(b"status %s\r\n" % word) == END
        assert c.call(b"STATUS\r\n") == shown + b"\r\n"
    assert c.call(b"status ReadOnly\r\n") == END
    c.close()
    server.restart()
    c = server.client()
    assert c.call(b"status\r\n") == b"READONLY\r\n"
    assert c.call(set_req(b"q", b"x")) == b"SERVER_ERROR read only\r\n"
    assert c.call(b"status quiescent\r\n") == END
    c.close()
    server.restart()
    c = server.client()
    assert c.call(b"status\r\n") == b"QUIESCENT\r\n"
    assert c.call(b"status up\r\n") == END
    assert c.set("q", b"x") == STORED


def test_each_status_refuses_what_it_refuses_from_its_change_and_after_a_restart(server):
    """UP takes sets and gets; READONLY refuses sets, deletes and flushes and serves gets;
    QUIESCENT refuses gets and monitors too (PROTOCOL §8). The server reads flags kept beside
    the word on every set and get: each change must move them, and so must a start that reads
    the word from its file."""
    read_only, quiescent = b"SERVER_ERROR read only\r\n", b"SERVER_ERROR quiescent\r\n"
    c = server.client()

    def behaves_as(word: bytes) -> None:
        assert c.call(b"status\r\n") == word + b"\r\n"
        if word == b"UP":
            assert c.set("u", b"1") == STORED
            assert c.get("u") == one("u", b"1")
            return
        assert c.call(set_req(b"q", b"1")) == read_only
        assert c.call(b"delete q\r\n") == read_only
        assert c.call(b"flush_all\r\n") == read_only
        if word == b"READONLY":
            assert c.get("q") == one("q", b"kept")
            assert c.call(b"status UP\r\n") == END
            assert c.set("q", b"kept") == STORED  # for the next READONLY
            assert c.call(b"status READONLY\r\n") == END
        else:
            assert c.call(b"get q\r\n") == quiescent
            assert c.call(b"monitor q 1\r\n") == quiescent

    assert c.set("q", b"kept") == STORED
    for word in (b"READONLY", b"QUIESCENT", b"UP", b"QUIESCENT", b"READONLY", b"UP", b"READONLY"):
        assert c.call(b"status %s\r\n" % word) == END
        behaves_as(word)
    for word in (b"READONLY", b"QUIESCENT", b"UP"):
        assert c.call(b"status %s\r\n" % word) == END
        c.close()
        server.restart()
        c = server.client()
        behaves_as(word)


def test_a_status_file_deleted_under_the_server_is_written_again(server):
    """A tmp cleaner takes an erq.status not written since the status was set: the drained
    server came back UP at its next start, taking writes again."""
    c = server.client()
    assert c.call(b"status readonly\r\n") == END
    status_file = server.data_dir / "erq.status"
    status_file.unlink()
    # The warning comes after the file (whole at once: renamed into place): wait for both.
    said = "erq.status was deleted while the server runs: written again"
    poll(lambda: said in server.read_log(), "the status file written again")
    assert status_file.read_text() == "READONLY\n"
    c.close()
    server.restart()
    c = server.client()
    assert c.call(b"status\r\n") == b"READONLY\r\n"


# ---- stats, dump_stats, dump_config -------------------------------------------------------------------
def test_stats_and_dump_stats_count_exactly_after_a_scripted_sequence(erq_factory):
    server = start(erq_factory, queues='[queues."f"]\nmax_items = 1\n')
    began = time.monotonic()
    c = server.client()
    script = [
        (set_req(b"a", b"1"), STORED),  # cmd_set 1, total_items 1, queue_creates 1
        (set_req(b"a", b"22"), STORED),  # cmd_set 2, total_items 2
        (set_req(b"a", b"333"), STORED),  # cmd_set 3, total_items 3
        (b"get a\r\n", one("a", b"1")),  # cmd_get 1, hits 1
        (b"get a/peek\r\n", one("a/peek", b"22")),  # cmd_peek 1, hits 2
        (b"get b\r\n", END),  # cmd_get 2, misses 1, queue_creates 2
        (b"get a/open\r\n", one("a/open", b"22")),  # cmd_get 3, hits 3, a.transactions 1
        (b"get a/abort\r\n", END),  # a.canceled 1
        (b"get a/open\r\n", one("a/open", b"22")),  # cmd_get 4, hits 4, a.transactions 2
        (b"get a/close\r\n", END),  # confirms 22; counts nowhere
        (b"get a/close/open\r\n", one("a/close/open", b"333")),  # cmd_get 5, hits 5, a.tr 3
        (set_req(b"a", b"4444"), STORED),  # cmd_set 4, total_items 4
        (b"get a/peek/t=1\r\n", one("a/peek/t=1", b"4444")),  # cmd_peek 2, hits 6
        (set_req(b"f", b"x"), STORED),  # cmd_set 5, total_items 5, queue_creates 3
        (set_req(b"f", b"y"), NOT_STORED),  # cmd_set 6 (a refused request counts only here)
        (b"flush b\r\n", END),  # b.total_flushes 1
        (set_req(b"c", b"zz"), STORED),  # cmd_set 7, total_items 6, queue_creates 4
        (b"delete c\r\n", DELETED),  # queue_deletes 1
        (b"status quiescent\r\n", END),
        (b"get zz\r\n", b"SERVER_ERROR quiescent\r\n"),  # cmd_get 6 (refused: counts only here)
        (b"status up\r\n", END),
        (b"get p+k\r\n", END),  # cmd_get 7, misses 2, queue_creates 5 (a fanout child)
        (set_req(b"p", b"v"), STORED),  # cmd_set 8, total_items 8 (p and p+k), queue_creates 6
        (set_req(b"e", b"q"), STORED),  # cmd_set 9, total_items 9, queue_creates 7
        (b"get e\r\n", one("e", b"q")),  # cmd_get 8, hits 7
    ]
    for request, reply in script:
        assert c.call(request, END if reply.endswith(END) else None) == reply, request
    waiter = server.client()
    block_on(waiter, "b/t=60000", c, "b")  # cmd_get 9, neither a hit nor a miss yet
    stats = wait_for_stat(c, "curr_connections", 2)
    elapsed_ms = (time.monotonic() - began) * 1000
    assert set(stats) >= GENERAL_FIELDS
    expected_general = {
        "pid": str(server.proc.pid),
        "version": erq.__version__,
        "curr_connections": "2",
        "cmd_get": "9",
        "cmd_set": "9",
        "cmd_peek": "2",
        "get_hits": "7",
        "get_misses": "2",
        "curr_items": "4",  # a: 4444, f: x, p: v, p+k: v
        "total_items": "9",
        "bytes": "7",
        "queue_creates": "7",
        "queue_deletes": "1",
        "queue_expires": "0",
    }
    assert {k: stats[k] for k in expected_general} == expected_general
    zeros = dict.fromkeys(
        PER_QUEUE_FIELDS - {"logsize", "journal_rewrites", "journal_rotations"}, "0"
    )
    expected = {
        "a": {
            **zeros,
            "items": "1",
            "bytes": "4",
            "mem_items": "1",
            "mem_bytes": "4",
            "total_items": "4",
            "open_transactions": "1",
            "transactions": "3",
            "canceled_transactions": "1",
        },
        "b": {**zeros, "waiters": "1", "total_flushes": "1"},
        "e": {**zeros, "total_items": "1"},  # emptied: age is 0 again
        "f": {
            **zeros,
            "items": "1",
            "bytes": "1",
            "mem_items": "1",
            "mem_bytes": "1",
            "total_items": "1",
        },
        "p": {
            **zeros,
            "items": "1",
            "bytes": "1",
            "mem_items": "1",
            "mem_bytes": "1",
            "total_items": "1",
            "children": "p+k",
        },
        "p+k": {
            **zeros,
            "items": "1",
            "bytes": "1",
            "mem_items": "1",
            "mem_bytes": "1",
            "total_items": "1",
        },
    }
    assert not any(k.startswith("queue_c_") for k in stats)
    for name, fields in expected.items():
        got = queue_stats(stats, name)
        assert set(got) >= PER_QUEUE_FIELDS, name
        age = int(got["age"])
        if name == "a":  # ms since 333 was added; it is the most recently removed item
            assert 0 <= age <= elapsed_ms
            got["age"] = "0"
        assert {k: got[k] for k in fields} == fields, name
    # dump_stats: the same per-queue fields, unprefixed, in queue blocks.
    blocks = parse_blocks(c.call(b"dump_stats\r\n", END))
    assert set(blocks) == set(expected)
    for name, block in blocks.items():
        assert set(block) == set(queue_stats(stats, name)), name
        got = dict(block, age="0") if name == "a" else block
        assert {k: got[k] for k in expected[name]} == expected[name], name
    assert set(parse_blocks(c.call(b"dump_stats a nosuch p+k\r\n", END))) == {"a", "p+k"}
    assert c.call(b"dump_stats nosuch\r\n", END) == END
    # The waiter is served; the fetch now counts as a hit.
    assert c.set("b", b"w") == STORED
    assert waiter.until() == one("b/t=60000", b"w")
    stats = c.stats()
    assert (stats["get_hits"], stats["get_misses"], stats["cmd_get"]) == ("8", "2", "9")
    assert (stats["queue_b_waiters"], stats["queue_b_items"], stats["cmd_set"]) == ("0", "0", "10")


def test_stats_reset_zeroes_the_server_wide_counts_and_leaves_the_rest(server):
    """memcached's ``stats reset``: the counts of events since the start go back to 0 (a
    graph of their rate sees a counter reset), the gauges and each queue's fields stay; it
    was answered END and reset nothing."""
    c = server.client()
    for data in (b"a", b"bb", b"ccc"):
        assert c.set("q", data) == STORED
    assert c.get("q") == one("q", b"a")
    assert c.get("q/peek") == one("q/peek", b"bb")
    assert c.get("empty") == END
    assert c.call(b"delete empty\r\n") == DELETED
    other = server.client()
    assert other.call(b"version\r\n") == VERSION_LINE
    before = c.stats()
    assert before["cmd_get"] == "2" and int(before["total_connections"]) >= 2, before
    assert c.call(b"stats reset\r\n") == b"RESET\r\n"
    after = c.stats()
    for field in ("cmd_get", "cmd_set", "cmd_peek", "get_hits", "get_misses", "total_items"):
        assert after[field] == "0", (field, after[field])
    for field in ("total_connections", "rejected_connections", "pending_data_refusals"):
        assert after[field] == "0", (field, after[field])
    for field in ("queue_creates", "queue_deletes", "queue_expires"):
        assert after[field] == "0", (field, after[field])
    assert after["bytes_read"] == str(len(b"stats\r\n"))  # counted again from the reset on
    for field in ("curr_connections", "curr_items", "bytes", "item_memory"):
        assert after[field] == before[field], field
    for field, was in queue_stats(before, "q").items():  # a queue's own fields stay
        assert field == "age" or queue_stats(after, "q")[field] == was, field
    assert c.set("q", b"dddd") == STORED
    assert c.get("q") == one("q", b"bb")
    again = c.stats()
    assert (again["cmd_set"], again["cmd_get"], again["get_hits"]) == ("1", "1", "1")
    assert again["total_items"] == "1" and again["curr_items"] == "2"
    for other_request in (b"stats items\r\n", b"stats slabs\r\n", b"stats detail dump\r\n"):
        assert c.call(other_request) == END  # memcached's other groups: nothing to show


def test_bytes_read_and_written_count_every_byte_on_the_wire(server):
    c = server.client()
    sent = received = 0
    for request, terminator in (
        (set_req(b"q", b"abc", flags=1), None),
        (b"get q nosuch\r\n", END),
        (b"version\r\n", None),
        (b"bogus\r\n", None),
    ):
        sent += len(request)
        received += len(c.call(request, terminator))
    first = c.call(b"stats\r\n", END)
    sent += len(b"stats\r\n")
    assert b"STAT bytes_read %d\r\n" % sent in first
    assert b"STAT bytes_written %d\r\n" % received in first  # a reply counts once it is sent
    received += len(first)
    second = c.call(b"stats\r\n", END)
    sent += len(b"stats\r\n")
    assert b"STAT bytes_read %d\r\n" % sent in second
    assert b"STAT bytes_written %d\r\n" % received in second


def test_reload_rereads_the_config_file_and_queue_settings_change_live(erq_factory):
    base = config(queues='[queues."q"]\nmax_items = 1\n')
    server = erq_factory(config=base)
    c = server.client()
    assert c.set("q", b"a") == STORED
    assert c.set("q", b"b") == NOT_STORED
    server.write_config(config(queues='[queues."q"]\nmax_items = 2\n'))
    assert c.call(b"reload\r\n") == RELOADED
    assert c.set("q", b"b") == STORED
    assert c.set("q", b"c") == NOT_STORED
    assert parse_blocks(c.call(b"dump_config q\r\n", END))["q"]["max_items"] == "2"
    assert c.get("q") == one("q", b"a")


def test_dump_config_shows_each_existing_queue_with_canonical_values(erq_factory):
    server = start(
        erq_factory,
        queues=(
            '[queues."cfg"]\nmax_items = 10\nmax_size = "1KiB"\nmax_item_size = "512B"\n'
            'max_memory_size = "1MiB"\nmax_journal_size = "2MiB"\nmax_age = "30s"\n'
            'max_queue_age = "1h"\nopen_timeout = "1m"\ndiscard_old_when_full = true\n'
            'expire_to_queue = "dead"\nfsync = "always"\n'
            '[queues."nv"]\nfsync = "never"\n[queues."per"]\nfsync = "250ms"\n'
        ),
    )
    c = server.client()
    c.send(b"get cfg\r\nget plain\r\nget nv\r\nget per\r\n")
    assert [c.line() for _ in range(4)] == [END] * 4
    configured = {
        "max_items": "10",
        "max_size": "1024",
        "max_item_size": "512",
        "max_memory_size": "1048576",
        "max_journal_size": "2097152",
        "max_age": "30000",
        "max_queue_age": "3600000",
        "open_timeout": "60000",
        "discard_old_when_full": "true",
        "journal": "true",
        "expire_to_queue": "dead",
        "fsync": "always",
    }
    expected = {
        "cfg": configured,
        "plain": DEFAULT_CONFIG,
        "nv": dict(DEFAULT_CONFIG, fsync="never"),
        "per": dict(DEFAULT_CONFIG, fsync="250"),
    }
    assert parse_blocks(c.call(b"dump_config\r\n", END)) == expected
    reply = c.call(b"dump_config cfg nosuch plain\r\n", END)
    assert parse_blocks(reply) == {"cfg": configured, "plain": DEFAULT_CONFIG}
    assert c.call(b"dump_config nosuch\r\n", END) == END
    assert queue_names(c) == set(expected)


# ---- version, verbosity, quit, shutdown ---------------------------------------------------------------
def test_version_verbosity_and_quit(server):
    c = server.client()
    assert c.call(b"version\r\n") == VERSION_LINE
    assert c.call(b"verbosity 1\r\n") == OK
    assert c.call(b"verbosity 0\r\n") == OK
    c.send(b"version\r\nquit\r\nversion\r\n")
    assert c.line() == VERSION_LINE
    assert_closed(c)
    c = server.client()
    c.send(b"quit\r\n")
    assert_closed(c)
    assert_open(server.client())


def test_shutdown_closes_the_connection_without_reply_and_the_server_exits_zero(server):
    idle = server.client()
    assert_open(idle)
    c = server.client()
    c.send(b"version\r\nshutdown\r\n")
    assert c.line() == VERSION_LINE
    assert_closed(c)
    assert server.proc.wait(20) == 0
    assert idle.is_closed()


def test_shutdown_answers_every_blocked_get_and_the_waits_behind_it_end(server):
    """Graceful shutdown answers blocked gets END and finishes in-flight requests (PROTOCOL
    §6): a later key of a multi-key get, or a pipelined get, that would wait again once its
    blocked key was answered ends at once, as does a pipelined monitor. They waited anew,
    unanswered, and the connection closed without a reply."""
    watcher = server.client()
    same, other, piped = server.client(), server.client(), server.client()
    block_on(same, "sa/t=60000 sa/t=60000", watcher, "sa")
    assert watcher.get("sb") == END  # made before sz: shutdown answers sb's gets first
    block_on(other, "sz/t=60000 sb/t=60000", watcher, "sz")
    block_on(piped, "sc/t=60000", watcher, "sc")
    piped.send(b"get sc/t=60000\r\nmonitor sd 60\r\nversion\r\n")
    watcher.send(b"shutdown\r\n")
    assert same.until() == END
    assert other.until() == END
    assert [piped.until() for _ in range(3)] == [END] * 3  # the gets, then the monitor's END
    assert piped.line() == VERSION_LINE
    for c in (same, other, piped):
        assert_closed(c)
    assert server.proc.wait(20) == 0


# ---- section 10: which requests create a queue ----------------------------------------------------------
def test_only_accepted_set_fetch_peek_and_monitor_create_a_queue(erq_factory):
    server = start(erq_factory, server="max_item_size = 1024")
    c = server.client()
    for request in (
        set_req(b"n1", b"x"),
        b"get n2\r\n",
        b"get n3/peek\r\n",
        b"get n4/t=1\r\n",
        b"get n5/open\r\n",
        b"get n6/close/open\r\n",
        b"gets n7\r\n",
    ):
        assert c.call(request, None if request.startswith(b"set") else END) in (STORED, END)
    monitor = server.client()
    monitor.send(b"monitor m1 60 1\r\n")
    deadline = time.monotonic() + 10
    while "m1" not in queue_names(c):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert c.set("m1", b"seen") == STORED
    assert monitor.until() == one("m1", b"seen")
    assert monitor.line() == END
    created = {"n1", "n2", "n3", "n4", "n5", "n6", "n7", "m1"}
    assert queue_names(c) == created
    for request, reply in (
        (b"delete x1\r\n", DELETED),
        (b"flush x2\r\n", END),
        (b"flush_expired x3\r\n", b"0\r\n"),
        (b"dump_stats x4\r\n", END),
        (b"dump_config x5\r\n", END),
        (b"confirm x6 1\r\n", ERROR),
        (b"confirm x6 0\r\n", END),
        (b"get x7/close\r\n", END),
        (b"get x8/abort\r\n", END),
        (b"set x9 x 0 1\r\nv\r\n", b"CLIENT_ERROR bad command line format\r\n"),
        (b"set x9 0 x 1\r\nv\r\n", b"CLIENT_ERROR bad command line format\r\n"),
        (set_req(b"x10", b"v" * 1025), b"SERVER_ERROR object too large for cache\r\n"),
        (b"get x11 a.b\r\n", b"CLIENT_ERROR bad queue name\r\n"),
        (b"get x12 x12/t=x\r\n", b"CLIENT_ERROR bad command line format\r\n"),
        (b"status readonly\r\n", END),
        (set_req(b"x13", b"v"), b"SERVER_ERROR read only\r\n"),
        (b"status quiescent\r\n", END),
        (b"get x14\r\n", b"SERVER_ERROR quiescent\r\n"),
        (b"get x15/peek\r\n", b"SERVER_ERROR quiescent\r\n"),
        (b"get x16/close/open\r\n", b"SERVER_ERROR quiescent\r\n"),
        (b"monitor x17 1\r\n", b"SERVER_ERROR quiescent\r\n"),
        (b"status up\r\n", END),
    ):
        assert c.call(request) == reply, request
    c.stats()
    assert queue_names(c) == created
    bad = server.client()
    assert bad.call(b"get x18 x19/peek/open\r\n") == b"CLIENT_ERROR\r\n"
    assert_closed(bad)
    assert queue_names(c) == created


# ---- pipelining, binary data ------------------------------------------------------------------------------
def test_many_pipelined_requests_in_one_send_are_answered_in_order(server):
    c = server.client()
    queue: deque[tuple[bytes, int]] = deque()  # what the server's queue holds
    requests = []
    expected = []
    for i in range(150):
        requests.append(set_req(b"q", b"item-%d" % i, flags=i))
        expected.append(STORED)
        queue.append((b"item-%d" % i, i))
        if i % 3 == 0:
            requests.append(b"get q\r\n")
            data, flags = queue.popleft()
            expected.append(one("q", data, flags))
        if i % 10 == 0:
            requests.append(b"version\r\n")
            expected.append(VERSION_LINE)
        if i % 25 == 0:
            requests.append(b"get nosuch q/peek\r\n")
            expected.append((value("q/peek", *queue[0]) if queue else b"") + END)
    requests.append(b"delete q\r\nget q\r\nstatus\r\n")
    expected.append(DELETED + END + b"UP\r\n")
    c.send(b"".join(requests))
    want = b"".join(expected)
    assert c.read_exact(len(want)) == want
    assert_open(c)


def test_one_mib_binary_value_with_cr_lf_and_nul_round_trips(server):
    c = server.client()
    chunk = bytes(range(256)) + b"\r\nEND\r\n\r\n\x00\n\r"
    data = (chunk * (1048576 // len(chunk) + 1))[:1048576]
    assert len(data) == 1048576
    assert c.call(set_req(b"bin", data, flags=77)) == STORED
    assert c.call(set_req(b"bin", data[::-1])) == STORED
    assert c.get("bin") == one("bin", data, 77)
    assert c.get("bin/open") == one("bin/open", data[::-1])
    assert c.get("bin/abort") == END
    assert c.get("bin/peek") == one("bin/peek", data[::-1])
    stats = c.stats()
    assert (stats["queue_bin_items"], stats["queue_bin_bytes"]) == ("1", "1048576")


# ---- compat = "kestrel" -------------------------------------------------------------------------------------
def test_kestrel_compat_changes_exactly_four_things(erq_factory):
    # One script, run on a default server and on a Kestrel-compatible one.
    script = [
        set_req(b"q", b"abc", flags=7),
        set_req(b"q", b"def", flags=8),
        b"get q/t=10/open\r\n",
        b"get q/close\r\n",
        b"get nosuch q/peek\r\n",
        b"monitor q 60 1\r\n",
        b"confirm q 1\r\n",
        b"confirm q 1\r\n",
        set_req(b"exp", b"x", exptime=1000001),
        b"get exp\r\n",
        set_req(b"exp", b"y", exptime=999999),
        set_req(b"exp", b"z", exptime=-1),
        b"get exp\r\n",
        b"get exp\r\n",
        b"delete q\r\n",
        b"flush q\r\n",
        b"verbosity 1\r\n",
        b"status\r\n",
        b"version\r\n",
        b"flush_all\r\n",
        b"bogus\r\n",
    ]

    def transcript(server: ErqProcess, want: bytes) -> RawClient:
        c = server.client()
        c.send(b"".join(script))
        assert c.read_exact(len(want)) == want
        return c

    common = [
        STORED,
        STORED,
        None,  # get q/t=10/open
        END,
        None,  # get nosuch q/peek
        None,  # monitor q 60 1
        END,
        ERROR,
        STORED,
        None,  # get exp: expired only under Kestrel's threshold
        STORED,
        STORED,
        None,  # get exp
        END,
        DELETED,
        END,
        OK,
        b"UP\r\n",
        VERSION_LINE,
    ]
    erq_replies = [
        value("q/t=10/open", b"abc", 7) + END,
        value("q/peek", b"def", 8) + END,
        value("q", b"def", 8) + END + END,
        value("exp", b"x") + END,
        value("exp", b"y") + END,
    ]
    kestrel_replies = [
        value("q", b"abc") + END,
        value("q", b"def") + END,
        value("q", b"def") + END + END,
        END,
        value("exp", b"y") + END,
    ]

    def expected(values: list[bytes], tail: bytes) -> bytes:
        it = iter(values)
        return b"".join(next(it) if r is None else r for r in common) + tail

    plain = transcript(start(erq_factory, name="erq"), expected(erq_replies, OK + ERROR))
    assert_open(plain)
    kestrel = transcript(
        start(erq_factory, name="kestrel", args=["--compat", "kestrel"]),
        expected(kestrel_replies, b"Flushed all queues.\r\n" + b"CLIENT_ERROR\r\n"),
    )
    assert_closed(kestrel)
