"""One transport.write per data_received, however many requests were pipelined in it; on a
connection erq's epoll layer found alone ready, one every SEND_EVERY requests."""

import asyncio
import importlib

import pytest

import erq
from erq.config import Config
from erq.queues import QueueCollection
from erq.state import ServerState

from conftest import impl_module


class RecordingTransport:
    def __init__(self):
        self.writes = []
        self.closed = False

    def write(self, data):
        self.writes.append(data)

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def get_extra_info(self, name, default=None):
        return default  # no socket: the reply writer hands every reply to write()

    reading = True

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True


@pytest.fixture
def protocol_factory(impl, monkeypatch):
    """MemcacheProtocol and parser of the parametrised implementation."""
    protocol = impl_module(impl, "_protocol", "_protocol_py")
    parser = impl_module(impl, "_parser", "_parser_py")
    monkeypatch.setattr(protocol, "Parser", parser.Parser)
    loop = asyncio.new_event_loop()
    state = ServerState(Config(), QueueCollection(Config(), None), loop)
    state.data_budget = parser.DataBudget(Config().server.max_pending_data)  # the parser's own
    yield lambda: protocol.MemcacheProtocol(state)
    loop.close()


def test_pipelined_batch_is_answered_with_one_write(protocol_factory):
    proto = protocol_factory()
    transport = RecordingTransport()
    proto.connection_made(transport)
    batch = b"".join(b"set q%d 0 0 5\r\nhello\r\n" % (i % 3) for i in range(100))
    batch += b"".join(b"get q%d\r\n" % (i % 3) for i in range(100)) + b"version\r\nbogus\r\n"
    proto.data_received(batch)
    assert len(transport.writes) == 1
    reply = transport.writes[0]
    assert reply.count(b"STORED\r\n") == 100
    assert reply.count(b"VALUE ") == 100
    assert reply.endswith(b"VERSION %s\r\nERROR\r\n" % erq.__version__.encode())


def test_request_split_across_reads_writes_once_it_completes(protocol_factory):
    proto = protocol_factory()
    transport = RecordingTransport()
    proto.connection_made(transport)
    proto.data_received(b"set q 0 0 5\r\nhel")
    assert transport.writes == []
    proto.data_received(b"lo\r\nget q\r\nget q\r\n")
    assert transport.writes == [b"STORED\r\nVALUE q 0 5\r\nhello\r\nEND\r\nEND\r\n"]


def test_a_pipeline_making_queue_after_queue_gives_the_loop_back_every_few(protocol_factory):
    """Requests that work on the file system on the loop (a queue made or deleted, the status
    saved) are run SLOW_OPS_PER_PASS at a time: the rest of the read waits a pass of the loop,
    so that the other connections are served meanwhile, and answers in order."""
    proto = protocol_factory()
    transport = RecordingTransport()
    proto.connection_made(transport)
    per_pass = impl_module_session(proto).SLOW_OPS_PER_PASS
    n = 3 * per_pass + 5
    proto.data_received(b"".join(b"get new%d\r\n" % i for i in range(n)) + b"version\r\n")
    assert transport.writes == [b"END\r\n" * per_pass]
    other = protocol_factory()
    other_transport = RecordingTransport()
    other.connection_made(other_transport)
    other.data_received(b"get new0\r\n")  # not held up by the pipeline above
    assert other_transport.writes == [b"END\r\n"]
    loop = proto.state.loop
    for _ in range(10):
        loop.run_until_complete(asyncio.sleep(0))
    assert transport.writes[1:] == [
        b"END\r\n" * per_pass,
        b"END\r\n" * per_pass,
        b"END\r\n" * 5 + b"VERSION %s\r\n" % erq.__version__.encode(),
    ]
    assert proto.state.queues.queue_creates == n


def impl_module_session(proto):
    """The session module the protocol under test runs (compiled or the twin)."""
    return importlib.import_module(type(proto.session).__module__)


def run_passes(loop, n=1):
    """Run ``n`` passes of the loop: the callbacks due, once each."""
    for _ in range(n):
        loop.call_soon(loop.stop)
        loop.run_forever()


def test_a_large_read_is_parsed_a_turn_at_a_time_as_its_requests_run(protocol_factory):
    """A read of 256 KiB of small requests (~37,000) was parsed whole before any ran, ~20 ms
    compiled and ~70 ms pure Python for which every other client waited. A read over
    PARSED_WHOLE is parsed REQUESTS_PER_PASS requests at a time, the next ones a pass later,
    reading paused meanwhile; the replies are the same, in order."""
    proto = protocol_factory()
    transport = RecordingTransport()
    proto.connection_made(transport)
    per_pass = impl_module_session(proto).REQUESTS_PER_PASS
    request = b"get e\r\n"
    n = 256 * 1024 // len(request)
    proto.data_received(request * n)
    assert b"".join(transport.writes) == b"END\r\n" * per_pass
    assert not proto.session.pending  # the rest is not parsed yet
    assert not transport.reading
    other = protocol_factory()
    other_transport = RecordingTransport()
    other.connection_made(other_transport)
    other.data_received(b"version\r\n")  # not held up by the read above
    assert other_transport.writes == [b"VERSION %s\r\n" % erq.__version__.encode()]
    loop = proto.state.loop
    run_passes(loop)
    assert b"".join(transport.writes) == b"END\r\n" * 2 * per_pass  # a turn a pass
    for _ in range(2 * n // per_pass):
        run_passes(loop)
        if transport.reading and not proto.session.pending:
            break
    assert b"".join(transport.writes) == b"END\r\n" * n
    assert transport.reading


def test_a_large_read_behind_a_blocked_get_waits_unparsed_without_spinning(protocol_factory):
    """Behind a get that waits for an item, a large read was parsed a slice a pass into the
    held pipeline until that was MAX_PENDING long: a client's gets of many short keys so
    held cost ~13 MB a connection. Now only the turn that blocked is parsed (the requests
    behind the get in it held), the rest waits as it came, reading paused (it is more than
    MAX_UNPARSED), and nothing runs until the get is answered; then the rest runs, in
    order."""
    proto = protocol_factory()
    transport = RecordingTransport()
    proto.connection_made(transport)
    session_module = impl_module_session(proto)
    n = 60_000  # 420 KB: past what waits unparsed with reading on (MAX_UNPARSED)
    proto.data_received(b"get w/t=60000\r\n" + b"get e\r\n" * n + b"version\r\n")
    loop = proto.state.loop
    run_passes(loop, 200)
    held = len(proto.session.pending)
    assert 0 < held < session_module.REQUESTS_PER_PASS
    assert not transport.reading and transport.writes == []
    run_passes(loop, 20)  # nothing to do: no slice is parsed, nothing is scheduled
    assert len(proto.session.pending) == held
    assert not loop._ready  # (asyncio's queue of callbacks due: no pass to come spins)
    setter = protocol_factory()
    setter.connection_made(RecordingTransport())
    setter.data_received(b"set w 0 0 2\r\nhi\r\n")
    version = b"VERSION %s\r\n" % erq.__version__.encode()
    for _ in range(1000):
        run_passes(loop)
        if b"".join(transport.writes).endswith(version):
            break
    assert transport.reading and not proto.session.pending
    reply = b"VALUE w/t=60000 0 2\r\nhi\r\nEND\r\n" + b"END\r\n" * n + version
    assert b"".join(transport.writes) == reply


def test_a_repeated_key_takes_the_spec_found_last_and_a_long_key_is_not_kept(protocol_factory):
    """A one-key get whose key is the session's last (the compiled parser hands a repeated
    key on as the same object) takes the spec found for it; any other key, or the same queue
    with other options, takes its own. A key longer than the parser hands on as the same
    object could never be found so: the session does not hold it."""
    from erq.parser import REUSED_TOKEN_MAX

    proto = protocol_factory()
    transport = RecordingTransport()
    proto.connection_made(transport)
    long_key = b"q/" + b"x" * REUSED_TOKEN_MAX  # an unknown option: a plain get of q
    for request in (
        b"set q 0 0 1\r\na\r\nset q 0 0 1\r\nb\r\nset q 0 0 1\r\nc\r\n",
        b"get q/peek\r\n",
        b"get q/peek\r\n",
        b"get q\r\n",
        b"get q/peek\r\n",
        b"get q\r\nget q\r\n",
        b"get " + long_key + b"\r\n",
        b"get q\r\n",
    ):
        proto.data_received(request)
    assert transport.writes == [
        b"STORED\r\n" * 3,
        b"VALUE q/peek 0 1\r\na\r\nEND\r\n",
        b"VALUE q/peek 0 1\r\na\r\nEND\r\n",
        b"VALUE q 0 1\r\na\r\nEND\r\n",
        b"VALUE q/peek 0 1\r\nb\r\nEND\r\n",
        b"VALUE q 0 1\r\nb\r\nEND\r\nVALUE q 0 1\r\nc\r\nEND\r\n",
        b"END\r\n",
        b"END\r\n",
    ]
    session = proto.session
    assert session.last_key == b"q" and [spec.name for spec in session.last_specs] == ["q"]
    proto.data_received(b"get " + long_key + b"\r\n")
    assert session.last_key == b"q"  # the long key's spec is not held


def test_a_lone_connections_long_pipeline_is_answered_every_send_every_requests(impl):
    """On a connection erq's epoll layer found alone ready (``ReplyWriter.lone``) a read's
    replies go out every SEND_EVERY requests, so that its client writes its next requests
    while the rest run: the same bytes, in order, in pieces. Not lone, one write, as before.
    (Each build's own session and commands: the compiled protocol would pick the compiled.)"""
    from erq import wire

    commands = impl_module(impl, "_commands", "_commands_py")
    session_module = impl_module(impl, "_session", "_session_py")
    parser_module = impl_module(impl, "_parser", "_parser_py")
    every = commands.SEND_EVERY

    class DirectWriter(wire.ReplyWriter):
        """erq's epoll connection as a session sees it: one of erq's own writers."""

        def __init__(self, lone: bool) -> None:
            self.lone = lone
            self.writes: list[bytes] = []

        def write(self, data) -> None:
            self.writes.append(bytes(data))

    n = 2 * every + 5
    batch = b"".join(b"set q%d 0 0 5\r\nhel%02d\r\n" % (i % 2, i) for i in range(n))
    batch += b"".join(b"get q%d\r\n" % (i % 2) for i in range(n))
    loop = asyncio.new_event_loop()
    state = ServerState(Config(), QueueCollection(Config(), None), loop)
    budget = parser_module.DataBudget(Config().server.max_pending_data)
    replies = {}
    try:
        for lone in (False, True):
            writer = DirectWriter(lone)
            session = session_module.Session(state, commands.dispatch, writer.write, lambda: None)
            commands.feed(session, parser_module.Parser(budget=budget).feed(batch))
            replies[lone] = writer.writes
    finally:
        state.queues.close()
        loop.close()
    assert len(replies[False]) == 1
    whole = replies[False][0]
    assert whole.startswith(b"STORED\r\n" * n + b"VALUE q0 0 5\r\nhel00\r\nEND\r\n")
    assert b"".join(replies[True]) == whole
    # every SEND_EVERY requests, then the rest: the sets' replies, then the gets'
    pieces = replies[True]
    assert [p.count(b"STORED\r\n") + p.count(b"END\r\n") for p in pieces] == [every] * (
        2 * n // every
    ) + [2 * n % every]
