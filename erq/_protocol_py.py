# cython: annotation_typing=False
"""The asyncio protocol: bytes in -> parser -> commands -> one write per read (a connection
erq's epoll layer found alone ready: one every commands.SEND_EVERY requests).

This is the only layer that touches a socket. It knows nothing of queues or disks.

One source compiled twice (like ``_queue_py.py``): setup.py compiles it through the link
``erq/_fast/_protocol.py`` with the C types of ``erq/_fast/_protocol.pxd``; selector
``erq.protocol``. Imports are absolute so that both builds find the same modules.

The class does not subclass ``asyncio.Protocol``: a compiled (extension) class cannot, and
neither asyncio nor uvloop needs it to (they call the methods by name; only a
``BufferedProtocol`` is told apart, by ``isinstance``). So it defines every method of the
protocol interface itself, ``eof_received`` included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from erq import commands as _commands
from erq import wire as _wire
from erq.commands import dispatch
from erq.keepalive import enable as enable_keepalive
from erq.open_files import descriptor_of, leaves_room
from erq.parser import Parser
from erq.paused_sockets import watch_paused
from erq.session import REQUESTS_PER_PASS, Session
from erq.throttle import Throttle
from erq.wire import SocketWriter, peer_gone

if TYPE_CHECKING:
    import asyncio

    from erq.state import ServerState

log = logging.getLogger("erq.protocol")
_REFUSED = Throttle(log, logging.WARNING)  # a client retrying in a loop is one line per 10 s

REFUSAL = b"SERVER_ERROR too many open connections\r\n"
# A client refused past max_connections has usually sent its first request already. A close
# with input unread makes the kernel reset the connection, and the client may then get
# ECONNRESET (in its send, or its read) instead of the refusal. So the refusal is a lingering
# close: the server shuts its side after the line, reads and drops whatever comes until the
# client's end of stream, then closes; after LINGER_SECONDS it closes anyway (abort). At most
# MAX_LINGERING refused connections linger at once in the process (there is one server a
# process); past that, one is closed at once, so that refused clients cannot hold many
# descriptors (the open-file limit keeps RESERVE for the server's own, erq/open_files.py).
LINGER_SECONDS = 1.0
MAX_LINGERING = 64
_lingering = 0
# A read larger than this is parsed REQUESTS_PER_PASS requests at a time (Session), the next
# ones a pass of the loop later and only once those before have run: parsing a whole read of
# 256 KiB of small requests (~37,000) took ~20 ms compiled and ~70 ms pure Python, for which
# every other client waited, and each of a few such clients as long (memcached reads 16 KiB
# at a time and runs 20 requests an event). Reading stops while a read's rest waits its turn.
PARSED_WHOLE = 16 * 1024
_parsed_whole = PARSED_WHOLE  # a C integer when compiled (_protocol.pxd): read on every read
_requests_per_pass = REQUESTS_PER_PASS  # likewise
# Input kept as it came behind a get that waits for an item, at most (then reading stops):
# a read's worth. Reading on that far lets the FIN of a client that left a pipeline of up to
# about that much (and the socket buffers') reach the server, which then hands the get's
# item to no one gone; kept parsed, such pipelines cost 13 MB a client, and 1 MiB of them
# took a graceful stop of 60 such clients (pure Python) 14 s to run.
MAX_UNPARSED = 256 * 1024
# Bits of _reading_paused: the client's pipeline runs too far ahead (Session.hold_back), its
# replies fill the write buffer, a read's rest is not parsed yet, the server stops.
_PIPELINE, _WRITE_BUFFER, _UNPARSED, _STOPPING = 1, 2, 4, 8


def lingering_refusals() -> int:
    """The refused connections lingering now."""
    return _lingering


def _gone_check(transport: Any) -> Callable[[], bool]:
    """What a session asks before its blocked get is handed an item: is the client gone (the
    transport closing, or a reset or end of stream the loop has not served yet)?"""
    if getattr(transport, "writes_directly", False):
        return transport.peer_gone  # erq's epoll layer asks the kernel itself
    sock = transport.get_extra_info("socket")
    if sock is None:
        return transport.is_closing
    fd = sock.fileno()
    return lambda: transport.is_closing() or peer_gone(fd)


def _peer(transport: asyncio.BaseTransport) -> str:
    try:
        peer = transport.get_extra_info("peername")
    except Exception:  # a transport that cannot say
        return "an unknown address"
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "an unknown address"


class MemcacheProtocol:
    """One client connection speaking the memcache text protocol."""

    __slots__ = (
        "state",
        "transport",
        "parser",
        "session",
        "_counters",
        "_active",
        "_last_active",
        "_reading_paused",
        "_linger",
        "_paused_watch",
        "_rest",
        "_rest_at",
    )

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        server = state.config.server
        self.parser = Parser(server.max_line, server.max_item_size, state.data_budget)
        self._counters = state.counters  # bytes_read is counted on every read
        # A read only sets _active; last_active turns it into a time when the sweep asks.
        self._active = False
        self._last_active = state.loop.time()
        self._reading_paused = 0  # _PIPELINE | _WRITE_BUFFER | _UNPARSED | _STOPPING
        self._linger = None  # a refused connection's deadline (a timer handle) while it lingers
        self._paused_watch = None  # on a loop's transport, the watch of its socket while paused
        self._rest: bytes | None = None  # a read not parsed yet from _rest_at on (PARSED_WHOLE)
        self._rest_at = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        state = self.state
        counters = state.counters
        counters.total_connections += 1
        limit = state.config.server.max_connections
        if counters.curr_connections >= limit:
            counters.rejected_connections += 1
            _REFUSED.log(
                "max_connections (%d) reached; refusing a client from %s",
                limit,
                _peer(transport),
            )
            self._refuse(transport)
            return
        files = state.open_file_limit
        descriptor = descriptor_of(transport)
        if files is not None and not leaves_room(files, descriptor, counters.curr_connections):
            counters.rejected_connections += 1
            _REFUSED.log(
                "at least %d of the %d open files allowed (ulimit -n) are in use, and the rest "
                "are kept for the queues' journals; refusing a client from %s",
                descriptor + 1,  # it took the lowest number free: every one below is in use
                files,
                _peer(transport),
            )
            self._refuse(transport)
            return
        counters.curr_connections += 1
        # erq's own connection layer writes with the system call itself; a loop's transport
        # gets a writer that does so while the transport has nothing queued.
        if getattr(transport, "writes_directly", False):
            write = transport.write  # type: ignore[attr-defined]
        else:
            write = SocketWriter(transport).write
        self.session = Session(
            state,
            dispatch,
            write,
            self._close_transport,
            self._pause_pipeline,
        )
        self.session.gone = _gone_check(transport)
        state.connections.add(self)
        keepalive = state.config.server.tcp_keepalive
        if keepalive is not None:
            enable_keepalive(transport, keepalive)

    def _close_transport(self) -> None:
        """The session is done. While the server stops, the close of a client that is not
        taking its replies as fast as it sends lingers: its requests would be unread at the
        close, and the kernel would then reset the connection and destroy the replies still
        on their way to it (the items of its gets with them). So the server ends its side
        after them and reads, dropping it, what the client sends until it closes
        (eof_received); the server's stop aborts it after a bound. An idle client's
        connection closes at once."""
        transport = self.transport
        if (
            not self.state.stopping
            or not (self._reading_paused or transport.get_write_buffer_size())
            or not transport.can_write_eof()
        ):
            transport.close()
            return
        transport.write_eof()
        self._reading_paused = 0
        self._unwatch_paused()
        transport.resume_reading()

    def _refuse(self, transport) -> None:
        global _lingering
        transport.write(REFUSAL)
        if _lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # data_received drops what comes; eof_received closes
        _lingering += 1
        self._linger = self.state.loop.call_later(LINGER_SECONDS, transport.abort)

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        self._counters.bytes_read += len(data)
        self._active = True
        if len(data) > _parsed_whole or self._rest is not None or session.blocked is not None:
            self._parse_in_turn(data)
            return
        requests = self.parser.feed(data)
        if requests:
            _commands.feed(session, requests)  # a C call when compiled (cimported as _commands)
            # Emptied, its slots kept: the parser hands the same list to the next read.
            _wire.clear_replies(requests)

    def _parse_in_turn(self, data: bytes) -> None:
        rest = self._rest
        if rest is not None:  # (reading is paused meanwhile: only a lingering close reads on)
            data = rest[self._rest_at :] + data
            self._rest = None
        self._parse_turns(data, 0)

    def _parse_turns(self, data: bytes, at: int) -> None:
        """Parse and run ``data`` from ``at``, REQUESTS_PER_PASS requests at a time: the
        first of them, and the next while the connection's requests keep up, up to that many
        in all. Then, or once some wait (their turn, a blocked get, replies not taken), the
        rest is input to parse on the loop's next pass (so that a connection that waits still
        makes progress, and cannot spin the loop), and reading stops meanwhile. A request
        is never cut: a set's data that came in one read is parsed in one piece."""
        session = self.session
        parser = self.parser
        end = len(data)
        turn = _requests_per_pass
        first = True
        while at < end:
            if session is None or session.closing:
                break  # a closing connection runs nothing more
            if session.waits_for_an_item():
                # Nothing of it can run before an item comes, for as long as the client
                # likes: it waits as it came, not parsed (a get of many short keys, as
                # objects, is ~19 times its bytes), and past MAX_UNPARSED no more is read.
                # (Reading on until then lets a client's FIN through a pipeline it left.)
                if len(data) > _parsed_whole:  # a read of its own, or rest and read joined
                    self._rest = data
                    self._rest_at = at
                else:  # a small read is lent (erq's epoll layer): what is kept is a copy
                    self._rest = bytes(memoryview(data)[at:])
                    self._rest_at = 0
                session.hold_input(end - at > MAX_UNPARSED)
                return
            if not first and (turn <= 0 or session.pending or session.blocked is not None):
                self._rest = data
                self._rest_at = at
                self._set_paused(_UNPARSED, True)
                if not self._reading_paused & _PIPELINE:
                    self.state.loop.call_soon(self._parse_rest)
                return
            first = False
            requests = parser.feed(data, at, turn)
            at = parser.stopped_at
            if requests:
                turn -= len(requests) + parser.extra_keys  # a get's keys count one each
                _commands.feed(session, requests)
            session = self.session
        self._rest = None
        if self._reading_paused & _UNPARSED:
            self._set_paused(_UNPARSED, False)

    def _parse_rest(self) -> None:
        """A pass of the loop later: the next turn of a read whose requests had to wait.
        Not while the pipeline runs too far ahead: _pause_pipeline calls again once it has
        caught up."""
        data = self._rest
        if data is None or self._reading_paused & _PIPELINE:
            return
        self._rest = None
        self._active = True  # its input is still being taken: not idle (client_timeout)
        self._parse_turns(data, self._rest_at)

    def eof_received(self) -> bool:
        """The client shut its side (``shutdown(SHUT_WR)``, ``nc -N``): it sends no more
        requests but reads on (see ``Session.end_of_input``). True keeps the connection half
        open while replies are still due."""
        session = self.session
        if session is None:
            return False
        session.end_of_input()
        return not session.closed

    def connection_lost(self, exc: Exception | None) -> None:
        global _lingering
        session = self.session
        if session is None:
            if self._linger is not None:  # a refused connection's linger ended
                self._linger.cancel()
                self._linger = None
                _lingering -= 1
            return
        self.session = None
        self._rest = None
        self.parser.discard()  # a set it was reading gives its room back
        self.state.counters.curr_connections -= 1
        self.state.connections.discard(self)
        self._unwatch_paused()
        session.connection_lost()

    # Idle close (client_timeout): the server's sweep closes a connection whose last_active is
    # client_timeout old. Reading the loop's clock on every read costs a Python call and a
    # float, a sizeable part of a one-request read, so a read only marks the connection
    # active, and the time is taken here, when the sweep (at least once a second) asks.
    # last_active is therefore never earlier than the last read: a connection is never closed
    # before it has been idle for client_timeout, and at most one sweep period later than if
    # every read took the time. (The sweep does not ask while a get blocks the connection: a
    # read made just before the block counts from the first sweep after it ends.)
    @property
    def last_active(self) -> float:
        """The loop time of the last read, as first seen by a caller (the idle sweep)."""
        if self._active:
            self._active = False
            self._last_active = self.state.loop.time()
        return self._last_active

    # Flow control: stop reading from a client that does not read its replies, or whose
    # pipeline runs far ahead of a blocked request, so memory stays bounded. A loop's
    # transport stops watching a paused socket, and would not notice the client leave:
    # erq/paused_sockets.py watches it meanwhile (erq's epoll layer does so itself).
    def _set_paused(self, bit: int, on: bool) -> None:
        before = self._reading_paused
        self._reading_paused = before | bit if on else before & ~bit
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if before and not self._reading_paused:
            transport.resume_reading()
            self._unwatch_paused()
        elif not before and self._reading_paused:
            transport.pause_reading()
            if not getattr(transport, "writes_directly", False):
                self._paused_watch = watch_paused(self.state.loop, self, transport)

    def _unwatch_paused(self) -> None:
        watch = self._paused_watch
        if watch is not None:
            self._paused_watch = None
            watch.cancel()

    def _pause_pipeline(self, on: bool) -> None:
        self._set_paused(_PIPELINE, on)
        if not on and self._rest is not None:
            self.state.loop.call_soon(self._parse_rest)

    def pause_writing(self) -> None:
        self._set_paused(_WRITE_BUFFER, True)
        if self.session is not None:
            self.session.writing_paused(True)  # the requests already read wait too

    def resume_writing(self) -> None:
        self._set_paused(_WRITE_BUFFER, False)
        if self.session is not None:
            self.session.writing_paused(False)

    def stop_reading(self, on: bool = True) -> None:
        """The server stops: no more input is read while what was read runs (input_to_run).
        Lifted again just before the connection closes, so that the close tells a client
        with input unread (paused otherwise) from an idle one (_close_transport)."""
        self._set_paused(_STOPPING, on)

    def input_to_run(self) -> bool:
        """Requests read but not run yet (a pipeline's next turns, a read's unparsed rest)
        that will run on the loop's next passes: not behind a blocked request or replies
        the client has not taken."""
        session = self.session
        if session is None or session.closing or session.blocked is not None:
            return False
        if not (session.pending or self._rest is not None):
            return False
        return not session.write_paused and not (session.out_room < 0 and session.output_full())

    def client_left_while_paused(self) -> None:
        """erq's connection layer, or the watch of a loop's paused transport, heard the
        client shut its side while reading was paused. A get waiting for an item then ends
        unanswered, with what was pipelined behind it, as at an end of stream
        (``end_of_input``): an item must not go to a client that is gone. Anything else is
        left for the end of stream, read in its turn."""
        session = self.session
        if session is not None and session.waits_for_an_item():
            session.end_of_input()

    def close_idle(self, stalled: bool = False) -> None:
        """client_timeout: nothing was read from the client for that long. The connection
        runs no more requests: those held back behind replies the client has not taken are
        dropped unrun (a get among them would take an item that the close then loses), its
        open reads go back, and what was already answered is sent before the close.
        ``stalled``: idle twice that long, and those replies are still not taken (a close
        waits for them): the connection is dropped at once."""
        session = self.session
        transport = self.transport
        if session is None or transport is None:
            return
        if not session.closing:
            session.close_after(None)
            session.flush()
        elif stalled:
            transport.abort()


__all__ = ["MemcacheProtocol"]
