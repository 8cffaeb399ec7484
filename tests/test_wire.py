"""The reply writer (SocketWriter), both builds: the bytes reach the socket in order whoever
sends them, the transport keeps what the socket does not take and everything written after it,
and a closing transport or a broken connection is left to the transport.

The transport here does what asyncio's and uvloop's do with ``write``: send what the socket
takes now, keep the rest, and send it when the socket drains (``drain``, the loop's part).
The compiled writer sends on the socket itself while that buffer is empty; the pure-Python
twin hands every reply to the transport. Through a real server, the protocol tests cover both
on both loops (tests/test_protocol_connection.py).
"""

from __future__ import annotations

import socket
import sys

import pytest

from conftest import impl_module


class BufferingTransport:
    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.closing = False
        self.writes: list[bytes] = []
        self.error: OSError | None = None

    def get_extra_info(self, name, default=None):
        return self.sock if name == "socket" and self.sock is not None else default

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        if self.closing or self.error is not None:
            return
        if not self.buffer:
            try:
                data = data[self.sock.send(data) :]
            except BlockingIOError:
                pass
            except OSError as exc:  # a real transport closes the connection and reports it
                self.error = exc
                return
        self.buffer += data

    def drain(self) -> None:
        while self.buffer:
            try:
                sent = self.sock.send(self.buffer)
            except BlockingIOError:
                return
            del self.buffer[:sent]


@pytest.fixture
def writer_class(impl):
    return impl_module(impl, "_wire", "_wire_py").SocketWriter


@pytest.fixture
def pair():
    server, client = socket.socketpair()
    server.setblocking(False)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield server, client
    server.close()
    client.close()


def read_all(client: socket.socket, n: int) -> bytes:
    out = bytearray()
    client.settimeout(5)
    while len(out) < n:
        chunk = client.recv(n - len(out))
        assert chunk, "the peer closed"
        out += chunk
    return bytes(out)


def test_replies_reach_the_socket_in_order(impl, writer_class, pair):
    server, client = pair
    transport = BufferingTransport(server)
    write = writer_class(transport).write
    for reply in (b"STORED\r\n", b"END\r\n", b"VALUE q 0 2\r\nhi\r\nEND\r\n"):
        write(reply)
    assert read_all(client, 35) == b"STORED\r\nEND\r\nVALUE q 0 2\r\nhi\r\nEND\r\n"
    # The compiled writer used the socket itself; the twin, the transport.
    assert (transport.writes == []) == (impl == "c")


def test_what_the_socket_does_not_take_waits_and_later_replies_go_after_it(
    impl, writer_class, pair
):
    server, client = pair
    transport = BufferingTransport(server)
    write = writer_class(transport).write
    big = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffers hold
    write(big)
    assert transport.get_write_buffer_size() > 0  # the rest waits in the transport
    client.settimeout(5)
    head = client.recv(65536)  # the socket has room again, but the transport has not sent
    write(b"after\r\n")  # ... so this must wait behind the rest of big
    transport.drain()
    rest = bytearray()
    while transport.buffer or len(head) + len(rest) < len(big) + 7:
        transport.drain()
        try:
            rest += client.recv(1 << 20)
        except TimeoutError:
            pytest.fail("the peer stopped receiving")
    assert head + bytes(rest) == big + b"after\r\n"
    # The transport is empty again: the next reply may go straight to the socket.
    writes_before = len(transport.writes)
    write(b"next\r\n")
    assert read_all(client, 6) == b"next\r\n"
    assert len(transport.writes) == writes_before + (0 if impl == "c" else 1)


def test_a_bytes_like_reply_is_sent_and_anything_else_refused(writer_class, pair):
    """Like the loops' transports: a bytearray or memoryview goes out as its bytes; an int
    (which bytes() would turn into that many zero bytes) is a TypeError, nothing sent."""

    class StrictTransport(BufferingTransport):
        def write(self, data) -> None:
            memoryview(data)  # asyncio and uvloop refuse what is not bytes-like
            super().write(data)

    server, client = pair
    writer = writer_class(StrictTransport(server))
    writer.write(bytearray(b"STORED\r\n"))
    writer.write(memoryview(b"END\r\n"))
    with pytest.raises(TypeError):
        writer.write(3)
    writer.write(b"DELETED\r\n")
    assert read_all(client, 22) == b"STORED\r\nEND\r\nDELETED\r\n"


def test_a_closing_transport_gets_every_write(writer_class, pair):
    # Once closing, the descriptor may be closed and its number taken by another connection:
    # nothing may be written to it directly.
    server, client = pair
    transport = BufferingTransport(server)
    write = writer_class(transport).write
    transport.closing = True
    write(b"STORED\r\n")
    assert transport.writes == [b"STORED\r\n"]
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)


def test_a_broken_connection_is_left_to_the_transport(writer_class, pair):
    server, client = pair
    transport = BufferingTransport(server)
    write = writer_class(transport).write
    client.close()
    write(b"STORED\r\n")  # EPIPE: no exception here; the transport meets the error itself
    assert transport.writes == [b"STORED\r\n"]
    assert isinstance(transport.error, BrokenPipeError | ConnectionResetError)


def test_without_a_socket_every_reply_goes_to_the_transport(writer_class):
    transport = BufferingTransport(None)
    transport.write = transport.writes.append  # nothing to send on
    write = writer_class(transport).write
    write(b"END\r\n")
    write(b"STORED\r\n")
    assert transport.writes == [b"END\r\n", b"STORED\r\n"]


# ---- the VALUE line ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "size", "cas", "numbers"),
    [
        (0, 0, -1, b"0 0\r\n"),
        (0, 10, -1, b"0 10\r\n"),
        (7, 123, 0, b"7 123 0\r\n"),
        (2**32 - 1, 2**40, -1, b"4294967295 1099511627776\r\n"),
        (1, 2, 2**63 - 1, b"1 2 9223372036854775807\r\n"),
        (10, 100, 1000, b"10 100 1000\r\n"),
    ],
)
def test_value_header_is_the_prefix_and_the_numbers(impl, flags, size, cas, numbers):
    value_header = impl_module(impl, "_wire", "_wire_py").value_header
    assert value_header(b"VALUE jobs ", flags, size, cas) == b"VALUE jobs " + numbers
    assert value_header(b"", flags, size, cas) == numbers


def test_value_header_matches_decimal_formatting_everywhere(impl):
    """Every digit count of each number, against Python's own formatting."""
    value_header = impl_module(impl, "_wire", "_wire_py").value_header
    numbers = sorted({0, 1, 9} | {10**k + d for k in range(1, 19) for d in (-1, 0, 1)})
    for n in numbers:
        flags = n % 2**32
        assert value_header(b"V ", flags, n, -1) == f"V {flags} {n}\r\n".encode()
        assert value_header(b"V ", flags, n, n) == f"V {flags} {n} {n}\r\n".encode()


@pytest.mark.parametrize("size", [0, 1, 10, 4095, 4096, 4097, 65536])
@pytest.mark.parametrize("cas", [-1, 12345])
@pytest.mark.parametrize("end", [False, True])
def test_append_value_sends_the_line_the_value_and_crlf(impl, size, cas, end):
    """Small values go in one piece with their line (and the reply's END, when asked), large
    ones after it; the bytes are the same."""
    wire = impl_module(impl, "_wire", "_wire_py")
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    out = [b"before "]
    wire.append_value(out, b"VALUE q ", 3, data, cas, end)
    line = b"VALUE q 3 %d\r\n" % size if cas < 0 else b"VALUE q 3 %d %d\r\n" % (size, cas)
    tail = b"\r\nEND\r\n" if end else b"\r\n"
    assert b"".join(out) == b"before " + line + data + tail
    if impl == "c" and size > wire.VALUE_COPY_LIMIT:
        assert out[2] is data  # appended as it is: copied once, by the join
    elif impl == "c":
        assert len(out) == 2  # the line, the value, its CRLF and the END in one piece


def test_append_value_takes_any_bytes_like_value(impl):
    wire = impl_module(impl, "_wire", "_wire_py")
    out: list = []
    wire.append_value(out, b"VALUE q ", 0, bytearray(b"abc"))
    assert b"".join(out) == b"VALUE q 0 3\r\nabc\r\n"


@pytest.mark.parametrize("size", [0, 10, 4096, 65536])
def test_append_end_ends_the_reply_and_fuses_only_into_a_piece_of_its_own(impl, size):
    """END follows whatever is there; the compiled twin puts it into the last piece when only
    the list holds that piece (a one-key get's VALUE block), so the join has one piece."""
    wire = impl_module(impl, "_wire", "_wire_py")
    data = bytes(range(256)) * (size // 256)
    out: list = []
    wire.append_value(out, b"VALUE q ", 0, data)
    wire.append_end(out)
    assert b"".join(out) == b"VALUE q 0 %d\r\n" % len(data) + data + b"\r\nEND\r\n"
    if impl == "c" and len(data) <= wire.VALUE_COPY_LIMIT:
        assert len(out) == 1  # one piece: the join hands it on without a copy

    shared = b"x" * 3 + b"y"  # held by this test too: it must not change
    out = [shared]
    wire.append_end(out)
    assert shared == b"xxxy"
    assert out == [b"xxxy", b"END\r\n"]

    out = []
    wire.append_end(out)
    assert out == [b"END\r\n"]


class HoldingTransport(BufferingTransport):
    """Keeps what the socket did not take as the objects it was given, as uvloop's transport
    and erq's epoll layer do, instead of copying it."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.buffer: list = []  # the pieces not sent yet (its length: nonzero while any wait)

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        if not self.buffer:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self.buffer.append(data)

    def drain(self) -> None:
        while self.buffer:
            try:
                sent = self.sock.send(self.buffer[0])
            except BlockingIOError:
                return
            if sent < len(self.buffer[0]):
                self.buffer[0] = memoryview(self.buffer[0])[sent:]
                return
            del self.buffer[0]


def test_a_value_block_still_held_is_never_made_again(impl, writer_class, pair):
    """The compiled twin makes a one-key get's VALUE block in one bytes object, again for each
    reply once the last was sent and let go. A reply the socket did not take is held by the
    transport: the replies after it, and their END, are made elsewhere, and every reply
    reaches the client whole and in order."""
    wire = impl_module(impl, "_wire", "_wire_py")
    server, client = pair
    transport = HoldingTransport(server)
    write = writer_class(transport).write
    expected = bytearray()
    out: list = []
    for i in range(300):
        value = b"%04d" % i + bytes([65 + i % 26]) * (500 + 7 * i)  # ~0.5 to 2.6 KiB
        wire.append_value(out, b"VALUE q ", i, value, -1, i % 2 == 0)
        if i % 2:
            wire.append_end(out)
        expected += b"VALUE q %d %d\r\n" % (i, len(value)) + value + b"\r\nEND\r\n"
        write(out[0] if len(out) == 1 else b"".join(out))  # as Session.flush sends them
        wire.clear_replies(out)
    assert len(transport.buffer) > 100  # most replies waited, held as they were written
    got = bytearray()
    client.settimeout(5)
    while len(got) < len(expected):
        transport.drain()
        got += client.recv(1 << 20)
    assert bytes(got) == bytes(expected)


def test_a_session_sends_through_the_writer_it_was_given_whatever_its_kind(impl, pair):
    """A compiled Session calls a ReplyWriter's ``write`` in C, and any other writer as it
    is: the SocketWriter's replies reach the socket; a ReplyWriter subclass's own ``write``
    is the one called; another method of a ReplyWriter is called as itself, not its write."""
    from erq.config import Config
    from erq.queues import QueueCollection
    from erq.state import ServerState

    session_module = impl_module(impl, "_session", "_session_py")
    wire = impl_module(impl, "_wire", "_wire_py")
    state = ServerState(Config(), QueueCollection(Config(), None), None)

    def replies(write) -> None:
        session = session_module.Session(state, None, write, lambda: None, None)
        for reply in (b"STORED\r\n", b"END\r\n"):
            session.out.append(reply)
            session.flush()

    server, client = pair
    replies(wire.SocketWriter(BufferingTransport(server)).write)
    assert read_all(client, 13) == b"STORED\r\nEND\r\n"

    class Recording(wire.ReplyWriter):
        def __init__(self) -> None:
            self.got: list[bytes] = []
            self.elsewhere: list[bytes] = []

        def write(self, data) -> None:
            self.got.append(data)

        def aside(self, data) -> None:
            self.elsewhere.append(data)

    recording = Recording()
    replies(recording.write)
    assert recording.got == [b"STORED\r\n", b"END\r\n"] and not recording.elsewhere
    replies(recording.aside)
    assert recording.elsewhere == [b"STORED\r\n", b"END\r\n"]
    plain: list[bytes] = []
    replies(plain.append)
    assert plain == [b"STORED\r\n", b"END\r\n"]


def test_clear_replies_empties_the_list_and_releases_every_piece(impl):
    """A session's reply list after a flush: empty, each piece released once, ready for the
    next replies. The compiled twin keeps a small list's slot array (the next reply appends
    without an allocation) and gives a long pipeline's back. A finaliser that appends to the
    list while its pieces are released leaves its piece in the list, as ``list.clear`` does."""
    wire = impl_module(impl, "_wire", "_wire_py")
    freed: list[int] = []

    class Piece:
        def __init__(self, n: int) -> None:
            self.n = n

        def __del__(self) -> None:
            freed.append(self.n)

    out = [Piece(1), Piece(2), b"END\r\n"]
    wire.clear_replies(out)
    assert out == [] and sorted(freed) == [1, 2]
    out.append(b"STORED\r\n")
    assert out == [b"STORED\r\n"]

    small = [b"STORED\r\n"] * 4
    room = sys.getsizeof(small)
    wire.clear_replies(small)
    assert small == []
    if impl == "c":
        assert sys.getsizeof(small) == room  # the slots stay for the next replies
    long_pipeline: list[bytes] = []
    for _ in range(100):
        long_pipeline.append(b"END\r\n")
    wire.clear_replies(long_pipeline)
    assert long_pipeline == [] and sys.getsizeof(long_pipeline) == sys.getsizeof([])

    class Appender:
        def __del__(self) -> None:
            out.append(b"late")

    out = [b"a", Appender(), b"b"]
    wire.clear_replies(out)
    assert out == [b"late"]
    wire.clear_replies(out)
    assert out == []


@pytest.mark.parametrize("name", ["clear_replies", "append_end", "append_value"])
def test_a_reply_list_helper_takes_only_a_list(impl, name):
    """Cython lets None through a typed argument: the compiled helpers would have read a
    list's fields from None. Both builds refuse anything but a list alike."""
    helper = getattr(impl_module(impl, "_wire", "_wire_py"), name)
    rest = (b"VALUE q ", 0, b"x") if name == "append_value" else ()

    class Replies(list):
        pass

    for wrong in (None, (), bytearray(b"x"), Replies()):
        with pytest.raises(TypeError):
            helper(wrong, *rest)
