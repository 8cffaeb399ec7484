"""erq's own connection layer (erq/_fast/_epoll.pyx) keeps a transport's promises.

The compiled build serves the memcache port from an epoll set of its own instead of the event
loop's transports, so every test here runs the same recording protocol on each: the loop's
transports (asyncio's and uvloop's, what the pure-Python build uses) and the epoll layer on
both loops. What the loops' transports do is the specification; the epoll layer must do the
same: queued replies are sent before a close, ``connection_lost`` comes once and later, a
half-closed client can still be written to, ``write_eof`` ends the client's stream, a failing protocol is reported and closed,
reading pauses and resumes, and the write buffer's flow control calls back.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys

import pytest

from support import END, LAYERS, STORED, VERSION_LINE, close_listener, new_loop, open_listener

BIG = 8 << 20  # more than loopback's socket buffers take at once


@pytest.fixture(params=LAYERS)
def layer(request) -> str:
    return request.param


class Recorder:
    """A protocol that records what its transport tells it, and answers as told."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.events: list[str] = []
        self.data = bytearray()
        self.transport = None
        self.keep_open_on_eof = server.keep_open_on_eof
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.events.append("made")
        self.server.accepted.put_nowait(self)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if b"boom" in data:
            raise RuntimeError("boom")
        if data.startswith(b"echo "):
            self.transport.write(data[5:])

    def eof_received(self):
        self.events.append("eof")
        return self.keep_open_on_eof

    def connection_lost(self, exc) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")


class Server:
    def __init__(self, layer: str, keep_open_on_eof: bool = False) -> None:
        self.layer = layer
        self.keep_open_on_eof = keep_open_on_eof
        self.accepted: asyncio.Queue[Recorder] = asyncio.Queue()
        self.errors: list[dict] = []
        self.listener = None

    async def __aenter__(self) -> Server:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: self.errors.append(context))
        self.listener = await open_listener(loop, self.layer, lambda: Recorder(self))
        self.port = self.listener.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        await close_listener(self.listener, self.layer)

    async def connect(self) -> tuple[socket.socket, Recorder]:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setblocking(False)
        return sock, await asyncio.wait_for(self.accepted.get(), 10)


def run(layer: str, body, **server) -> Server:
    loop = new_loop(layer)

    async def main() -> Server:
        async with Server(layer, **server) as srv:
            await asyncio.wait_for(body(srv), 30)
        return srv

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(sock, min(n - len(out), 1 << 20))
        assert chunk, f"end of file after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


async def recv_to_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        out += chunk
    return bytes(out)


async def until(check) -> None:
    while not check():
        await asyncio.sleep(0.001)


def pattern(size: int, seed: int) -> bytes:
    """Bytes whose every 8-byte word says where it is: a lost or reordered piece shows."""
    words = (size + 7) // 8
    return b"".join(struct.pack("<II", seed, i) for i in range(words))[:size]


def test_bytes_arrive_in_order_across_partial_writes(layer):
    """Writes beyond what the socket takes queue behind each other and arrive whole."""
    pieces = [pattern(BIG, 1), pattern(10, 2), pattern(300_000, 3), pattern(1, 4)]

    async def body(srv):
        sock, proto = await srv.connect()
        for piece in pieces:
            proto.transport.write(piece)
        assert proto.transport.get_write_buffer_size() > 0  # the client has read nothing yet
        assert await recv_exactly(sock, sum(map(len, pieces))) == b"".join(pieces)
        await until(lambda: proto.transport.get_write_buffer_size() == 0)
        sock.close()

    run(layer, body)


def test_the_write_buffer_pauses_and_resumes_the_protocol(layer):
    async def body(srv):
        sock, proto = await srv.connect()
        proto.transport.write(pattern(BIG, 5))
        assert proto.events == ["made", "pause_writing"]
        await recv_exactly(sock, BIG)
        await until(lambda: "resume_writing" in proto.events)
        assert proto.events == ["made", "pause_writing", "resume_writing"]
        sock.close()

    run(layer, body)


def test_close_sends_what_is_queued_then_ends_the_connection_once(layer):
    async def body(srv):
        sock, proto = await srv.connect()
        data = pattern(BIG, 6)
        proto.transport.write(data)
        proto.transport.close()
        assert proto.transport.is_closing()
        proto.transport.close()  # a second close is a no-op
        assert "lost" not in proto.events  # never from inside close()
        assert await recv_to_eof(sock) == data
        assert await asyncio.wait_for(proto.lost, 10) is None
        await asyncio.sleep(0.01)
        assert proto.events.count("lost") == 1
        sock.close()

    run(layer, body)


def test_abort_drops_what_is_queued_and_closes_at_once(layer):
    async def body(srv):
        sock, proto = await srv.connect()
        proto.transport.write(pattern(BIG, 7))
        proto.transport.abort()
        assert proto.transport.is_closing()
        assert await asyncio.wait_for(proto.lost, 10) is None
        got = await recv_to_eof_or_reset(sock)
        assert len(got) < BIG
        sock.close()

    run(layer, body)


async def recv_to_eof_or_reset(sock: socket.socket) -> bytes:
    try:
        return await recv_to_eof(sock)
    except ConnectionResetError:
        return b""


def test_a_client_that_closes_is_told_eof_then_lost(layer):
    async def body(srv):
        sock, proto = await srv.connect()
        sock.sendall(b"echo hi")
        assert await recv_exactly(sock, 2) == b"hi"
        sock.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(sock) == b""  # eof_received said close: the server closed
        assert await asyncio.wait_for(proto.lost, 10) is None
        assert proto.events == ["made", "eof", "lost"]
        assert bytes(proto.data) == b"echo hi"
        sock.close()

    run(layer, body)


def test_a_half_closed_client_can_still_be_written_to(layer):
    async def body(srv):
        sock, proto = await srv.connect()
        sock.shutdown(socket.SHUT_WR)
        await until(lambda: "eof" in proto.events)
        assert not proto.transport.is_closing()
        proto.transport.write(b"still here")
        assert await recv_exactly(sock, 10) == b"still here"
        proto.transport.close()
        assert await recv_to_eof(sock) == b""
        await asyncio.wait_for(proto.lost, 10)
        sock.close()

    run(layer, body, keep_open_on_eof=True)


@pytest.mark.parametrize("queued", [0, BIG], ids=["nothing-queued", "big-write-queued"])
def test_write_eof_ends_the_clients_stream_after_what_is_queued_and_reading_goes_on(layer, queued):
    async def body(srv):
        sock, proto = await srv.connect()
        assert proto.transport.can_write_eof()
        data = pattern(queued, 9)
        proto.transport.write(data)
        proto.transport.write_eof()
        assert await recv_to_eof(sock) == data
        sock.sendall(b"still read")
        await until(lambda: bytes(proto.data) == b"still read")
        sock.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(proto.lost, 10)  # eof_received said close
        assert [e for e in proto.events if "writing" not in e] == ["made", "eof", "lost"]
        sock.close()

    run(layer, body)


def test_a_reset_by_the_client_ends_the_connection_with_its_error(layer):
    async def body(srv):
        sock, proto = await srv.connect()
        proto.transport.write(pattern(BIG, 8))  # queued: the reset meets a pending write
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        exc = await asyncio.wait_for(proto.lost, 10)
        assert isinstance(exc, (ConnectionResetError, BrokenPipeError)), exc
        assert proto.events.count("lost") == 1

    run(layer, body)


def test_a_failing_protocol_is_reported_and_its_connection_closed(layer):
    async def body(srv):
        sock, proto = await srv.connect()
        other, other_proto = await srv.connect()
        sock.sendall(b"boom")
        assert await recv_to_eof_or_reset(sock) == b""
        await asyncio.wait_for(proto.lost, 10)
        (error,) = srv.errors  # the loop's exception handler heard of it
        assert isinstance(error["exception"], RuntimeError)
        other.sendall(b"echo ok")  # the other connection is untouched
        assert await recv_exactly(other, 2) == b"ok"
        srv.errors.clear()
        sock.close()
        other.close()

    srv = run(layer, body)
    assert srv.errors == []


def test_paused_reading_holds_data_until_resumed(layer):
    async def body(srv):
        sock, proto = await srv.connect()
        proto.transport.pause_reading()
        assert not proto.transport.is_reading()
        sock.sendall(b"echo held")
        await asyncio.sleep(0.05)  # not a timing assertion: nothing may arrive however long
        assert bytes(proto.data) == b""
        proto.transport.resume_reading()
        assert proto.transport.is_reading()
        assert await recv_exactly(sock, 4) == b"held"
        sock.close()

    run(layer, body)


def test_a_client_gone_while_reading_is_paused_is_seen_once_reading_resumes(layer):
    """With reading paused a hang-up is not a reason to wake the loop over and over; the
    end of file (after the data sent before it) is read when reading resumes."""

    async def body(srv):
        sock, proto = await srv.connect()
        proto.transport.pause_reading()
        sock.sendall(b"echo last words")
        sock.close()
        await asyncio.sleep(0.05)
        assert proto.events == ["made"]
        proto.transport.resume_reading()
        await asyncio.wait_for(proto.lost, 10)
        assert bytes(proto.data) == b"echo last words"
        assert proto.events == ["made", "eof", "lost"]

    run(layer, body)


def test_many_clients_are_served_side_by_side(layer):
    async def body(srv):
        clients = [await srv.connect() for _ in range(200)]
        for i, (sock, _) in enumerate(clients):
            sock.sendall(b"echo %d;" % i)
        for i, (sock, _) in enumerate(clients):
            expected = b"%d;" % i
            assert await recv_exactly(sock, len(expected)) == expected
        for sock, _ in clients:
            sock.close()
        for _, proto in clients:
            await asyncio.wait_for(proto.lost, 10)

    run(layer, body)


def _descriptor(transport) -> int:
    sock = transport.get_extra_info("socket")  # the loops' transports
    return sock.fileno() if sock is not None else transport.get_extra_info("fileno")


def test_an_accepted_client_is_non_blocking_close_on_exec_and_without_nagle(layer):
    """What the loops do to a socket they accept, the epoll layer does to its descriptor: a
    blocking one would stall the loop, an inherited one would outlive a fork's exec, and
    Nagle's algorithm would hold a short reply back for the client's next ACK."""
    import fcntl
    import os

    async def body(srv):
        sock, proto = await srv.connect()
        fd = _descriptor(proto.transport)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert not os.get_inheritable(fd)
        with socket.socket(fileno=os.dup(fd)) as view:
            assert view.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sock.sendall(b"echo ok")  # and it is served
        assert await recv_exactly(sock, 2) == b"ok"
        sock.close()
        await asyncio.wait_for(proto.lost, 10)

    run(layer, body)


def test_closing_the_listener_keeps_the_open_connections(layer):
    async def body(srv):
        sock, proto = await srv.connect()
        srv.listener.close()  # the listening socket is closed at once
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
        sock.sendall(b"echo alive")
        assert await recv_exactly(sock, 5) == b"alive"
        sock.close()
        # (After the connection: from Python 3.12.1 asyncio's wait_closed waits for the
        # server's connections to end as well.)
        await srv.listener.wait_closed()

    run(layer, body)


# ---- out of descriptors ----------------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the epoll layer is Linux only")
def test_out_of_descriptors_clients_wait_and_are_served_once_some_close(tmp_path):
    """With its descriptors used up the epoll layer stops accepting for a second at a time, as
    asyncio's transports do, and logs why; the clients it could not take wait in the listen
    backlog and are served once others have gone, and the clients it has keep being served.
    (uvloop's transports, the pure-Python build's, close such clients instead: libuv's
    EMFILE trick. So this runs the compiled build only.)"""
    import resource

    import erq._fast._epoll  # noqa: F401 - the compiled build, or the test fails

    from conftest import ErqProcess

    (tmp_path / "data").mkdir()
    server = ErqProcess("c", tmp_path / "data").start()
    # The limit lowered under the running server: what it read at its start leaves room for
    # many connections (erq.open_files), so its accepts, not that rule, meet the limit.
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (64, 64))
    served, waiting = [], []
    try:
        first = server.client()  # the queue, and its journal's descriptors, before the limit
        first.send(b"set q 0 0 2\r\nhi\r\n")
        assert first.line() == STORED
        served.append(first)
        while len(waiting) < 5:
            assert len(served) < 64, "every client was served: the limit did not apply"
            client = server.client(timeout=1.0)
            client.send(b"version\r\n")
            try:
                assert client.line() == VERSION_LINE
                served.append(client)
            except TimeoutError:  # not accepted: out of descriptors
                waiting.append(client)
        # One line, not one per retry: the accept is tried again every second (5 s here).
        assert 1 <= server.read_log().count("cannot accept a client") < 3, server.read_log()
        first.send(b"set q 0 0 2\r\nho\r\n")  # the clients it has are served
        assert first.line() == STORED
        for client in served[-10:]:
            client.close()
        for client in waiting:  # each sent "version" before it was accepted
            client.sock.settimeout(10.0)
            assert client.line() == VERSION_LINE
        assert server.proc.poll() is None
    finally:
        for client in served + waiting:
            client.close()
        server.stop()


EPOLL_LAYERS = [name for name in LAYERS if name.startswith("epoll")]


def test_no_read_lent_to_erqs_protocol_is_one_it_keeps():
    """erq's protocol keeps a read longer than PARSED_WHOLE (its rest waits for the loop's
    next pass): a lent read must be no longer, or each would pin the hub's chunk."""
    from erq._fast import _epoll
    from erq._fast._protocol import PARSED_WHOLE

    assert 0 < _epoll.LENT_READ_MAX <= PARSED_WHOLE


@pytest.mark.parametrize("epoll_layer", EPOLL_LAYERS)
def test_erqs_protocol_reads_in_the_hubs_chunk_and_keeps_nothing_of_it(epoll_layer):
    """A read up to 16 KiB is lent to erq's protocol in the hub's one chunk, not copied. What
    the protocol made of a read (a set's value, a line or a value split across reads,
    requests held behind a blocked get) must not change when the next read lands in the same
    chunk, and the chunk must be free again after every read. A chunk someone else holds is
    never written into: the next read takes a new one."""
    from erq._fast import _protocol
    from erq.config import Config
    from erq.queues import QueueCollection
    from erq.state import ServerState

    loop = new_loop(epoll_layer)
    state = ServerState(Config(), QueueCollection(Config(), None), loop)

    async def main() -> None:
        listener = await open_listener(loop, epoll_layer, lambda: _protocol.MemcacheProtocol(state))
        sock = socket.create_connection(listener.sockets[0].getsockname())
        sock.setblocking(False)
        try:
            chunk = id(listener.hub._chunk)  # not a reference: a chunk held is not lent
            value = b"VALUE q 0 %d\r\n%s\r\nEND\r\n"
            for piece, reply in (
                (b"set q 0 0 10\r\n01234", b""),
                (b"56789\r\nset q 0 0 3\r\nab", b"STORED\r\n"),
                (b"c\r\nget w/t=300\r\nset q 0 0 3\r\nxyz\r\nget q\r\n", b"STORED\r\n"),
                (b"", b"END\r\nSTORED\r\n" + value % (10, b"0123456789")),
                (b"get q\r\nget q\r\nget q\r\n", value % (3, b"abc") + value % (3, b"xyz") + END),
            ):
                await loop.sock_sendall(sock, piece)
                if reply:
                    assert await recv_exactly(sock, len(reply)) == reply
                else:
                    await asyncio.sleep(0.05)  # the server reads the piece on its own
                assert id(listener.hub._chunk) == chunk
        finally:
            sock.close()
            await close_listener(listener, epoll_layer)

    async def held() -> None:
        listener = await open_listener(loop, epoll_layer, lambda: _protocol.MemcacheProtocol(state))
        sock = socket.create_connection(listener.sockets[0].getsockname())
        sock.setblocking(False)
        try:
            await loop.sock_sendall(sock, b"get q\r\n")
            assert await recv_exactly(sock, 5) == END  # a first read: the chunk is the hub's
            chunk = listener.hub._chunk
            before = bytes(chunk)
            await loop.sock_sendall(sock, b"set h 0 0 2\r\nhi\r\nget h\r\n")
            reply = b"STORED\r\nVALUE h 0 2\r\nhi\r\nEND\r\n"
            assert await recv_exactly(sock, len(reply)) == reply
            assert chunk == before  # not written into
            assert listener.hub._chunk is not chunk
        finally:
            sock.close()
            await close_listener(listener, epoll_layer)

    try:
        loop.run_until_complete(asyncio.wait_for(main(), 30))
        loop.run_until_complete(asyncio.wait_for(held(), 30))
    finally:
        state.queues.close()
        loop.close()


@pytest.mark.parametrize("epoll_layer", EPOLL_LAYERS)
def test_a_protocol_that_keeps_what_it_reads_keeps_each_read_as_it_came(epoll_layer):
    """Any other protocol is handed a copy of each read: one that keeps the bytes objects it
    is given must find them unchanged by the reads after them."""
    kept: list[bytes] = []

    async def body(srv: Server) -> None:
        sock, recorder = await srv.connect()
        loop = asyncio.get_running_loop()
        recorder.data_received = kept.append  # keeps the objects themselves
        pieces = [bytes([65 + i]) * (100 + i) for i in range(20)]
        sent = 0
        for piece in pieces:
            await loop.sock_sendall(sock, piece)
            sent += len(piece)
            await until(lambda sent=sent: sum(map(len, kept)) == sent)
        assert b"".join(kept) == b"".join(pieces)
        assert all(len(set(read)) == 1 for read in kept)  # no read shows another's bytes
        sock.close()

    run(epoll_layer, body)


@pytest.mark.parametrize("epoll_layer", EPOLL_LAYERS)
def test_a_read_is_lone_only_when_no_other_connection_was_ready_beside_it(epoll_layer):
    """The hub tells a connection, while its protocol handles a read, whether it was the only
    one ready (``lone``: a long pipeline's replies then go out as they are made,
    commands.SEND_EVERY), and takes it back after."""
    seen: list[tuple[str, bool]] = []

    async def body(srv: Server) -> None:
        clients = [await srv.connect() for _ in range(2)]
        for (_sock, recorder), name in zip(clients, "ab", strict=True):
            transport = recorder.transport

            def record(data: bytes, name: str = name, transport=transport) -> None:
                seen.append((name + data.decode(), transport.lone))

            recorder.data_received = record
        (a, ra), (b, rb) = clients
        a.send(b"1")  # alone
        await until(lambda: len(seen) == 1)
        a.send(b"2")  # both ready when the loop looks
        b.send(b"2")
        await until(lambda: len(seen) == 3)
        b.send(b"3")  # alone again
        await until(lambda: len(seen) == 4)
        assert seen[0] == ("a1", True)
        assert sorted(seen[1:3]) == [("a2", False), ("b2", False)]
        assert seen[3] == ("b3", True)
        assert not ra.transport.lone and not rb.transport.lone  # only while it reads
        for sock, _ in clients:
            sock.close()

    run(epoll_layer, body)
