"""``Client`` and ``AsyncClient`` through what production throws at them: restarts, idle
closes, every server down, Kestrel's wire mode, odd arguments (both clients, both builds).

Each test runs the same steps on the synchronous client and, through ``AsyncView``, on its
asyncio twin, against real servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import pickle
import resource
import signal
import socket
import threading
import time
import tracemalloc

import pytest

from erq.client import AsyncClient, Client, ErqError, parse_server, peer_closed

from conftest import ErqProcess
from support import STORED, poll, start

QUEUE = "jobs"


class AsyncView:
    """``AsyncClient`` driven from synchronous test code, on an event loop of its own."""

    def __init__(self, *args, **kwargs) -> None:
        self._runner = asyncio.Runner()
        self._client = AsyncClient(*args, **kwargs)

    @property
    def servers(self):
        return self._client.servers

    def _run(self, coro):
        return self._runner.run(coro)

    def put(self, *args, **kwargs):
        return self._run(self._client.put(*args, **kwargs))

    def get(self, *args, **kwargs):
        return self._run(self._client.get(*args, **kwargs))

    def get_reliable(self, *args, **kwargs):
        return self._run(self._client.get_reliable(*args, **kwargs))

    def confirm(self, item) -> bool:
        return self._run(item.confirm())

    def abort(self, item) -> bool:
        return self._run(item.abort())

    def close(self) -> None:
        self._run(self._client.close())
        self._runner.close()


class SyncView(Client):
    def confirm(self, item) -> bool:  # the same call shape as AsyncView's
        return super().confirm(item)


@pytest.fixture(params=["sync", "async"])
def make_client(request):
    made = []

    def make(*args, **kwargs):
        client = (SyncView if request.param == "sync" else AsyncView)(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def address(proc: ErqProcess) -> tuple[str, int]:
    return ("127.0.0.1", proc.port)


def test_a_restarted_server_is_used_at_once_and_its_open_read_comes_again(erq_factory, make_client):
    proc = erq_factory()
    raw = proc.client()
    assert raw.set(QUEUE, b"job1") == STORED
    raw.close()
    mq = make_client([address(proc)])
    job = mq.get_reliable(QUEUE, timeout_ms=1000)
    assert job.data == b"job1"
    proc.restart()  # the open read goes back to the queue
    again = mq.get_reliable(QUEUE, timeout_ms=1000, confirm=job)
    assert job.state == "lost"  # its /close was not sent on the new connection
    assert again is not None and again.data == b"job1"
    assert mq.confirm(again) is True
    assert mq.put(QUEUE, b"after the restart") is True
    proc.restart()
    assert mq.put(QUEUE, b"after another") is True  # not refused: the server is up
    assert mq.get(QUEUE) == b"after the restart"


def test_an_idle_connection_the_server_closed_hides_no_item_and_loses_its_reads(
    erq_factory, make_client
):
    proc = start(erq_factory, server='client_timeout = "1s"')
    mq = make_client([address(proc)])
    assert mq.put(QUEUE, b"x") is True
    assert mq.put(QUEUE, b"y") is True
    held = mq.get_reliable(QUEUE)
    assert held.data == b"x"
    time.sleep(2.5)  # the server closes both idle connections and takes the read back
    assert mq.confirm(held) is False and held.state == "lost"
    assert mq.get(QUEUE) == b"x"  # back at the head, not confirmed by a /close on a new link
    assert mq.get(QUEUE) == b"y"


def test_a_blocking_read_lasts_its_wait_while_every_server_is_down(erq_factory, make_client):
    proc = erq_factory()
    port = proc.port
    proc.kill()
    mq = make_client([("127.0.0.1", port)], retry_after=60)
    started = time.monotonic()
    calls = 0
    while time.monotonic() - started < 1.0:
        assert mq.get(QUEUE, timeout_ms=400) is None
        calls += 1
    assert calls <= 3, f"{calls} calls in a second with timeout_ms=400: the consumer spins"
    started = time.monotonic()
    assert mq.get_reliable(QUEUE, timeout_ms=300) is None
    assert 0.25 <= time.monotonic() - started < 2.0


def test_a_blocking_read_tries_a_server_again_once_its_back_off_ends(erq_factory, make_client):
    proc = erq_factory()
    proc.kill()
    mq = make_client([address(proc)], retry_after=0.5)
    assert mq.get(QUEUE) is None  # the refused connect puts the server in back-off
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(mq.get(QUEUE, timeout_ms=20_000)))
    reader.start()
    try:
        proc.start()
        raw = proc.client()
        assert raw.set(QUEUE, b"arrived") == STORED
        raw.close()
    finally:
        reader.join(30)
    assert got == [b"arrived"]


def test_put_stores_the_bytes_of_any_buffer_and_refuses_text(erq_factory, make_client):
    proc = erq_factory()
    mq = make_client([address(proc)])
    assert mq.put(QUEUE, bytearray(b"abc")) is True
    assert mq.put(QUEUE, memoryview(b"defg")[1:]) is True
    with pytest.raises(TypeError):
        mq.put(QUEUE, "text")
    assert [mq.get(QUEUE), mq.get(QUEUE), mq.get(QUEUE)] == [b"abc", b"efg", None]


def test_put_refuses_an_expiry_or_flags_out_of_range_before_any_request(make_client):
    # A negative expiry was sent: the server answered STORED for an item already expired,
    # gone before any read. expiry=True was 1 second, "10" 10 seconds, 10**30 a CLIENT_ERROR.
    mq = make_client([("127.0.0.1", 1)])  # never reached: every call fails first
    for expiry in (-1, -0.5, float("nan"), float("inf"), 2**63, 10**30):
        with pytest.raises(ValueError, match="expiry must be"):
            mq.put(QUEUE, b"x", expiry=expiry)
    for flags in (-1, 2**32):
        with pytest.raises(ValueError, match="flags must be"):
            mq.put(QUEUE, b"x", flags=flags)
    for expiry in (True, "10", None):
        with pytest.raises(TypeError, match="expiry is an int or a float"):
            mq.put(QUEUE, b"x", expiry=expiry)
    for flags in (False, 1.0, "1"):
        with pytest.raises(TypeError, match="flags is an int"):
            mq.put(QUEUE, b"x", flags=flags)


def test_put_rounds_a_fraction_of_a_second_of_expiry_up_not_to_never(erq_factory, make_client):
    proc = erq_factory()
    mq = make_client([address(proc)])
    assert mq.put(QUEUE, b"brief", expiry=0.4) is True  # int(0.4) was 0: never expire
    assert mq.put(QUEUE, b"kept", expiry=2**63 - 1, flags=2**32 - 1) is True
    raw = proc.client()

    def head_once_brief_expired() -> bytes | None:
        head = raw.get(QUEUE + "/peek").split(b"\r\n")[1]
        return None if head == b"brief" else head

    assert poll(head_once_brief_expired, "the brief item to expire", 10) == b"kept"
    raw.close()


def test_kestrel_wire_mode_works_for_every_call(erq_factory, make_client):
    # Kestrel names the bare queue in VALUE lines, not the key with its options.
    proc = erq_factory(args=["--compat", "kestrel"])
    mq = make_client([address(proc)])
    for data in (b"a", b"b", b"c", b"d"):
        assert mq.put(QUEUE, data) is True
    assert mq.get(QUEUE, timeout_ms=100) == b"a"
    first = mq.get_reliable(QUEUE)
    assert first.data == b"b" and mq.abort(first) is True
    first = mq.get_reliable(QUEUE)
    assert first.data == b"b"
    second = mq.get_reliable(QUEUE, confirm=first)
    assert first.state == "confirmed" and second.data == b"c"
    assert mq.confirm(second) is True
    assert mq.get(QUEUE) == b"d"
    assert mq.get_reliable(QUEUE, timeout_ms=50) is None


@contextlib.contextmanager
def one_connection_server(handle, rcvbuf: int = 0):
    """A listener whose first connection ``handle(conn)`` serves on a thread; yields its
    address, and waits for the thread at the end."""
    with socket.socket() as listener:
        if rcvbuf:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                handle(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield listener.getsockname()
        thread.join(10)


def test_a_reply_naming_another_key_raises_erq_error(make_client):
    def handle(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(b"VALUE other 0 1\r\nx\r\nEND\r\n")
        conn.recv(1024)

    with one_connection_server(handle) as server:
        mq = make_client([server], timeout=5)
        with pytest.raises(ErqError, match="other"):
            mq.get(QUEUE)


@pytest.mark.parametrize("chained", [False, True])
def test_a_confirm_its_server_could_not_journal_loses_the_connection_s_reads(make_client, chained):
    """A server that cannot journal a confirm (disk full) refuses it with SERVER_ERROR and
    keeps the read open; for ``q/close/open`` the client cannot tell whether the close took
    effect. It closes its reliable connection, so that the server puts back what it still
    holds there, and reports the item lost (False, state "lost"): delivered again, never
    confirmed twice or taken for a later read's confirm."""
    seen = []

    def handle(conn: socket.socket) -> None:
        conn.settimeout(5)
        seen.append(conn.recv(1024))
        conn.sendall(b"VALUE jobs/open 0 1\r\na\r\nEND\r\n")
        seen.append(conn.recv(1024))
        conn.sendall(
            b"SERVER_ERROR cannot write the record at offset 9 of a segment: disk full\r\n"
        )
        seen.append(conn.recv(1024))  # b"": the client closed the connection

    with one_connection_server(handle) as server:
        mq = make_client([server], timeout=0.5, retry_after=60)
        item = mq.get_reliable(QUEUE)
        assert (item.data, item.state) == (b"a", "open")
        if chained:
            assert mq.get_reliable(QUEUE, confirm=item) is None
        else:
            assert mq.confirm(item) is False
        assert item.state == "lost"
        assert mq.confirm(item) is False  # nothing is sent for a lost item
    key = b"jobs/close/open" if chained else b"jobs/close"
    assert seen == [b"get jobs/open\r\n", b"get %s\r\n" % key, b""], seen


@pytest.mark.parametrize("call", ["put", "get"])
def test_a_large_item_on_a_slow_link_takes_longer_than_the_timeout(make_client, call):
    # The timeout bounded the whole transfer (sendall; the async client's wait_for around
    # its write and around readexactly): a 64 MiB item needed more than 13 MB/s in 5 s.
    size, piece = 48 << 20, 2 << 20  # moved at about 20 MiB/s, in over 2 s

    def handle(conn: socket.socket) -> None:
        if call == "put":
            head, _, data = conn.recv(1024).partition(b"\r\n")
            left = int(head.split()[-1]) + len(b"\r\n") - len(data)
            while left > 0 and (chunk := conn.recv(piece)):
                left -= len(chunk)
                time.sleep(0.1)
            conn.sendall(b"STORED\r\n")
        else:
            conn.recv(1024)
            reply = b"VALUE jobs 0 %d\r\n%s\r\nEND\r\n" % (size, b"x" * size)
            for start in range(0, len(reply), piece):
                conn.sendall(reply[start : start + piece])
                time.sleep(0.1)

    with one_connection_server(handle, rcvbuf=1 << 20) as server:  # not 48 MiB
        mq = make_client([server], timeout=1.0)
        started = time.monotonic()
        if call == "put":
            assert mq.put(QUEUE, b"x" * size) is True
        else:
            assert mq.get(QUEUE) == b"x" * size
        assert time.monotonic() - started > 1.0  # or the test shows nothing


def test_a_reply_line_without_end_raises_erq_error_at_its_cap(make_client):
    # Client kept every byte of the line (100 MiB: 223 MiB of memory and 309 s of copying);
    # AsyncClient stopped at its stream's 64 KiB limit and took the server for down (None).
    def handle(conn: socket.socket) -> None:
        conn.recv(1024)
        try:
            for _ in range(64):  # 16 MiB of one line
                conn.sendall(b"A" * (256 << 10))
        except OSError:  # the client gave up on the line
            pass

    with one_connection_server(handle) as server:
        mq = make_client([server], timeout=5)
        with pytest.raises(ErqError, match="line longer than 65536 bytes"):
            mq.get(QUEUE)


def test_a_value_of_any_declared_size_is_read_as_it_comes(make_client):
    # Client asked recv for the whole declared size at once: a VALUE line of 1 TiB raised
    # MemoryError before a byte came. Now, like AsyncClient, it reads what comes, and a
    # server that stops sending is a failed server once the timeout passes.
    def handle(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(b"VALUE jobs 0 %d\r\nabc" % (1 << 40))
        conn.recv(1024)  # until the client gives up

    with one_connection_server(handle) as server:
        mq = make_client([server], timeout=0.5)
        assert mq.get(QUEUE) is None


def test_server_specs_take_ipv6_and_a_single_server_alone(erq_factory, make_client):
    assert parse_server("::1") == ("::1", 22133)
    assert parse_server("[::1]") == ("::1", 22133)
    assert parse_server("[::1]:7000") == ("::1", 7000)
    assert parse_server("fe80::1:2") == ("fe80::1:2", 22133)
    assert parse_server("host:7000") == ("host", 7000)
    assert parse_server("host") == ("host", 22133)
    for bad in ("host:0", "host:65536", "host:99999", "[::1]:70000", ("host", -1)):
        with pytest.raises(ValueError, match="bad port"):
            parse_server(bad)  # the resolver took 99999 for 34463, asyncio raised OverflowError
        with pytest.raises(ValueError, match="bad port"):
            make_client(["127.0.0.1:1", bad])
    for bad in (22133, None, b"host:7000"):  # ["host", 22133] is two servers, one of them 22133
        with pytest.raises(TypeError, match="neither 'host:port' nor"):
            parse_server(bad)
        with pytest.raises(TypeError, match="neither 'host:port' nor"):
            make_client(["127.0.0.1", bad])
    proc = erq_factory()
    for alone in (address(proc), f"127.0.0.1:{proc.port}", ("127.0.0.1", str(proc.port))):
        mq = make_client(alone)  # ("host", "port") was two servers, "host" and "port"
        assert mq.servers == [("127.0.0.1", proc.port)]
        assert mq.put(QUEUE, b"one") is True
        assert mq.get(QUEUE) == b"one"


def test_an_item_from_an_ipv6_server_names_it_in_brackets(make_client):
    # "::1:22133" could be host ::1 port 22133 or host ::1:22133 on the default port.
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with listener:
        listener.listen()

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"VALUE jobs/open 0 1\r\nx\r\nEND\r\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        item = make_client(f"[::1]:{port}", timeout=5).get_reliable(QUEUE)
        assert f"from [::1]:{port} open" in repr(item), repr(item)
        thread.join(10)


def test_a_server_no_address_can_name_is_refused_when_the_client_is_made(make_client):
    # Each was a server taken for down on every request (put False, get None), nothing said:
    # "::1:23400" is no IPv6 address (it is not "[::1]:23400"), "[::1]x" dropped its "x".
    for bad in ("::1:23400", "host:7000:", "", ":7000", "a host", ("", 7000)):
        with pytest.raises(ValueError, match="bad host in server"):
            make_client(["127.0.0.1:1", bad])
    for bad in ("[::1]x", "[::1"):
        with pytest.raises(ValueError, match="bad server"):
            make_client(["127.0.0.1:1", bad])
    for bad in ("host:", "[::1]:", ("host", 7000.5), ("host", True)):
        with pytest.raises(ValueError, match="bad port in server"):
            make_client(["127.0.0.1:1", bad])  # int() took 7000.5 for 7000
    specs = ["fe80::1%eth0", "[fe80::1%eth0]:7000", "[::ffff:10.0.0.1]", ("host", "7000")]
    assert make_client(specs).servers == [
        ("fe80::1%eth0", 22133),
        ("fe80::1%eth0", 7000),
        ("::ffff:10.0.0.1", 22133),
        ("host", 7000),
    ]


@pytest.fixture
def ctrl_c_raises():
    """Python leaves SIGINT ignored when it was ignored at its start (a suite run in the
    background by a shell without job control): Ctrl-C's own handler, for one test."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupted_call_leaves_no_reply_for_the_next_one(ctrl_c_raises):
    # A reply still on its way when Ctrl-C hits would otherwise answer the next request.
    replies = [b"VALUE jobs 0 5\r\nfirst\r\nEND\r\n", b"END\r\n"]
    main = threading.get_ident()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def serve() -> None:
            for reply in replies:
                conn, _ = listener.accept()
                with conn:
                    conn.recv(1024)
                    if reply is replies[0]:
                        signal.pthread_kill(main, signal.SIGINT)
                        time.sleep(0.3)
                    conn.sendall(reply)
                    time.sleep(0.3)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with Client([listener.getsockname()], timeout=5) as mq:
            with pytest.raises(KeyboardInterrupt):
                mq.get(QUEUE)
            assert mq.get(QUEUE) is None  # on a new connection, not the first reply
        thread.join(10)


def test_a_live_connection_on_a_high_descriptor_is_kept(erq_factory):
    # select() cannot watch descriptors past 1024; the check must not take them for closed.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2100:
        pytest.skip(f"the open-file limit ({hard}) leaves no descriptor past 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
    proc = erq_factory()
    try:
        with socket.create_connection(address(proc)) as low:
            high = socket.socket(fileno=os.dup2(low.fileno(), 2050))
            try:
                assert not peer_closed(high)
                high.sendall(b"version\r\n")
                assert high.recv(100).startswith(b"VERSION")
            finally:
                high.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_quiescent_server_refuses_reads_while_the_reads_held_there_confirm(
    erq_factory, make_client
):
    # Draining a server: it refuses reads, and the workers confirm what they hold there.
    proc = erq_factory()
    raw = proc.client()
    for data in (b"held 1", b"held 2", b"left"):
        assert raw.set(QUEUE, data) == STORED
    mq = make_client([address(proc)], retry_after=0.2)
    first = mq.get_reliable(QUEUE)
    second = mq.get_reliable(QUEUE)
    assert raw.call(b"status QUIESCENT\r\n") == b"END\r\n"
    assert mq.get_reliable(QUEUE) is None  # refused: the connection stays open
    assert mq.get(QUEUE) is None
    assert (first.state, second.state) == ("open", "open")
    assert mq.confirm(first) is True
    assert mq.abort(second) is True
    assert raw.call(b"status UP\r\n") == b"END\r\n"
    time.sleep(0.3)  # the refusal kept the client off the server for retry_after
    assert [mq.get(QUEUE), mq.get(QUEUE), mq.get(QUEUE)] == [b"held 2", b"left", None]
    raw.close()


def finish(view, name: str, item):
    """``view``'s own confirm or abort (``AsyncView``'s go through the item, to its client)."""
    if isinstance(view, AsyncView):
        return view._run(getattr(view._client, name)(item))
    return getattr(view, name)(item)


def test_an_item_of_another_client_or_no_item_is_refused_before_any_request(
    erq_factory, make_client
):
    # Another client's item is open on that client's connection: this one can neither close it
    # there nor track the next read it would open there (it was held, unseen, until a close).
    proc = erq_factory()
    raw = proc.client()
    for data in (b"a", b"b", b"c"):
        assert raw.set(QUEUE, data) == STORED
    holder = make_client([address(proc)])
    other = make_client([address(proc)])
    held = holder.get_reliable(QUEUE)
    for call in (
        lambda: other.get_reliable(QUEUE, confirm=held),
        lambda: finish(other, "confirm", held),
        lambda: finish(other, "abort", held),
        lambda: other.get_reliable(QUEUE, confirm="not an item"),
    ):
        with pytest.raises(TypeError, match="not an item of this client"):
            call()
    assert held.state == "open"
    after = holder.get_reliable(QUEUE, confirm=held)  # still its holder's, oldest first
    assert (held.state, after.data) == ("confirmed", b"b")
    assert other.get(QUEUE) == b"c"  # nothing else was opened out of sight
    assert other.get(QUEUE) is None
    raw.close()


def test_an_item_pickles_to_a_copy_that_only_its_original_can_confirm(erq_factory, make_client):
    # A worker process gets the item's data (multiprocessing pickles it); the read stays open
    # on the connection of the client that got it. Pickling raised "cannot pickle 'socket'".
    proc = erq_factory()
    mq = make_client([address(proc)])
    assert mq.put(QUEUE, b"job", flags=7) is True
    held = mq.get_reliable(QUEUE)
    for copied in (pickle.loads(pickle.dumps(held)), copy.copy(held)):
        assert type(copied) is type(held) and copied is not held
        fields = (copied.queue, copied.data, copied.flags, copied.state, copied.server)
        assert fields == (QUEUE, b"job", 7, "open", address(proc))
        with pytest.raises(TypeError, match="is a copy"):
            mq.confirm(copied)  # the item's own (AsyncView) or the client's (SyncView)
        for name in ("confirm", "abort"):
            with pytest.raises(TypeError, match="is a copy"):
                finish(mq, name, copied)  # the client's
        if isinstance(mq, SyncView):
            with pytest.raises(TypeError, match="is a copy"):
                copied.abort()
        with pytest.raises(TypeError, match="is a copy"):
            mq.get_reliable(QUEUE, confirm=copied)
    assert held.state == "open"
    assert mq.confirm(held) is True
    assert mq.get(QUEUE) is None


def test_a_server_at_its_connection_limit_is_skipped_for_retry_after(erq_factory, make_client):
    # It answers every new connection "SERVER_ERROR too many open connections" and closes it:
    # each request sent there connected again, to be refused again, before moving on.
    proc = erq_factory()
    accepted = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(0.2)

        def serve() -> None:
            while len(accepted) < 16:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                accepted.append(conn)
                conn.sendall(b"SERVER_ERROR too many open connections\r\n")
                conn.shutdown(socket.SHUT_WR)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        full = listener.getsockname()
        mq = make_client([full, address(proc)], write_policy="round_robin", retry_after=60)
        assert all(mq.put(QUEUE, b"%d" % i) is True for i in range(6))
        assert [mq.get(QUEUE) for _ in range(7)] == [b"%d" % i for i in range(6)] + [None]
        assert mq.get_reliable(QUEUE, timeout_ms=200) is None
        thread.join(10)
        for conn in accepted:
            conn.close()
    assert len(accepted) == 2, f"{len(accepted)} connections to a server at its limit"


def test_a_server_that_answered_a_write_is_read_again_at_once(erq_factory, make_client):
    # A request during a restart put the server in back-off; once it stores a put again, the
    # reads of that same client must not go on taking it for unreachable until retry_after.
    proc = erq_factory()
    mq = make_client([address(proc)], retry_after=60)
    proc.stop()
    assert mq.put(QUEUE, b"while down") is False
    assert mq.get(QUEUE) is None
    proc.start()
    assert mq.put(QUEUE, b"back") is True  # tried although in back-off: the only server
    started = time.monotonic()
    assert mq.get(QUEUE) == b"back"
    assert mq.get_reliable(QUEUE, timeout_ms=300) is None
    assert mq.put(QUEUE, b"again") is True
    assert mq.get_reliable(QUEUE).data == b"again"
    assert time.monotonic() - started < 4.0


def test_a_timeout_or_back_off_that_is_no_duration_is_refused_when_the_client_is_made(
    erq_factory, make_client
):
    # timeout=0 made the sockets non-blocking: every put False, the server taken for down;
    # timeout=-1 raised ValueError from Client mid-request and was False on AsyncClient.
    proc = erq_factory()
    for name in ("connect_timeout", "timeout"):
        for bad in (0, -1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                make_client([address(proc)], **{name: bad})
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="retry_after must be a finite number"):
            make_client([address(proc)], retry_after=bad)
    for name in ("connect_timeout", "timeout", "retry_after"):
        for bad in (None, "5", True):
            with pytest.raises(TypeError, match=f"{name} is a number of seconds"):
                make_client([address(proc)], **{name: bad})
    mq = make_client([address(proc)], connect_timeout=1, timeout=0.5, retry_after=0)
    assert mq.put(QUEUE, b"x") is True
    assert mq.get(QUEUE) == b"x"


def test_a_read_timeout_out_of_range_is_refused_before_any_request(erq_factory, make_client):
    # inf, NaN and 10**20 raised after a round of reads, on Client by closing the reliable
    # connection: the read held there was lost. AsyncClient waited for ever on 10**20.
    proc = erq_factory()
    mq = make_client([address(proc)])
    assert mq.put(QUEUE, b"held") is True
    held = mq.get_reliable(QUEUE)
    for bad in (-1, float("inf"), float("nan"), 2**31, 10**20):
        for read in (mq.get, mq.get_reliable):
            with pytest.raises(ValueError, match="timeout_ms must be from 0"):
                read("other", timeout_ms=bad)
        with pytest.raises(ValueError, match="timeout_ms must be from 0"):
            mq.get_reliable(QUEUE, timeout_ms=bad, confirm=held)
    for bad in ("100", True):
        with pytest.raises(TypeError, match="timeout_ms is a number of milliseconds"):
            mq.get("other", timeout_ms=bad)
    assert held.state == "open"
    assert mq.get_reliable("other", timeout_ms=0) is None
    assert mq.get("other", timeout_ms=50.5) is None
    assert mq.confirm(held) is True


def test_reading_a_new_queue_per_request_keeps_the_client_s_memory_bounded(
    erq_factory, make_client
):
    # Reply queues: the client kept a read position and an emptied open-read list for every
    # queue it ever read, about 0.9 KiB each (2.7 MiB after 3,000 queues, for ever).
    proc = erq_factory()
    mq = make_client([address(proc)])

    def one_request(i: int) -> None:
        reply_queue = f"reply{i}"
        assert mq.put(reply_queue, b"answer") is True
        answer = mq.get_reliable(reply_queue)
        assert mq.confirm(answer) is True

    for i in range(100):  # connections, event loop and caches settle first
        one_request(i)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100, 2600):
            one_request(i)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 600 << 10, f"{kept} bytes kept after reading 2,500 queues"


def test_a_request_while_another_task_s_is_under_way_is_refused_before_it_is_sent(erq_factory):
    # Both went out on one connection and each read the other's reply: the get's item was
    # taken with no caller told (RuntimeError from readuntil), the second put stored, yet
    # raised.
    proc = erq_factory()
    mq = AsyncClient([address(proc)])

    async def main() -> list:
        assert await mq.put(QUEUE, b"first") is True
        done = await asyncio.gather(
            mq.put(QUEUE, b"x"), mq.get(QUEUE), mq.put(QUEUE, b"y"), return_exceptions=True
        )
        rest = [await mq.get(QUEUE), await mq.get(QUEUE), await mq.get(QUEUE)]
        await mq.close()
        return done + rest

    put_x, got, put_y, *rest = asyncio.run(main())
    assert put_x is True
    for refused in (got, put_y):
        assert isinstance(refused, RuntimeError) and "under way" in str(refused), refused
    assert rest == [b"first", b"x", None]


def test_a_request_while_another_thread_s_is_under_way_is_refused_before_it_is_sent(
    erq_factory,
):
    proc = erq_factory()
    with Client([address(proc)]) as mq:
        waiting: list = []
        reader = threading.Thread(target=lambda: waiting.append(mq.get(QUEUE, timeout_ms=3000)))
        reader.start()
        raw = proc.client()
        poll(lambda: raw.stats().get(f"queue_{QUEUE}_waiters") == "1", "the blocked get")
        with pytest.raises(RuntimeError, match="under way from another thread"):
            mq.put(QUEUE, b"x")  # was sent: its STORED answered the get, garbage, ErqError
        assert raw.set(QUEUE, b"for the reader") == STORED
        reader.join(10)
        assert waiting == [b"for the reader"]
        assert mq.get(QUEUE) is None
        raw.close()


def test_a_chained_confirm_refused_before_it_is_sent_leaves_its_item_open(erq_factory):
    """get_reliable(confirm=x) while another thread's read is under way on that connection:
    refused before a byte is sent, so x is still open, here as on the server. It was marked
    lost and taken off the client's reads: the next item's confirm then closed x on the
    server, and that item came back at the client's close."""
    proc = erq_factory()
    raw = proc.client()
    assert raw.set(QUEUE, b"X") == STORED and raw.set(QUEUE, b"Y") == STORED
    with Client([address(proc)]) as mq:
        x = mq.get_reliable(QUEUE)
        assert x.data == b"X"
        other: list = []
        reader = threading.Thread(
            target=lambda: other.append(mq.get_reliable("other", timeout_ms=5000))
        )
        reader.start()
        poll(lambda: raw.stats().get("queue_other_waiters") == "1", "the blocked read")
        with pytest.raises(RuntimeError, match="under way"):
            mq.get_reliable(QUEUE, confirm=x)
        assert x.state == "open"
        assert raw.set("other", b"o") == STORED
        reader.join(10)
        assert other[0].data == b"o" and other[0].confirm()
        y = mq.get_reliable(QUEUE, confirm=x)  # now it goes
        assert x.state == "confirmed" and y.data == b"Y" and y.confirm()
    stats = raw.stats()
    assert stats[f"queue_{QUEUE}_items"] == "0"
    assert stats[f"queue_{QUEUE}_open_transactions"] == "0"
    assert raw.get(QUEUE) == b"END\r\n"


def test_a_chained_confirm_refused_before_it_is_sent_leaves_its_item_open_async(erq_factory):
    proc = erq_factory()
    raw = proc.client()
    assert raw.set(QUEUE, b"X") == STORED and raw.set(QUEUE, b"Y") == STORED
    mq = AsyncClient([address(proc)])

    async def main() -> None:
        x = await mq.get_reliable(QUEUE)
        reader = asyncio.ensure_future(mq.get_reliable("other", timeout_ms=5000))
        await asyncio.sleep(0.2)
        with pytest.raises(RuntimeError, match="under way"):
            await mq.get_reliable(QUEUE, confirm=x)
        assert x.state == "open"
        assert raw.set("other", b"o") == STORED
        assert (await reader).data == b"o"
        y = await mq.get_reliable(QUEUE, confirm=x)
        assert x.state == "confirmed" and y.data == b"Y"
        assert await y.confirm()
        await mq.close()

    asyncio.run(main())
    stats = raw.stats()
    assert stats[f"queue_{QUEUE}_items"] == "0"
    assert raw.get(QUEUE) == b"END\r\n"


def test_a_queue_name_that_is_no_str_raises_type_error_before_any_request(make_client):
    mq = make_client([("127.0.0.1", 1)])  # never reached: every call fails first
    for call in (
        lambda: mq.put(b"jobs", b"x"),
        lambda: mq.put(None, b"x"),
        lambda: mq.get(b"jobs"),
        lambda: mq.get_reliable(7, timeout_ms=100),
    ):
        with pytest.raises(TypeError, match="queue name is a str"):
            call()  # was AttributeError: 'bytes' object has no attribute 'encode'


def test_an_async_client_used_again_under_a_new_event_loop_reconnects(erq_factory):
    # One asyncio.run() after another: the connections of the first loop (closed by then) were
    # used again, and a put whose bytes went out raised "Event loop is closed" afterwards.
    proc = erq_factory()
    mq = AsyncClient([address(proc)])
    first = asyncio.Runner()
    assert first.run(mq.put(QUEUE, b"one")) is True
    assert first.run(mq.put(QUEUE, b"two")) is True
    held = first.run(mq.get_reliable(QUEUE))
    assert held.data == b"one"
    first.close()
    second = asyncio.Runner()
    try:
        assert second.run(mq.put(QUEUE, b"three")) is True
        assert second.run(held.confirm()) is False  # its connection went with the old loop
        assert held.state == "lost"
        again = second.run(mq.get_reliable(QUEUE, timeout_ms=2000))
        assert again is not None and again.data == b"one"  # back at the head
        assert second.run(again.confirm()) is True
        assert [second.run(mq.get(QUEUE)) for _ in range(3)] == [b"two", b"three", None]
        second.run(mq.close())
    finally:
        second.close()
