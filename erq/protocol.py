"""The asyncio protocol: bytes in -> parser -> session -> one transport.write per read.

This is the only layer that touches a socket. It knows nothing of queues or disks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .commands import dispatch
from .parser import Parser
from .session import Session

if TYPE_CHECKING:
    from .state import ServerState

log = logging.getLogger("erq.protocol")


class MemcacheProtocol(asyncio.Protocol):
    """One client connection speaking the memcache text protocol."""

    __slots__ = ("state", "transport", "parser", "session", "last_active", "_reading_paused")

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        server = state.config.server
        self.parser = Parser(server.max_line, server.max_item_size)
        self.last_active = state.loop.time()
        self._reading_paused = 0  # bit 1: client pipeline too far ahead, bit 2: write buffer full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        state = self.state
        counters = state.counters
        counters.total_connections += 1
        if counters.curr_connections >= state.config.server.max_connections:
            log.warning(
                "max_connections (%d) reached; refusing a client",
                state.config.server.max_connections,
            )
            transport.write(b"SERVER_ERROR too many open connections\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        counters.curr_connections += 1
        self.session = Session(
            state, dispatch, transport.write, transport.close, self._pause_pipeline
        )  # type: ignore[attr-defined]
        state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        self.state.counters.bytes_read += len(data)
        self.last_active = self.state.loop.time()
        requests = self.parser.feed(data)
        if requests:
            session.feed(requests)

    def connection_lost(self, exc: Exception | None) -> None:
        session = self.session
        if session is None:
            return
        self.session = None
        self.state.counters.curr_connections -= 1
        self.state.connections.discard(self)
        session.connection_lost()

    # Flow control: stop reading from a client that does not read its replies, or whose
    # pipeline runs far ahead of a blocked request, so memory stays bounded.
    def _set_paused(self, bit: int, on: bool) -> None:
        before = self._reading_paused
        self._reading_paused = before | bit if on else before & ~bit
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if before and not self._reading_paused:
            transport.resume_reading()
        elif not before and self._reading_paused:
            transport.pause_reading()

    def _pause_pipeline(self, on: bool) -> None:
        self._set_paused(1, on)

    def pause_writing(self) -> None:
        self._set_paused(2, True)

    def resume_writing(self) -> None:
        self._set_paused(2, False)

    def close_idle(self) -> None:
        if self.transport is not None:
            self.transport.close()
