"""Every error row of PROTOCOL.md sections 2-5 and 10, over real sockets to a real server.

Each check pins the exact reply bytes and the connection state that follows: kept open (a
following request still works) or closed (EOF, with nothing else sent). A witness connection,
opened before the errors and idle while they happen, proves that other connections and the
items stored before are untouched.
"""

from __future__ import annotations

import struct

from pymemcache.client.base import Client as PymemcacheClient

from conftest import ErqProcess, RawClient
from support import (
    BAD_CHUNK,
    BAD_FORMAT,
    BAD_NAME,
    DELETED,
    END,
    ERROR,
    NOT_STORED,
    NOT_SUPPORTED,
    QUIESCENT,
    READ_ONLY,
    RELOADED,
    STORED,
    TOO_LARGE,
    TOO_LONG,
    VERSION_LINE,
    assert_closed,
    assert_open,
    poll,
    queue_names,
    set_req,
    start,
    wait_for_stat,
)

# A data block that is a valid request line if a server failed to skip it.
POISON = b"delete witness\r\n"


class Witness:
    """A connection opened before the errors, with an item stored before them."""

    def __init__(self, server: ErqProcess, kestrel: bool = False) -> None:
        self.c = server.client()
        self.kestrel = kestrel
        self.restore()

    def restore(self) -> None:
        assert self.c.set("witness", b"safe", flags=9) == STORED

    def check(self) -> None:
        if self.kestrel:
            expected = b"VALUE witness 0 4\r\nsafe\r\nEND\r\n"
        else:
            expected = b"VALUE witness/peek 9 4\r\nsafe\r\nEND\r\n"
        assert self.c.get("witness/peek") == expected


def assert_each_closes(server: ErqProcess, requests, reply: bytes) -> None:
    """Each request, on a connection of its own, is answered ``reply`` and the server closes
    the connection."""
    for request in requests:
        c = server.client()
        assert c.call(request) == reply, request
        assert_closed(c)


def assert_each_stays_open(c: RawClient, requests, reply: bytes) -> None:
    """Each request is answered ``reply`` and the connection is still served after it."""
    for request in requests:
        assert c.call(request) == reply, request
        assert_open(c)


def assert_skipped(c: RawClient, request: bytes, reply: bytes | None) -> None:
    """``request``, with a ``version`` behind it in the same send, is answered ``reply`` (or
    nothing, for None) and then the version: whatever data it carried was skipped, not read
    as a request."""
    c.send(request + b"version\r\n")
    if reply is not None:
        assert c.line() == reply, request
    assert c.line() == VERSION_LINE, request


# ---- section 2: framing ------------------------------------------------------------------
def test_line_of_exactly_max_line_bytes_is_served_and_one_byte_more_closes(server):
    witness = Witness(server)
    for terminator in (b"\r\n", b"\n"):
        prefix = b"get q/"
        line = prefix + b"x" * (65536 - len(prefix) - len(terminator)) + terminator
        assert len(line) == 65536  # max_line counts the terminator
        c = server.client()
        c.send(line)
        assert c.line() == END
        assert_open(c)

        c = server.client()
        c.send(line[: -len(terminator)] + b"x" + terminator)
        assert c.line() == TOO_LONG
        assert_closed(c)
    c = server.client()
    c.send(b"y" * 65536)  # no terminator within max_line
    assert c.line() == TOO_LONG
    assert_closed(c)
    witness.check()


def test_set_without_usable_byte_count_is_bad_format_and_closes(server):
    witness = Witness(server)
    requests = (
        b"set q 0 0\r\n",
        b"set q 0 0 x\r\n",
        b"set q 0 0 -1\r\n",
        b"set q 0 0 3x\r\n",
        b"set q 0 0 1.5\r\n",
        b"set q 0 0 x noreply\r\n",
        b"set q\r\n",
        b"set\r\n",
    )
    assert_each_closes(server, requests, BAD_FORMAT)
    witness.check()
    assert queue_names(witness.c) == {"witness"}


def test_item_over_server_max_item_size_is_skipped_with_server_error_and_stays_open(erq_factory):
    server = start(erq_factory, server="max_item_size = 1024")
    witness = Witness(server)
    c = server.client()
    assert c.call(set_req(b"fits", b"f" * 1024)) == STORED  # exactly max_item_size is allowed
    big = (POISON * 100)[:1025]
    c.send(b"set big 0 0 1025\r\n")
    for i in range(0, 1025, 300):  # the skipped bytes may arrive in pieces
        c.send(big[i : i + 300])
    c.send(b"\r\n")
    assert c.line() == TOO_LARGE
    assert_open(c)
    # The two trailer bytes are skipped too, not checked.
    c.send(b"set big 0 0 1025\r\n" + big + b"XY" + b"version\r\n")
    assert c.line() == TOO_LARGE
    assert c.line() == VERSION_LINE
    # A declared size far over the limit, sent in one go.
    c.send(b"set big 7 0 4194304\r\n" + POISON * (4194304 // len(POISON)) + b"\r\n")
    assert c.line() == TOO_LARGE
    assert_open(c)
    witness.check()
    assert queue_names(witness.c) == {"witness", "fits"}  # the refused set created nothing
    assert c.get("fits") == b"VALUE fits 0 1024\r\n" + b"f" * 1024 + b"\r\nEND\r\n"


def test_data_not_followed_by_crlf_is_bad_data_chunk_and_closes(server):
    witness = Witness(server)
    requests = (
        b"set q 0 0 3\r\nabcd\r\n",
        b"set q 0 0 3\r\nabc\n\r",
        b"set q 0 0 3\r\nabc\rx",
        b"set q 0 0 0\r\nxy",
    )
    assert_each_closes(server, requests, BAD_CHUNK)
    witness.check()
    assert queue_names(witness.c) == {"witness"}


def test_bad_flags_or_exptime_skip_the_data_and_stay_open(server):
    witness = Witness(server)
    c = server.client()
    for flags, exptime in (
        (b"-1", b"0"),
        (b"4294967296", b"0"),
        (b"99999999999999999999999", b"0"),
        (b"x", b"0"),
        (b"1.5", b"0"),
        (b"0x1", b"0"),
        (b"0", b"x"),
        (b"0", b"1.5"),
        (b"0", b"--1"),
        (b"0", b"1e3"),
    ):
        assert_skipped(c, set_req(b"q", POISON, flags, exptime), BAD_FORMAT)
    witness.check()
    assert queue_names(c) == {"witness"}
    # The largest flags value is fine and echoed.
    assert c.call(set_req(b"q", b"x", b"4294967295")) == STORED
    assert c.get("q") == b"VALUE q 4294967295 1\r\nx\r\nEND\r\n"


def test_a_refused_cache_command_with_noreply_is_silent(server):
    """pymemcache's add, replace, append, prepend and cas send noreply by default and read no
    reply: an answer would be taken for the reply to the next request (a get's item lost)."""
    witness = Witness(server)
    c = server.client()
    c.send(
        b"add q 0 0 16 noreply\r\n" + POISON + b"\r\n"
        b"replace q 0 0 1 noreply\r\nx\r\n"
        b"append q 0 0 1 noreply\r\nx\r\n"
        b"prepend q 0 0 1 noreply\r\nx\r\n"
        b"cas q 0 0 1 7 noreply\r\nx\r\n"
        b"incr q 1 noreply\r\ndecr q 1 noreply\r\ntouch q 10 noreply\r\n"
        b"version\r\n"
    )
    assert c.line() == VERSION_LINE
    assert c.call(b"add q 0 0 1\r\nx\r\n") == NOT_SUPPORTED  # still refused aloud without
    witness.check()
    assert c.set("q", b"kept") == STORED
    mc = PymemcacheClient(("127.0.0.1", server.port), timeout=5)
    try:
        assert mc.add("q", b"dropped") is True  # noreply: pymemcache assumes it worked
        assert mc.get("q") == b"kept"
        assert mc.get("q") is None
    finally:
        mc.close()


def test_cache_commands_are_not_supported_by_a_queue_and_stay_open(server):
    witness = Witness(server)
    c = server.client()
    for request in (
        b"add q 0 0 16\r\n" + POISON + b"\r\n",
        b"replace q 0 0 16\r\n" + POISON + b"\r\n",
        b"append q 0 0 16\r\n" + POISON + b"\r\n",
        b"prepend q 0 0 16\r\n" + POISON + b"\r\n",
        b"cas q 0 0 16 1\r\n" + POISON + b"\r\n",
        # memcached's meta set, whose value was run as requests: it deleted the witness.
        b"ms q 16\r\n" + POISON + b"\r\n",
        b"ms q 16 T0 F5 q\r\n" + POISON + b"\r\n",  # quiet: errors are still sent
        b"incr q 1\r\n",
        b"decr q 1\r\n",
        b"touch q 10\r\n",
        b"incr witness 1\r\n",
        # get-and-touch: memcached answers it, and emcache's gat waited out its timeout on ERROR.
        b"gat 10 witness\r\n",
        b"gats 10 q witness\r\n",
        b"gat 10 noreply\r\n",  # gat has no noreply: a key of that name is answered
    ):
        assert_skipped(c, request, NOT_SUPPORTED)
    witness.check()
    assert queue_names(c) == {"witness"}


def test_binary_protocol_magic_byte_closes_without_a_reply(server):
    witness = Witness(server)
    noop = struct.pack(">BBHBBHIIQ", 0x80, 0x0A, 0, 0, 0, 0, 0, 0, 0)
    c = server.client()
    c.send(noop)
    assert_closed(c)
    c = server.client()
    c.send(b"version\r\n" + noop)  # requests before it are still answered
    assert c.line() == VERSION_LINE
    assert_closed(c)
    witness.check()


def test_clients_repeating_a_refused_request_make_one_log_line_not_one_each(erq_factory):
    server = start(erq_factory, server="max_connections = 1")

    def served():  # once the readiness probe's connection is counted out
        c = server.client()
        if c.call(b"version\r\n") == VERSION_LINE:
            return c
        c.close()
        return None

    holder = poll(served, "a connection under max_connections")
    rejected = int(holder.stats()["rejected_connections"])
    for _ in range(20):
        refused = server.client()
        assert refused.line() == b"SERVER_ERROR too many open connections\r\n"
        refused.close()
    assert holder.call(b"version\r\n") == VERSION_LINE  # served all along
    assert int(holder.stats()["rejected_connections"]) == rejected + 20  # counted, every one
    assert server.read_log().count("refusing a client from 127.0.0.1:") == 1
    other = start(erq_factory, name="other")
    noop = struct.pack(">BBHBBHIIQ", 0x80, 0x0A, 0, 0, 0, 0, 0, 0, 0)
    for _ in range(20):
        c = other.client()
        c.send(noop)
        assert_closed(c)
    assert other.read_log().count("binary-protocol request received") == 1


def test_unknown_command_is_error_and_stays_open(server):
    witness = Witness(server)
    c = server.client()
    requests = (b"foo\r\n", b"FOO bar baz\r\n", b"gett q\r\n", b"\r\n", b"getq q\r\n")
    assert_each_stays_open(c, requests, ERROR)
    witness.check()
    assert queue_names(c) == {"witness"}


def test_unknown_command_under_kestrel_compat_is_bare_client_error_and_closes(erq_factory):
    server = start(erq_factory, args=["--compat", "kestrel"])
    witness = Witness(server, kestrel=True)
    assert_each_closes(server, (b"foo\r\n", b"gett q\r\n"), b"CLIENT_ERROR\r\n")
    witness.check()


# ---- section 1 and 10: queue names ---------------------------------------------------------
BAD_NAMES = [
    b"n" * 251,
    b"a.b",
    b"a~b",
    b"+a",
    b"a+",
    b"a+b+c",
    b"a\x7fb",
    b"a\x01b",
    b"a\tb",
    b"a\xc3\xa9b",
]


def test_bad_queue_name_is_rejected_by_every_command_that_takes_one(server):
    witness = Witness(server)
    c = server.client()
    assert c.set("ok", b"keep") == STORED
    for name in [*BAD_NAMES, b"q/x", b"/x"]:
        for request in (  # noreply silences the error (PROTOCOL §10)
            set_req(name, POISON, extra=b" noreply"),
            b"delete %s noreply\r\n" % name,
            b"flush %s noreply\r\n" % name,
        ):
            assert_skipped(c, request, None)
        for request in (
            set_req(name, POISON),
            b"delete %s\r\n" % name,
            b"flush %s\r\n" % name,
            b"flush_expired %s\r\n" % name,
            b"monitor %s 1\r\n" % name,
            b"monitor %s 1 1\r\n" % name,
            b"confirm %s 1\r\n" % name,
            b"dump_stats %s\r\n" % name,
            b"dump_stats ok %s\r\n" % name,
            b"dump_config %s\r\n" % name,
            b"dump_config ok %s\r\n" % name,
        ):
            assert_skipped(c, request, BAD_NAME)
    for name in [*BAD_NAMES, b""]:  # in a get, '/' starts the options: "/x" is an empty name
        for key in (
            name,
            name + b"/open",
            name + b"/t=1",
            name + b"/peek",
            name + b"/close",
            name + b"/abort",
            name + b"/close/open",
        ):
            if not key:
                continue  # "get" alone is a missing argument, not an empty name
            for request in (b"get %s\r\n" % key, b"gets %s\r\n" % key, b"get ok/open %s\r\n" % key):
                assert_skipped(c, request, BAD_NAME)
    # A bad key anywhere rejects the whole get before any effect.
    assert c.call(b"get ok ok/open fresh a.b\r\n") == BAD_NAME
    stats = c.stats()
    assert (stats["queue_ok_items"], stats["queue_ok_transactions"]) == ("1", "0")
    assert queue_names(c) == {"witness", "ok"}
    # 250 bytes is still a name.
    longest = b"n" * 250
    assert c.call(set_req(longest, b"v")) == STORED
    assert c.call(b"get %s\r\n" % longest, END) == b"VALUE %s 0 1\r\nv\r\nEND\r\n" % longest
    assert c.call(b"delete %s\r\n" % longest) == DELETED
    witness.check()


# ---- section 4: get options ------------------------------------------------------------------
def test_forbidden_get_option_combinations_reply_client_error_and_close(server):
    witness = Witness(server)
    combos = (
        b"peek/open",
        b"open/peek",
        b"peek/close",
        b"close/peek",
        b"peek/abort",
        b"abort/peek",
        b"abort/open",
        b"open/abort",
        b"abort/close",
        b"close/abort",
        b"t=10/peek/open",
    )
    assert_each_closes(server, [b"get q/%s\r\n" % combo for combo in combos], b"CLIENT_ERROR\r\n")
    # The whole request is rejected before any effect; the close aborts held reads.
    holder = server.client()
    assert holder.set("ok", b"one") == STORED
    assert holder.set("ok", b"two") == STORED
    assert holder.get("ok/open") == b"VALUE ok/open 0 3\r\none\r\nEND\r\n"
    assert holder.call(b"get ok/open fresh q/peek/open\r\n") == b"CLIENT_ERROR\r\n"
    assert_closed(holder)
    stats = wait_for_stat(witness.c, "queue_ok_open_transactions", 0)
    assert stats["queue_ok_items"] == "2"
    assert stats["queue_ok_transactions"] == "1"  # the rejected request opened nothing
    assert queue_names(witness.c) == {"witness", "ok"}
    assert witness.c.get("ok") == b"VALUE ok 0 3\r\none\r\nEND\r\n"
    witness.check()


def test_bad_timeout_is_bad_format_and_stays_open(server):
    witness = Witness(server)
    c = server.client()
    assert c.set("ok", b"keep") == STORED
    for value in (b"abc", b"", b"1.5", b"1e3", b"0x10", b"5ms"):
        keys = (b"q/t=%s" % value, b"q/open/t=%s" % value, b"ok/open q/t=%s" % value)
        assert_each_stays_open(c, [b"get %s\r\n" % key for key in keys], BAD_FORMAT)
    stats = c.stats()
    assert (stats["queue_ok_items"], stats["queue_ok_transactions"]) == ("1", "0")
    assert queue_names(c) == {"witness", "ok"}
    witness.check()


def test_missing_required_argument_is_bad_format_and_stays_open(server):
    witness = Witness(server)
    c = server.client()
    words = (
        b"get",
        b"gets",
        b"get   ",
        b"delete",
        b"flush",
        b"flush_expired",
        b"monitor",
        b"monitor q",
        b"confirm",
        b"confirm q",
        b"verbosity",
    )
    assert_each_stays_open(c, [w + b"\r\n" for w in words], BAD_FORMAT)
    assert queue_names(c) == {"witness"}
    witness.check()


# ---- section 5: reliable reads -----------------------------------------------------------------
def test_one_open_read_over_max_open_reads_errors_closes_and_returns_reads_in_order(server):
    # max_open_reads defaults to 100
    witness = Witness(server)
    items = [b"item%03d" % i for i in range(101)]
    c = server.client()
    c.send(b"".join(set_req(b"q", item) for item in items))
    assert [c.line() for _ in items] == [STORED] * 101
    c.send(b"get q/open\r\n" * 100)
    for item in items[:100]:
        assert c.until() == b"VALUE q/open 0 7\r\n%s\r\nEND\r\n" % item
    assert c.call(b"get q/open\r\n") == ERROR
    assert_closed(c)
    stats = wait_for_stat(witness.c, "queue_q_open_transactions", 0)
    assert stats["queue_q_items"] == "101"
    assert stats["queue_q_canceled_transactions"] == "100"
    other = server.client()
    other.send(b"get q\r\n" * 101)
    for item in items:  # the oldest read is at the head again
        assert other.until() == b"VALUE q 0 7\r\n%s\r\nEND\r\n" % item
    witness.check()


def test_plain_get_while_holding_an_open_read_errors_closes_and_returns_the_read(server):
    witness = Witness(server)
    setter = server.client()
    for item in (b"a", b"b"):
        assert setter.set("q", item) == STORED
    assert setter.set("r", b"x") == STORED
    c = server.client()
    assert c.get("q/open") == b"VALUE q/open 0 1\r\na\r\nEND\r\n"
    assert c.get("q/peek") == b"VALUE q/peek 0 1\r\nb\r\nEND\r\n"  # a peek is allowed
    assert c.get("r") == b"VALUE r 0 1\r\nx\r\nEND\r\n"  # so is a plain get on another queue
    assert c.call(b"get q\r\n") == ERROR
    assert_closed(c)
    wait_for_stat(setter, "queue_q_open_transactions", 0)
    assert setter.get("q/peek") == b"VALUE q/peek 0 1\r\na\r\nEND\r\n"

    # In a multi-key get, what an earlier key did stands and its VALUE is sent first.
    assert setter.set("s", b"y") == STORED
    d = server.client()
    assert d.get("q/open") == b"VALUE q/open 0 1\r\na\r\nEND\r\n"
    assert d.call(b"get s q\r\n", ERROR) == b"VALUE s 0 1\r\ny\r\nERROR\r\n"
    assert_closed(d)
    wait_for_stat(setter, "queue_q_open_transactions", 0)
    assert setter.get("s") == END
    assert setter.get("q") == b"VALUE q 0 1\r\na\r\nEND\r\n"
    witness.check()


def test_confirm_of_more_reads_than_are_open_is_error_and_confirms_nothing(server):
    witness = Witness(server)
    c = server.client()
    for item in (b"a", b"b"):
        assert c.set("q", item) == STORED
    other = server.client()
    assert other.get("q/open") == b"VALUE q/open 0 1\r\na\r\nEND\r\n"
    assert c.call(b"confirm q 1\r\n") == ERROR  # another connection's read is not ours
    assert c.get("q/open") == b"VALUE q/open 0 1\r\nb\r\nEND\r\n"
    assert c.call(b"confirm q 2\r\n") == ERROR
    assert c.call(b"confirm q " + b"9" * 30 + b"\r\n") == ERROR  # past 64 bits: still more
    assert c.stats()["queue_q_open_transactions"] == "2"
    assert c.call(b"confirm q " + b"0" * 30 + b"1\r\n") == END  # leading zeros: its value, 1
    assert c.stats()["queue_q_open_transactions"] == "1"
    assert c.call(b"confirm q 1\r\n") == ERROR
    assert c.call(b"confirm q 0\r\n") == END
    assert c.call(b"confirm nosuch 1\r\n") == ERROR
    assert_open(c)
    assert queue_names(c) == {"witness", "q"}
    witness.check()


# ---- section 3: status -------------------------------------------------------------------------
def test_unknown_status_word_is_bad_status_and_stays_open(server):
    witness = Witness(server)
    c = server.client()
    words = (b"DOWN", b"up!", b"read_only")
    assert_each_stays_open(c, [b"status %s\r\n" % w for w in words], b"CLIENT_ERROR bad status\r\n")
    assert c.call(b"status\r\n") == b"UP\r\n"
    witness.check()


WRITES = (
    set_req(b"q", b"new"),
    set_req(b"fresh", b"new"),
    b"flush q\r\n",
    b"flush_all\r\n",
    b"flush_all 0\r\n",
    b"flush_expired q\r\n",
    b"flush_all_expired\r\n",
    b"delete q\r\n",
    b"delete nosuch\r\n",
)


def test_readonly_refuses_every_write_with_read_only_and_serves_reads(server):
    witness = Witness(server)
    c = server.client()
    for item in (b"a", b"b", b"c", b"d"):
        assert c.set("q", item) == STORED
    assert c.call(b"status readonly\r\n") == END
    assert_each_stays_open(c, WRITES, READ_ONLY)
    c.send(set_req(b"q", b"new", extra=b" noreply") + b"delete q noreply\r\nflush q noreply\r\n")
    c.send(b"flush_all noreply\r\n")
    assert_open(c)  # noreply refusals are silent
    stats = c.stats()
    assert stats["queue_q_items"] == "4"
    assert "queue_fresh_items" not in stats
    # Reads, reliable reads and administration still work.
    assert c.get("q") == b"VALUE q 0 1\r\na\r\nEND\r\n"
    assert c.get("q/peek") == b"VALUE q/peek 0 1\r\nb\r\nEND\r\n"
    assert c.get("q/open") == b"VALUE q/open 0 1\r\nb\r\nEND\r\n"
    assert c.get("q/abort") == END
    assert c.get("q/close/open") == b"VALUE q/close/open 0 1\r\nb\r\nEND\r\n"
    assert c.get("q/close") == END
    assert c.call(b"monitor q 60 1\r\n", END) == b"VALUE q 0 1\r\nc\r\nEND\r\n"
    assert c.line() == END
    assert c.call(b"confirm q 1\r\n") == END
    assert c.call(b"reload\r\n") == RELOADED
    assert c.call(b"status\r\n") == b"READONLY\r\n"
    assert c.call(b"status up\r\n") == END
    assert c.set("q", b"e") == STORED
    witness.check()


def test_quiescent_refuses_writes_and_fetches_but_close_abort_and_confirm_work(server):
    witness = Witness(server)
    c = server.client()
    for item in (b"a", b"b", b"c", b"d", b"e"):
        assert c.set("q", item) == STORED
    holder = server.client()
    holder.send(b"get q/open\r\n" * 4)
    for item in (b"a", b"b", b"c", b"d"):
        assert holder.until() == b"VALUE q/open 0 1\r\n%s\r\nEND\r\n" % item
    waiter = server.client()
    waiter.send(b"get empty/t=60000\r\n")
    wait_for_stat(c, "queue_empty_waiters", 1)
    assert c.set("mon", b"m1") == STORED
    monitor = server.client()
    assert monitor.call(b"monitor mon 60\r\n", END) == b"VALUE mon 0 2\r\nm1\r\nEND\r\n"

    assert c.call(b"status quiescent\r\n") == END
    assert waiter.until() == END  # blocked gets are answered
    assert monitor.line() == END  # running monitors end
    assert_open(waiter)
    for request in WRITES:
        assert c.call(request) == READ_ONLY, request
    fetches = (
        b"get q\r\n",
        b"gets q\r\n",
        b"get q/peek\r\n",
        b"get q/t=10\r\n",
        b"get q/open\r\n",
        b"get nosuch\r\n",
        b"get nosuch/peek\r\n",
        b"monitor q 1\r\n",
        b"monitor nosuch 1 1\r\n",
    )
    assert_each_stays_open(c, fetches, QUIESCENT)
    # close, confirm and abort take effect; a fetch part is refused after its close happened.
    assert holder.get("q/close") == END  # confirms a
    assert holder.call(b"confirm q 1\r\n") == END  # confirms b
    assert holder.call(b"get q/close/open\r\n") == QUIESCENT  # confirms c, fetches nothing
    assert holder.get("q/abort") == END  # d goes back to the head
    stats = c.stats()
    assert (stats["queue_q_items"], stats["queue_q_open_transactions"]) == ("2", "0")
    assert queue_names(c) == {"witness", "q", "empty", "mon"}
    assert c.call(b"reload\r\n") == RELOADED
    assert c.call(b"status\r\n") == b"QUIESCENT\r\n"
    assert c.call(b"status up\r\n") == END
    assert c.get("q") == b"VALUE q 0 1\r\nd\r\nEND\r\n"
    witness.check()


def test_a_multi_key_get_under_quiescent_still_confirms_and_aborts_its_later_keys(server):
    c = server.client()
    for queue in ("qa", "qb", "qc"):
        assert c.set(queue, b"x") == STORED
    holder = server.client()
    assert holder.get("qb/open") == b"VALUE qb/open 0 1\r\nx\r\nEND\r\n"
    assert holder.get("qc/open") == b"VALUE qc/open 0 1\r\nx\r\nEND\r\n"
    before = c.stats()
    assert c.call(b"status quiescent\r\n") == END
    # qa's fetch is refused; qb's close and qc's abort still happen, each key being its own get.
    assert holder.call(b"get qa qb/close qc/abort qa/peek\r\n") == QUIESCENT
    assert holder.call(b"get qa/peek/t=10\r\n") == QUIESCENT
    assert_open(holder)
    stats = c.stats()
    assert (stats["queue_qb_open_transactions"], stats["queue_qb_items"]) == ("0", "0")
    assert (stats["queue_qc_open_transactions"], stats["queue_qc_items"]) == ("0", "1")
    assert stats["queue_qc_canceled_transactions"] == "1"
    # The refused get counts as a request (cmd_get), nowhere else; a refused peek nowhere.
    assert int(stats["cmd_get"]) - int(before["cmd_get"]) == 1
    assert int(stats["cmd_peek"]) == int(before["cmd_peek"])
    assert (stats["get_hits"], stats["get_misses"]) == (before["get_hits"], before["get_misses"])
    assert c.call(b"status up\r\n") == END
    assert c.get("qc") == b"VALUE qc 0 1\r\nx\r\nEND\r\n"


def test_a_get_refused_for_its_keys_counts_them_in_cmd_get_and_nowhere_else(server):
    """PROTOCOL §10: refused requests count in cmd_set/cmd_get (they were requests), and a
    set refused for its name or numbers counts in cmd_set; a get refused for its keys the
    same in cmd_get, one per key, and in no other counter."""
    observer = server.client()
    refusals = [
        (b"get bad.name\r\n", 1),
        (b"get q/t=x\r\n", 1),
        (b"get q/peek/open\r\n", 1),  # a forbidden combination: refused and closed
        (b"get ok bad.name\r\n", 2),  # the whole request is refused, both keys counted
        # PROTOCOL §8: peeks and close- or abort-only keys are not gets, refused or not.
        (b"get x/peek y/close w/abort z.bad\r\n", 1),
        (b"get x/peek y/close/open v/t=abc\r\n", 2),
    ]
    for request, keys in refusals:
        before = observer.stats()
        assert server.client().call(request).startswith(b"CLIENT_ERROR"), request
        stats = observer.stats()
        assert int(stats["cmd_get"]) - int(before["cmd_get"]) == keys, request
        for field in ("cmd_peek", "get_hits", "get_misses", "curr_items"):
            assert stats[field] == before[field], (request, field)
    assert queue_names(observer) == set()  # none was made


# ---- section 10: noreply and the order of checks for set -------------------------------------
def test_noreply_silences_replies_and_refusals_but_not_request_line_errors(erq_factory):
    server = start(
        erq_factory, server="max_item_size = 1024", queues='[queues."one"]\nmax_items = 1\n'
    )
    witness = Witness(server)
    c = server.client()
    silent = (
        set_req(b"q", b"a", extra=b" noreply"),
        set_req(b"q", b"b", extra=b" noreply"),
        set_req(b"one", b"x", extra=b" noreply"),
        set_req(b"one", b"y", extra=b" noreply"),  # NOT_STORED: the queue is full
        set_req(b"q", b"z" * 1025, extra=b" noreply"),  # over max_item_size
    )
    c.send(b"".join(silent))
    assert_open(c)
    assert c.get("q") == b"VALUE q 0 1\r\na\r\nEND\r\n"
    assert c.get("one") == b"VALUE one 0 1\r\nx\r\nEND\r\n"
    assert c.get("q/peek") == b"VALUE q/peek 0 1\r\nb\r\nEND\r\n"
    c.send(b"flush q noreply\r\n")
    assert_open(c)
    assert c.get("q") == END
    assert c.set("q", b"c") == STORED
    c.send(b"flush_all noreply\r\n")
    assert_open(c)
    assert c.get("q") == END
    assert c.set("q", b"d") == STORED
    c.send(b"flush_all 0 noreply\r\ndelete one noreply\r\n")
    assert_open(c)
    assert c.get("q") == END
    assert "one" not in queue_names(c)
    witness.restore()  # flush_all rightly emptied it
    assert c.call(b"status readonly\r\n") == END
    c.send(set_req(b"q", b"e", extra=b" noreply") + b"delete q noreply\r\nflush q noreply\r\n")
    c.send(b"flush_all noreply\r\n")
    assert_open(c)
    assert c.call(b"status up\r\n") == END
    assert c.get("q") == END
    # Errors in the request line are silenced too (PROTOCOL §10, as memcached does): the
    # client reads no reply, and a stray one would answer its next request.
    c.send(set_req(b"q", b"e", flags=b"x", extra=b" noreply"))
    c.send(set_req(b"q/x", b"e", extra=b" noreply"))
    c.send(b"delete a.b noreply\r\nflush a~b noreply\r\ndelete a b noreply\r\n")
    c.send(b"flush_all x noreply\r\n")
    assert c.call(b"version\r\n").startswith(b"VERSION ")
    assert c.get("q") == END
    assert "q/x" not in queue_names(c)
    # An error after which the connection closes is sent first.
    assert c.call(b"set q 0 0 1 noreply\r\nab\r\n") == BAD_CHUNK
    assert_closed(c)
    c = server.client()
    assert c.call(b"set q 0 0 x noreply\r\n") == BAD_FORMAT
    assert_closed(c)
    witness.check()


def test_set_checks_format_then_flags_then_name_then_size_then_status_then_policy(erq_factory):
    server = start(
        erq_factory,
        server="max_item_size = 1024",
        queues='[queues."small"]\nmax_item_size = 10\n[queues."one"]\nmax_items = 1\n',
    )
    witness = Witness(server)
    c = server.client()
    big = b"z" * 2000
    # Byte count before everything: the connection closes.
    assert c.call(b"set a.b x 0 abc\r\n") == BAD_FORMAT
    assert_closed(c)
    c = server.client()
    # Token count before flags and name.
    assert c.call(set_req(b"a.b", b"abc", extra=b" noreply extra")) == BAD_FORMAT
    # Flags and exptime before the name and the size.
    assert c.call(set_req(b"a.b", b"abc", flags=b"x")) == BAD_FORMAT
    assert c.call(set_req(b"a.b", b"abc", exptime=b"x")) == BAD_FORMAT
    assert c.call(set_req(b"q", big, flags=b"-1")) == BAD_FORMAT
    # The name before the server's max_item_size.
    assert c.call(set_req(b"a.b", big)) == BAD_NAME
    assert c.call(b"status readonly\r\n") == END
    # The server's max_item_size before the status; the status before the queue policy.
    assert c.call(set_req(b"a.b", big)) == BAD_NAME
    assert c.call(set_req(b"q", big)) == TOO_LARGE
    assert c.call(set_req(b"small", b"x" * 11)) == READ_ONLY
    assert c.call(b"status up\r\n") == END
    assert c.call(set_req(b"one", b"x")) == STORED
    assert c.call(b"status readonly\r\n") == END
    assert c.call(set_req(b"one", b"y")) == READ_ONLY
    assert c.call(b"status up\r\n") == END
    # The queue policy last.
    assert c.call(set_req(b"one", b"y")) == NOT_STORED
    assert c.call(set_req(b"small", b"x" * 11)) == NOT_STORED
    assert c.call(set_req(b"small", b"x" * 10)) == STORED
    assert_open(c)
    witness.check()
