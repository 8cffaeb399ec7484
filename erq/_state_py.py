# cython: annotation_typing=False
"""ServerState: what every connection shares — queues, status, config and counters.

It knows no sockets; the network layer (protocol.py, server.py) feeds it connections.

One source compiled twice (like ``_session_py.py``): setup.py compiles it through the link
``erq/_fast/_state.py`` with the C types of ``erq/_fast/_state.pxd``, so that the compiled
per-request layers bump a counter or read the status as a struct field, not through two
attribute lookups and a new int; selector ``erq.state``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from erq.config import Config
    from erq.queues import QueueCollection

log = logging.getLogger("erq.state")

STATUSES = ("UP", "READONLY", "QUIESCENT")


class Counters:
    """memcached-style global request counters (stats)."""

    __slots__ = (
        "cmd_get",
        "cmd_set",
        "cmd_peek",
        "get_hits",
        "get_misses",
        "bytes_read",
        "bytes_written",
        "curr_connections",
        "total_connections",
    )

    def __init__(self) -> None:
        self.cmd_get = 0
        self.cmd_set = 0
        self.cmd_peek = 0
        self.get_hits = 0
        self.get_misses = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.curr_connections = 0
        self.total_connections = 0


class ServerState:
    """Shared state of one erq server."""

    def __init__(
        self, config: Config, queues: QueueCollection, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._config = config
        self.kestrel = config.server.compat == "kestrel"
        self.queues = queues
        self.loop = loop
        self.counters = Counters()
        self.started = time.time()
        self.connections: set = set()  # MemcacheProtocol objects
        self.ready = False
        self.shutdown_requested = None  # set by the server: a callable that stops it
        self.reload_requested = None  # set by the server: returns the reply line
        self._status_file = (
            Path(config.server.data_dir) / "STATUS" if config.server.data_dir else None
        )
        self.status = self._load_status()

    @property
    def config(self) -> Config:  # a property: its setter keeps ``kestrel`` flat
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        self.kestrel = config.server.compat == "kestrel"  # read on every VALUE: kept flat

    def _load_status(self) -> str:
        if self._status_file is not None:
            try:
                word = self._status_file.read_text().strip().upper()
            except OSError:
                return "UP"
            if word in STATUSES:
                return word
        return "UP"

    def set_status(self, word: str) -> None:
        """Change the status and persist it (it survives a restart)."""
        self.status = word
        if self._status_file is not None:
            self._status_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._status_file.with_suffix(".tmp")
            tmp.write_text(word + "\n")
            os.replace(tmp, self._status_file)
        if word == "QUIESCENT":
            for queue in self.queues:
                queue.wake_all()  # blocked gets answer END, monitors finish


__all__ = ["STATUSES", "Counters", "ServerState"]
