"""The connection layer (MemcacheProtocol): both builds, on both event loops, on each loop's
transports and on erq's own epoll set (erq/_fast/_epoll.pyx, the compiled build's on Linux).

The compiled build is an extension class, which cannot subclass ``asyncio.Protocol``; asyncio
and uvloop call a protocol's methods by name, so the class must serve a real socket on each
loop by itself: replies, end of file, the max_connections refusal and flow control. The
flow-control bits, the refusal and the idle clock are also pinned with a recording
transport, and the idle close end to end through a server process.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import uvloop

from erq.config import Config
from erq.queues import QueueCollection
from erq.state import ServerState

from conftest import impl_module
from support import (
    END,
    LAYERS,
    STORED,
    VERSION_LINE,
    assert_open,
    close_listener,
    new_loop,
    one,
    open_listener,
    run_script,
    start,
    wait_for_stat,
)

REFUSAL = b"SERVER_ERROR too many open connections\r\n"


@pytest.fixture
def protocol_class(impl):
    return impl_module(impl, "_protocol", "_protocol_py").MemcacheProtocol


def impl_protocol_module(protocol_class):
    return sys.modules[protocol_class.__module__]


def make_state(loop, **server) -> ServerState:
    config = Config()
    config = replace(config, server=replace(config.server, **server))
    state = ServerState(config, QueueCollection(config, None), loop)
    state.ready = True
    return state


# ---- on a real socket: each loop's transports, and erq's epoll set on each loop ----------------
@pytest.fixture(params=LAYERS)
def layer(request) -> str:
    return request.param


@pytest.fixture
def loop(layer):
    loop = new_loop(layer)
    assert isinstance(loop, uvloop.Loop) == layer.endswith("uvloop")
    yield loop
    loop.close()


def serve(loop, layer, protocol_class, body, **server):
    """Run ``body(state, port)`` against a listener of ``protocol_class`` on ``loop``; a
    protocol method the loop fails to call (it reports those to its exception handler, then
    closes the connection) fails the test."""
    errors = []
    loop.set_exception_handler(lambda _, context: errors.append(context))

    async def main():
        state = make_state(loop, **server)
        listener = await open_listener(loop, layer, lambda: protocol_class(state))
        try:
            port = listener.sockets[0].getsockname()[1]
            await asyncio.wait_for(body(state, port), 30)
        finally:
            for proto in list(state.connections):
                proto.transport.close()
            await close_listener(listener, layer)

    loop.run_until_complete(main())
    assert errors == []


async def until(check, what: str) -> None:
    """Let the loop run until ``check()`` holds (the caller's wait_for bounds it)."""
    while not check():
        await asyncio.sleep(0.001)


async def within(seconds: float, check, what: str) -> None:
    """``until``, bounded: ``check()`` must hold within ``seconds``."""
    try:
        await asyncio.wait_for(until(check, what), seconds)
    except TimeoutError:
        raise AssertionError(f"no {what} within {seconds} s") from None


def test_a_real_connection_is_served_and_closed_at_end_of_file(loop, layer, protocol_class):
    async def body(state, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"set q 0 0 5\r\nhello\r\nget q\r\nversion\r\n")
        expected = STORED + one("q", b"hello") + VERSION_LINE
        assert await reader.readexactly(len(expected)) == expected
        (proto,) = state.connections
        assert isinstance(proto, protocol_class)
        assert state.counters.curr_connections == 1
        writer.write_eof()  # nothing is due: the server closes at once
        assert await reader.read() == b""
        await until(lambda: not state.connections, "connection_lost")
        assert state.counters.curr_connections == 0
        assert state.counters.total_connections == 1
        writer.close()

    serve(loop, layer, protocol_class, body)


def test_a_client_beyond_max_connections_is_refused_and_closed(loop, layer, protocol_class):
    async def body(state, port):
        reader1, writer1 = await asyncio.open_connection("127.0.0.1", port)
        writer1.write(b"version\r\n")
        assert await reader1.readexactly(len(VERSION_LINE)) == VERSION_LINE
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        writer2.write(b"set q 0 0 1\r\nx\r\n")
        assert await reader2.read() == REFUSAL  # the refusal, then end of file
        await until(lambda: state.counters.total_connections == 2, "the refusal")
        assert state.counters.curr_connections == 1
        assert state.counters.rejected_connections == 1
        assert len(state.connections) == 1
        assert state.queues.get_or_create("q").items == 0  # the refused set never ran
        writer1.write(b"get q\r\n")
        assert await reader1.readexactly(len(END)) == END
        writer1.close()
        writer2.close()

    serve(loop, layer, protocol_class, body, max_connections=1)


async def recv_to_eof(sock: socket.socket) -> bytes:
    """Read a non-blocking socket to its end of stream (a reset raises)."""
    loop = asyncio.get_running_loop()
    got = b""
    while chunk := await loop.sock_recv(sock, 65536):
        got += chunk
    return got


def refused_client(port: int, request: bytes) -> socket.socket:
    """Connect and send ``request`` before the server can accept the connection (the loop
    does not run meanwhile): the server meets it with the request already unread."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(request)
    sock.setblocking(False)
    return sock


def test_a_refused_client_that_already_sent_a_request_reads_the_refusal_then_the_end(
    loop, layer, protocol_class
):
    """Past max_connections the client has usually sent its first request already, unread by
    the server. A close with unread input resets the connection, and the client could get
    ECONNRESET instead of the refusal (it did: the refusal, then a reset). The refusal is a
    lingering close: the client reads it, then the end of the stream, every time."""
    module = impl_protocol_module(protocol_class)

    async def body(state, port):
        reader1, writer1 = await asyncio.open_connection("127.0.0.1", port)
        writer1.write(b"version\r\n")
        assert await reader1.readexactly(len(VERSION_LINE)) == VERSION_LINE
        for _ in range(5):
            sock = refused_client(port, b"set q 0 0 1\r\nx\r\n" + b"version\r\n" * 1000)
            assert await recv_to_eof(sock) == REFUSAL
            sock.close()
        await within(2, lambda: module.lingering_refusals() == 0, "the refusals to end")
        assert state.counters.total_connections == 6
        assert state.counters.curr_connections == 1
        assert state.queues.get_or_create("q").items == 0  # no refused set ran
        writer1.write(b"get q\r\n")
        assert await reader1.readexactly(len(END)) == END
        writer1.close()

    serve(loop, layer, protocol_class, body, max_connections=1)


def test_a_refused_client_lingers_a_bounded_time_and_a_bounded_number(
    loop, layer, protocol_class, monkeypatch
):
    """A refused client that neither reads nor closes holds its descriptor LINGER_SECONDS at
    most; past MAX_LINGERING lingering at once, a refused client is closed at once."""
    module = impl_protocol_module(protocol_class)
    monkeypatch.setattr(module, "LINGER_SECONDS", 0.2)
    monkeypatch.setattr(module, "MAX_LINGERING", 1)

    async def body(state, port):
        _, writer1 = await asyncio.open_connection("127.0.0.1", port)
        await until(lambda: state.counters.curr_connections == 1, "the first client")
        request = b"set q 0 0 1\r\nx\r\n"
        started = time.monotonic()
        lingers = refused_client(port, request)  # reads nothing, sends on
        await until(lambda: module.lingering_refusals() == 1, "the refusal to linger")
        closed_at_once = refused_client(port, request)
        await until(lambda: state.counters.total_connections == 3, "the second refusal")
        assert module.lingering_refusals() == 1
        lingers.send(b"version\r\n")
        await within(2, lambda: module.lingering_refusals() == 0, "the linger to end")
        assert time.monotonic() - started >= 0.15  # (uvloop's timers are in whole ms)
        for sock in (lingers, closed_at_once):
            sock.close()
        writer1.close()

    serve(loop, layer, protocol_class, body, max_connections=1)


@pytest.mark.parametrize("how", ["reset", "shut"])
def test_a_blocked_get_whose_client_just_left_is_not_handed_the_item(
    loop, layer, protocol_class, how
):
    """PROTOCOL §5: no item is lost to a dead client. The client's reset (or end of stream)
    is in the kernel, not yet served by the loop, when an item comes for its blocked get (as
    when both sit in one batch of events): the item must stay queued for the next reader,
    not go out on a socket that is gone."""

    async def body(state, port):
        w = socket.create_connection(("127.0.0.1", port))
        w.sendall(b"get q/t=5000\r\n")
        await until(lambda: state.queues.get("q") is not None, "the queue")
        queue = state.queues.get("q")
        await until(lambda: queue.waiter_count == 1, "the get to block")
        if how == "reset":
            w.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.close()
        else:
            w.shutdown(socket.SHUT_WR)
        time.sleep(0.05)  # on the loop: it serves nothing meanwhile, the kernel delivers
        state.queues.add("q", b"kept", 0, 0)  # now, before the loop hears of the client
        assert queue.items == 1
        await within(2, lambda: not state.connections, "the connection's end")
        assert queue.items == 1 and queue.waiter_count == 0
        if how == "shut":
            w.close()

    serve(loop, layer, protocol_class, body)


def test_reading_stops_while_the_client_does_not_read_its_replies(loop, layer, protocol_class):
    item = b"x" * (256 << 10)
    peeks = 64  # 16 MiB of replies: more than the socket buffers take

    async def body(state, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"set q 0 0 %d\r\n%s\r\n" % (len(item), item))
        assert await reader.readexactly(len(STORED)) == STORED
        (proto,) = state.connections
        writer.write(b"get q/peek\r\n" * peeks)
        await until(lambda: not proto.transport.is_reading(), "pause_writing")
        reply = one("q/peek", item)
        for _ in range(peeks):
            assert await reader.readexactly(len(reply)) == reply
        await until(proto.transport.is_reading, "resume_writing")
        writer.write(b"version\r\n")
        assert await reader.readexactly(len(VERSION_LINE)) == VERSION_LINE
        writer.close()

    serve(loop, layer, protocol_class, body)


def unsent(proto) -> int:
    """What the server holds for a client that has not read it: its replies still in the
    session and those queued in the transport."""
    return proto.transport.get_write_buffer_size() + sum(len(piece) for piece in proto.session.out)


@pytest.mark.parametrize("one_line", [False, True], ids=["pipelined", "multi-key"])
def test_a_client_that_does_not_read_its_replies_holds_back_its_requests(
    loop, layer, protocol_class, one_line
):
    """Requests already read stop running too, not only reading: replies held for a client
    that does not take them stay within OUT_BUDGET, however much one read asks for (64
    peeks of a 256 KiB item, pipelined or as the keys of one get: 16 MiB)."""
    from erq.session import OUT_BUDGET

    item = b"x" * (256 << 10)
    peeks = 64
    block = one("q/peek", item)[: -len(END)]

    async def body(state, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"set q 0 0 %d\r\n%s\r\n" % (len(item), item))
        assert await reader.readexactly(len(STORED)) == STORED
        (proto,) = state.connections
        if one_line:
            writer.write(b"get " + b" ".join([b"q/peek"] * peeks) + b"\r\nversion\r\n")
        else:
            writer.write(b"get q/peek\r\n" * peeks + b"version\r\n")
        await until(lambda: proto.session.write_paused, "pause_writing")
        await asyncio.sleep(0.05)  # what still runs would run now
        assert unsent(proto) <= OUT_BUDGET + 2 * len(item)
        if one_line:  # the get stopped between its keys
            assert proto.session.blocked is not None and proto.session.blocked_on_output
        assert len(proto.session.pending) >= 1  # version, at least, waits
        expected = block * peeks + END if one_line else (block + END) * peeks
        assert await reader.readexactly(len(expected)) == expected
        assert await reader.readexactly(len(VERSION_LINE)) == VERSION_LINE
        assert proto.session.blocked is None and not proto.session.pending
        writer.close()

    serve(loop, layer, protocol_class, body)


def test_reading_stops_while_a_blocked_get_holds_a_long_pipeline(loop, layer, protocol_class):
    async def body(state, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"version\r\n")
        assert await reader.readexactly(len(VERSION_LINE)) == VERSION_LINE
        (proto,) = state.connections
        behind = 30_000  # more than the session's MAX_PENDING, and past MAX_UNPARSED
        writer.write(b"get q/t=60000\r\n")
        await until(lambda: proto.session.blocked is not None, "the blocking get")
        writer.write(b"get empty\r\n" * behind)
        await until(lambda: not proto.transport.is_reading(), "the pipeline pause")
        _, producer = await asyncio.open_connection("127.0.0.1", port)
        producer.write(b"set q 0 0 2\r\nhi\r\n")
        expected = one("q/t=60000", b"hi") + END * behind
        assert await reader.readexactly(len(expected)) == expected
        await until(proto.transport.is_reading, "the pipeline resume")
        writer.close()
        producer.close()

    serve(loop, layer, protocol_class, body)


def test_reading_stops_once_the_pipeline_behind_a_blocked_get_holds_too_many_bytes(
    loop, layer, protocol_class
):
    """Few requests but big ones (1 MiB sets): what waits behind a get that waits for an
    item is bounded in bytes too, not only in requests. It was parsed and held up to
    MAX_PENDING_BYTES; now what comes while the get waits is not parsed at all: the read
    waits as it came, and no more is read."""

    value = b"v" * (1 << 20)
    sets = 24  # 24 MiB, three times the bound

    async def body(state, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"get q/t=60000\r\n")
        (proto,) = await until_connections(state)
        await until(lambda: proto.session.blocked is not None, "the blocking get")
        for _ in range(sets):
            writer.write(b"set other 0 0 %d\r\n%s\r\n" % (len(value), value))
        await until(lambda: not proto.transport.is_reading(), "the pipeline pause")
        await asyncio.sleep(0.05)
        assert not proto.session.pending and proto.session.pending_bytes == 0
        _, producer = await asyncio.open_connection("127.0.0.1", port)
        producer.write(b"set q 0 0 2\r\nhi\r\n")
        expected = one("q/t=60000", b"hi") + STORED * sets
        assert await reader.readexactly(len(expected)) == expected
        assert proto.session.pending_bytes == 0
        await until(proto.transport.is_reading, "the pipeline resume")
        assert state.queues.get_or_create("other").items == sets
        writer.close()
        producer.close()

    serve(loop, layer, protocol_class, body)


def test_what_came_while_a_get_waited_runs_once_it_times_out_in_order(loop, layer, protocol_class):
    """Requests that came while a get waited for an item, kept as they came (not parsed;
    reading paused past MAX_UNPARSED), run once the get ends without one (its t= elapsed,
    nothing held parsed behind it), in order, and reading resumes."""
    big = b"b" * (1 << 20)

    async def body(state, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"get q/t=300\r\n")
        (proto,) = await until_connections(state)
        await until(lambda: proto.session.blocked is not None, "the blocking get")
        writer.write(b"set r 0 0 2\r\nhi\r\nget r\r\n" + b"version\r\n" * 3000)
        writer.write(b"set big 0 0 %d\r\n%s\r\nversion\r\n" % (len(big), big))
        await until(lambda: not proto.transport.is_reading(), "reading to pause")
        assert not proto.session.pending  # waiting unparsed
        expected = END + STORED + one("r", b"hi") + VERSION_LINE * 3000 + STORED + VERSION_LINE
        assert await reader.readexactly(len(expected)) == expected
        await until(proto.transport.is_reading, "reading to resume")
        writer.close()

    serve(loop, layer, protocol_class, body)


def test_the_bytes_bound_behind_a_blocked_get_counts_what_many_keys_cost_as_objects(
    loop, layer, protocol_class
):
    """Gets of hundreds of short keys: each key is a bytes object in a tuple, several times
    its length in memory. The count of what waits behind a blocked get covers that (5,000
    such lines held 74 MB where their bytes counted 8 MiB). What waits parsed is now the
    rest of the turn that blocked, a get counting a request per key; the rest of the read
    waits as bytes (thirty clients so held 13 MB each)."""
    import sys

    from erq import parser
    from erq.session import REQUESTS_PER_PASS

    line = b"get " + b" ".join(b"k%05d" % i for i in range(340)) + b"\r\n"

    async def body(state, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"get q/t=60000\r\n" + line * 5000)  # the get and a pipeline, at once
        (proto,) = await until_connections(state)
        await until(lambda: proto.session.blocked is not None, "the blocking get")
        await until(lambda: not proto.transport.is_reading(), "the pipeline pause")
        await asyncio.sleep(0.05)
        held = [request for request in proto.session.pending if request[0] == parser.REQ_GET]
        real = sum(
            sys.getsizeof(request[1]) + sum(sys.getsizeof(key) for key in request[1])
            for request in held
        )
        assert held and real <= proto.session.pending_bytes  # the count covers the objects
        assert sum(len(request[1]) for request in held) < REQUESTS_PER_PASS + len(line) // 7
        writer.close()

    serve(loop, layer, protocol_class, body)


@pytest.mark.parametrize("leave", ["close", "reset"])
@pytest.mark.parametrize("pause", ["pipeline", "output"])
def test_a_client_that_leaves_while_reading_is_paused_is_heard_at_once(
    loop, layer, protocol_class, pause, leave
):
    """Reading is paused: a long pipeline waits behind a blocked get, or the client does not
    read its replies. The client then leaves, with a FIN or a reset. Every connection layer
    hears it at once, the loops' transports too (which stop watching a paused socket: erq
    watches it for them, erq/paused.py): the blocked get ends and the read the client held
    open goes back, so the next item is not handed to a client that is gone (it stays
    queued)."""
    item = b"x" * (256 << 10)

    async def body(state, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"set q 0 0 4\r\nheld\r\nget q/open\r\n")
        assert await reader.readexactly(len(STORED)) == STORED
        assert await reader.readexactly(len(one("q/open", b"held"))) == one("q/open", b"held")
        (proto,) = state.connections
        queue = state.queues.get_or_create("w")
        if pause == "pipeline":
            writer.write(b"get w/t=60000\r\n" + b"version\r\n" * 40_000)  # > MAX_UNPARSED
        else:  # 16 MiB of replies, more than the socket buffers take
            writer.write(b"set big 0 0 %d\r\n%s\r\n" % (len(item), item))
            writer.write(b"get big/peek\r\n" * 64)
        await until(lambda: not proto.transport.is_reading(), "reading to pause")
        assert queue.waiter_count == (1 if pause == "pipeline" else 0)
        if leave == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort() if leave == "reset" else writer.close()
        await within(2, lambda: not state.connections, "the server to hear the client leave")
        assert queue.waiter_count == 0
        assert state.queues.get_or_create("q").items == 1  # the open read went back
        _, producer = await asyncio.open_connection("127.0.0.1", port)
        producer.write(b"set w 0 0 4\r\nnext\r\n")
        await until(lambda: queue.items == 1, "the item to stay queued")
        producer.close()

    serve(loop, layer, protocol_class, body)


async def until_connections(state) -> set:
    await until(lambda: len(state.connections) == 1, "the connection")
    return state.connections


def test_a_blocking_get_and_a_long_pipeline_in_one_read_pause_reading_at_once(loop, protocol_class):
    """The limit on what waits behind a get holds within the read that blocks, not from the
    next read on: past MAX_UNPARSED of it, reading pauses at once."""
    proto = protocol_class(make_state(loop))
    transport = RecordingTransport()
    proto.connection_made(transport)
    proto.data_received(b"get q/t=60000\r\n" + b"version\r\n" * 40_000)  # 360 KB
    assert transport.calls == ["pause"]
    assert transport.writes == []  # everything waits behind the blocked get
    proto.connection_lost(None)


# ---- with a recording transport ----------------------------------------------------------------
class RecordingTransport:
    def __init__(self):
        self.calls: list[str] = []
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data):
        self.writes.append(data)

    def close(self):
        self.calls.append("close")
        self.closing = True

    def abort(self):
        self.calls.append("abort")
        self.closing = True

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.calls.append("write_eof")

    def is_closing(self):
        return self.closing

    def get_extra_info(self, name, default=None):
        return default  # no socket: the reply writer hands every reply to write()

    def pause_reading(self):
        self.calls.append("pause")

    def resume_reading(self):
        self.calls.append("resume")


class Clock:
    """A loop stand-in whose time() the test sets; call_later records its timers."""

    def __init__(self):
        self.now = 100.0
        self.timers: list[Timer] = []

    def time(self):
        return self.now

    def call_later(self, delay, callback):
        timer = Timer(delay, callback)
        self.timers.append(timer)
        return timer


class Timer:
    def __init__(self, delay, callback):
        self.delay = delay
        self.callback = callback
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


@pytest.fixture
def connect(protocol_class):
    clock = Clock()

    def make(**server):
        state = make_state(clock, **server)
        proto = protocol_class(state)
        transport = RecordingTransport()
        proto.connection_made(transport)
        return state, proto, transport

    make.clock = clock
    return make


def test_reading_resumes_only_when_both_the_pipeline_and_the_write_buffer_allow(connect):
    _, proto, transport = connect()
    proto.pause_writing()
    assert transport.calls == ["pause"]
    proto._pause_pipeline(True)  # the session's hook: its pipeline runs too far ahead
    proto.resume_writing()
    assert transport.calls == ["pause"]
    proto._pause_pipeline(False)
    assert transport.calls == ["pause", "resume"]
    proto._pause_pipeline(True)
    proto.pause_writing()
    proto._pause_pipeline(False)
    assert transport.calls == ["pause", "resume", "pause"]
    proto.resume_writing()
    assert transport.calls == ["pause", "resume", "pause", "resume"]


def test_flow_control_leaves_a_closing_transport_alone(connect):
    _, proto, transport = connect()
    proto.close_idle()
    proto.pause_writing()
    proto.resume_writing()
    assert transport.calls == ["close"]


def test_a_refused_connection_lingers_ignoring_its_data_until_its_loss(connect, protocol_class):
    module = impl_protocol_module(protocol_class)
    state, first, _ = connect(max_connections=1)
    second = type(first)(state)
    transport = RecordingTransport()
    second.connection_made(transport)
    assert transport.writes == [REFUSAL]
    assert transport.calls == ["write_eof"]  # the refusal, then the end of the stream
    (timer,) = connect.clock.timers
    assert timer.delay == module.LINGER_SECONDS
    assert timer.callback == transport.abort  # the linger's bound
    assert module.lingering_refusals() == 1
    assert second.session is None
    second.data_received(b"set q 0 0 1\r\nx\r\n")
    assert second.eof_received() is False  # the client's end: the transport closes
    second.connection_lost(None)
    assert timer.cancelled
    assert module.lingering_refusals() == 0
    second.connection_lost(None)
    assert module.lingering_refusals() == 0
    assert transport.writes == [REFUSAL]
    assert (state.counters.curr_connections, state.counters.total_connections) == (1, 2)
    assert state.counters.bytes_read == 0
    assert state.connections == {first}


def test_connection_lost_counts_the_connection_out_once(connect):
    state, proto, transport = connect()
    proto.data_received(b"version\r\n")
    proto.connection_lost(None)
    proto.connection_lost(None)
    proto.data_received(b"version\r\n")  # a read after the loss is dropped
    assert transport.writes == [VERSION_LINE]
    assert state.counters.curr_connections == 0
    assert state.connections == set()
    assert proto.session is None


def test_bytes_read_counts_every_byte_received(connect):
    state, proto, transport = connect()
    reads = (b"set q 0 0 5\r\nhel", b"lo\r\n", b"bogus\r\n")
    for data in reads:
        proto.data_received(data)
    assert state.counters.bytes_read == sum(map(len, reads))
    assert transport.writes == [STORED, b"ERROR\r\n"]


def test_last_active_is_never_earlier_than_the_last_read(connect):
    """Idle close (client_timeout) measures from last_active: the idle time it sees must never
    exceed the real one, however the reads and the sweep's looks interleave."""
    _, proto, _ = connect()
    clock = connect.clock
    assert proto.last_active == 100.0  # connected, nothing read yet
    clock.now = 101.0
    proto.data_received(b"version\r\n")
    clock.now = 101.5
    assert 101.0 <= proto.last_active <= 101.5
    clock.now = 105.0
    assert proto.last_active <= 101.5  # no read since: the idle time grows
    last_read = None
    for t in (106.0, 106.25, 107.0):
        clock.now = t
        proto.data_received(b"version\r\n")
        last_read = t
    clock.now = 108.0
    seen = proto.last_active
    assert last_read <= seen <= 108.0
    clock.now = 130.0
    assert proto.last_active == seen


# ---- through a server process ------------------------------------------------------------------
def test_an_idle_connection_is_closed_after_client_timeout_but_a_blocked_one_is_not(
    erq_factory,
):
    server = start(erq_factory, server='client_timeout = "200ms"\nexpiry_sweep = "50ms"')
    blocked = server.client(timeout=20)
    blocked.send(b"get q/t=60000\r\n")
    wait_for_stat(server.client(), "queue_q_waiters", 1)
    idle = server.client(timeout=20)
    assert_open(idle)
    # The blocked client's last read came before the idle one's: were it not exempt from the
    # idle close, it would be closed first.
    assert idle.is_closed(timeout=20)
    assert server.client().set("q", b"late") == STORED
    assert blocked.until() == one("q/t=60000", b"late")


def slow_reader(port: int) -> socket.socket:
    """A client socket with a small receive buffer (set before it connects, so the window it
    offers is small from the start): a server's replies back up quickly behind it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    got = b""
    try:
        while chunk := sock.recv(1 << 20):
            got += chunk
    except ConnectionResetError:
        pass
    return got


@pytest.mark.parametrize("shape", ["pipelined", "one multi-key get"])
def test_an_idle_close_runs_no_more_requests_so_no_item_is_lost(erq_factory, shape):
    """A client pipelines gets of big items and does not read for a while: its replies back
    up, the rest of its requests wait, and client_timeout closes the connection. The close
    must not run what was waiting: each get would take an item whose reply the closing
    connection then drops (lost although the client reads everything it is sent). Every
    item is either received whole or still in the queue."""
    server = start(erq_factory, server='client_timeout = "1s"\nexpiry_sweep = "50ms"')
    item = b"i" * (1 << 20)
    count = 20
    c = server.client()
    for _ in range(count):
        assert c.set("q", item) == STORED
    c.close()
    sock = slow_reader(server.port)
    if shape == "pipelined":
        sock.sendall(b"get q\r\n" * count)
    else:
        sock.sendall(b"get " + b" ".join([b"q"] * count) + b"\r\n")
    time.sleep(1.5)  # closed for idleness after 1 s to 1.05 s; dropped at 2 s (stalled)
    got = read_to_end(sock)
    sock.close()
    received = got.count(b"VALUE q 0 %d\r\n%s\r\n" % (len(item), item))
    left = int(wait_for_stat(server.client(), "curr_connections", 1)["queue_q_items"])
    assert 0 < received < count
    assert received + left == count


def test_an_idle_client_that_never_takes_its_replies_is_dropped(erq_factory):
    """The idle close sends what was answered before it closes; a client that does not read
    would hold its connection (and those replies) forever. Idle twice client_timeout, it is
    dropped, whether its replies wait between requests or between the keys of one get; a
    get waiting for an item is still left alone."""
    server = start(erq_factory, server='client_timeout = "300ms"\nexpiry_sweep = "50ms"')
    item = b"i" * (1 << 20)
    c = server.client()
    for _ in range(10):
        assert c.set("big", item) == STORED
    blocked = server.client(timeout=20)
    blocked.send(b"get w/t=60000\r\n")
    stalled = [slow_reader(server.port) for _ in range(2)]
    stalled[0].sendall(b"get big/peek\r\n" * 10)
    stalled[1].sendall(b"get " + b" ".join([b"big/peek"] * 10) + b"\r\n")
    wait_for_stat(server.client(), "curr_connections", 2, timeout=20)  # blocked and the asker
    for sock in stalled:
        sock.close()
    assert server.client().set("w", b"late") == STORED
    assert blocked.until() == one("w/t=60000", b"late")


def test_replies_held_for_a_sync_past_the_budget_hold_the_pipeline_until_they_go_out(erq_factory):
    """fsync = "always": the STORED of a write waits for its sync, and the replies behind it
    with it. Once they pass OUT_BUDGET the requests after them wait too, and they run as soon
    as the sync lets the replies out: every reply comes, in order."""
    item = b"y" * (512 << 10)
    peeks = 8  # 4 MiB of replies behind the held STORED
    server = start(erq_factory, queues='[queues.synced]\nfsync = "always"\n')
    c = server.client(timeout=10.0)
    c.send(b"set big 0 0 %d\r\n%s\r\n" % (len(item), item))
    assert c.line() == STORED
    c.send(b"set synced 0 0 1\r\na\r\n" + b"get big/peek\r\n" * peeks + b"version\r\n")
    assert c.line() == STORED
    block = one("big/peek", item)
    for _ in range(peeks):
        assert c.read_exact(len(block)) == block
    assert c.read_exact(len(VERSION_LINE)) == VERSION_LINE
    c.close()


@pytest.mark.parametrize("leave", ["close", "reset"])
def test_a_client_that_leaves_while_reading_is_paused_gives_its_open_read_back_at_once(
    server, leave
):
    """Each build as it serves (the compiled one on erq's epoll layer, the pure one on the
    loop's transports): a client holding an open read blocks in a get, floods requests behind
    it until the server stops reading, and leaves. Its read goes back at once: a reader
    waiting on the queue gets it well within its 5 s, not after the blocked get's minute."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"set q 0 0 4\r\nheld\r\nget q/open\r\n")
    expected = STORED + one("q/open", b"held")
    got = b""
    while len(got) < len(expected):
        got += sock.recv(len(expected) - len(got))
    assert got == expected
    # The server stops reading 4,096 requests behind the blocked get, with the end of the
    # stream unread. (The flood fits the socket buffers: a FIN behind bytes the server does
    # not take is never sent, and no server can hear it.)
    sock.sendall(b"get w/t=60000\r\n" + b"version\r\n" * 10000)
    wait_for_stat(server.client(), "queue_w_waiters", 1)
    if leave == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    reader = server.client(timeout=10)
    started = time.monotonic()
    reader.send(b"get q/t=5000\r\n")
    assert reader.until() == one("q/t=5000", b"held")
    assert time.monotonic() - started < 2
    assert reader.set("w", b"next") == STORED  # no blocked get of the gone client takes it
    assert reader.get("w") == one("w", b"next")


JUST_LEFT_SCRIPT = r"""
import asyncio, json, socket, struct, sys, time
from erq.config import load_config
from erq.server import Server

async def main(data_dir):
    server = Server(load_config(None, cli={"port": 0, "admin_port": 0, "data_dir": data_dir}))
    await server.start()
    queues = server.state.queues
    kept = []
    for i in range(5):
        name = "q%d" % i
        w = socket.create_connection(("127.0.0.1", server.port))
        w.sendall(b"get %s/t=5000\r\n" % name.encode())
        while queues.get(name) is None or queues.get(name).waiter_count != 1:
            await asyncio.sleep(0.001)
        w.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.close()
        time.sleep(0.05)  # the reset reaches the server's socket; the loop serves nothing
        queues.add(name, b"kept", 0, 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"get %s\r\n" % name.encode())
        await writer.drain()
        kept.append((await reader.readline()).decode())
        writer.close()
    server.request_shutdown("test")
    await server.shutdown()
    print(json.dumps({"kept": kept}))

asyncio.run(main(sys.argv[1]))
"""


def test_a_server_keeps_the_item_that_came_for_a_get_whose_client_had_just_reset(impl, tmp_path):
    """The same through a whole server on each build: the reset is in the kernel when the
    item comes; the next reader gets it, five times out of five."""
    result = run_script(impl, JUST_LEFT_SCRIPT, str(tmp_path / "data"))
    assert result["kept"] == [f"VALUE q{i} 0 4\r\n" for i in range(5)], result


STOPPED_SERVERS_SCRIPT = r"""
import asyncio, json, os, sys
from erq.config import load_config
from erq.server import Server

def descriptors():
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink("/proc/self/fd/" + fd))
        except OSError:  # the listing's own descriptor, closed already
            pass
    return sorted(found)

async def main(data_dir):
    seen = []
    for run in range(3):
        server = Server(load_config(None, cli={
            "port": 0, "admin_port": 0, "data_dir": os.path.join(data_dir, str(run))}))
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"set q 0 0 1\r\na\r\nget q/t=5000\r\nget q/t=5000\r\n")
        await writer.drain()
        await reader.readline()  # STORED; then the item, and a get that waits
        server.request_shutdown("test")
        await server.shutdown()
        writer.close()
        await asyncio.sleep(0.05)
        seen.append(descriptors())
    print(json.dumps({"seen": seen}))

try:
    import uvloop
    uvloop.install()
except ImportError:
    pass
asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_a_server_stopped_in_process_leaves_no_descriptor_behind(impl, tmp_path):
    """An embedder may stop a server and keep its loop: the second and third servers leave
    what the first left. erq's epoll set stayed open, held by the loop's reader, until the
    loop closed: one descriptor per stopped server."""
    seen = run_script(impl, STOPPED_SERVERS_SCRIPT, str(tmp_path))["seen"]
    assert seen[1] == seen[0] and seen[2] == seen[0], seen
