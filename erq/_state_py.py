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
from heapq import heapify, heappop, heappush
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erq.datadir import fsync_directory
from erq.parser import DataBudget
from erq.throttle import Throttle

if TYPE_CHECKING:
    import asyncio

    from erq.config import Config
    from erq.queues import QueueCollection

log = logging.getLogger("erq.state")
_STATUS_NOT_SAVED = Throttle(log, logging.ERROR)  # retried each sweep: a line per 10 s

STATUSES = ("UP", "READONLY", "QUIESCENT")
# The status file in data_dir. Its dot keeps it apart from the queues' directories: a queue
# name cannot hold one (a queue may be called STATUS, the file's name in earlier builds).
STATUS_FILE = "erq.status"
_LEGACY_STATUS_FILE = "STATUS"
# The longest wait a Deadline holds, ~31.7 years (a longer one, `monitor q 99999999999999`
# say, is cut to it): loop times in ms stay far from a C long long's range.
MAX_DELAY = 1e9
# Deadlines rebuilds its heap once it holds more than twice its buckets plus this many.
_HEAP_SLACK = 64


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
        "rejected_connections",
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
        self.rejected_connections = 0  # refused past max_connections (memcached's name)


class Deadlines:
    """The timeouts of blocked requests (``get q/t=<ms>``, ``monitor``) on one loop timer.

    A timer handle per blocked get cost ~6,500 instructions (uvloop's TimerHandle, then its
    cancel and close), on the path a waiting consumer takes for every item. Here a deadline
    is an entry in a bucket per millisecond, removed when the request is answered, and one
    loop timer is armed for the earliest bucket. Deadlines have the loop timers' resolution
    (1 ms) and are rounded up: a request never times out early.

    What is held is bounded by the deadlines still pending, however long they are: a bucket
    emptied by answers goes at once, and the heap, which keeps the deadlines of buckets gone
    before their time, is rebuilt from the buckets left once it holds twice as many. (A
    consumer looping on ``get q/t=3600000`` would otherwise leave a bucket for every
    millisecond of the last hour.)

    A bucket holding one entry is the entry itself, and a dict ``{entry: None}`` only once a
    second one shares its millisecond: most hold one, and the dict's making, filling and
    freeing were a fifth of what a deadline cost. (An entry is never a dict.)
    """

    __slots__ = ("loop", "_buckets", "_heap", "_armed", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # deadline (ms of loop time) -> its entry, or {entry: None} for several
        self._buckets: dict[int, Any] = {}
        self._heap: list[int] = []  # the buckets' deadlines; a bucket's only, once each
        self._armed = 0  # the deadline the timer is armed for; 0: none
        self._timer: Any = None

    def add(self, entry: Any, delay: float) -> int:
        """Call ``entry.expire()`` once ``delay`` seconds have passed, unless it is discarded
        first. Returns the deadline to discard it with."""
        now = self.loop.time()
        if delay > MAX_DELAY:
            delay = MAX_DELAY
        deadline = int((now + delay) * 1000.0) + 1
        key = deadline  # compiled: the one int object the dict and the heap share
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            buckets[key] = entry
            heappush(self._heap, key)
            if self._armed == 0 or deadline < self._armed:
                self._arm(deadline)
        elif type(bucket) is dict:
            bucket[entry] = None
        elif bucket is not entry:
            buckets[key] = {bucket: None, entry: None}
        return deadline

    def discard(self, entry: Any, deadline: int) -> None:
        """The request was answered: its timeout will not fire."""
        buckets = self._buckets
        key = deadline  # compiled: one int object for the two lookups
        bucket = buckets.get(key)
        if bucket is None:
            return
        if type(bucket) is dict:
            bucket.pop(entry, None)
            if bucket:
                return
        elif bucket is not entry:
            return  # discarded before (or expired), and another came in its millisecond
        del buckets[key]  # its heap entry stays until its time or a rebuild
        heap = self._heap
        if len(heap) > 2 * len(buckets) + _HEAP_SLACK:
            heap[:] = buckets  # in place: _tick may be iterating it
            heapify(heap)

    def _arm(self, deadline: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = deadline
        self._timer = self.loop.call_at(deadline / 1000.0, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._armed = 0
        now = self.loop.time() * 1000.0
        heap = self._heap
        buckets = self._buckets
        while heap and heap[0] <= now:
            bucket = buckets.pop(heappop(heap), None)
            if bucket is None:  # emptied by answers, or a deadline pushed twice
                continue
            if type(bucket) is dict:
                for entry in list(bucket):
                    entry.expire()
            else:
                bucket.expire()
        while heap and heap[0] not in buckets:  # gone: no timer for those
            heappop(heap)
        # An expire() may have armed the timer for a deadline it added (a multi-key get
        # blocking on its next key), which can be later than the earliest one left.
        if heap and (self._armed == 0 or heap[0] < self._armed):
            self._arm(heap[0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = 0
        self._buckets.clear()
        self._heap.clear()


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
        self.deadlines = Deadlines(loop)
        # What sets still arriving hold, over every connection (their parsers share it).
        self.data_budget = DataBudget(config.server.max_pending_data)
        self.started = time.time()
        self.connections: set = set()  # MemcacheProtocol objects
        self.ready = False
        # The server is stopping: work spread over loop passes (erq.sliced) runs to its end.
        self.stopping = False
        self.shutdown_requested = None  # set by the server: a callable that stops it
        self.reload_requested = None  # set by the server: returns the reply line
        # The process's soft limit on open files (None: none), set by the server: connections
        # may not take the descriptors the queues' journals need (erq.open_files).
        self.open_file_limit: int | None = None
        self._status_file = (
            Path(config.server.data_dir) / STATUS_FILE if config.server.data_dir else None
        )
        self.status = self._load_status()

    @property
    def status(self) -> str:
        """UP, READONLY or QUIESCENT (PROTOCOL §8). ``set_status`` changes it and saves it."""
        return self._status

    @status.setter
    def status(self, word: str) -> None:
        # Two flags kept beside the word: every set and get tests one as a C field, where
        # comparing the word was a string compare (~95 instructions a get).
        self._status = word
        self.up = word == "UP"
        self.quiescent = word == "QUIESCENT"

    @property
    def config(self) -> Config:  # a property: its setter keeps ``kestrel`` flat
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        self.kestrel = config.server.compat == "kestrel"  # read on every VALUE: kept flat
        self.data_budget.limit = config.server.max_pending_data  # sets held keep their room

    def _load_status(self) -> str:
        path = self._status_file
        if path is None:
            return "UP"
        legacy = path.with_name(_LEGACY_STATUS_FILE)
        if not path.exists() and legacy.is_file():  # written by an earlier version
            word = _read_status(legacy)
            try:
                self._save_status(word)
                legacy.unlink()
            except OSError as exc:
                log.warning("cannot move %s to %s: %s", legacy, path, exc)
            return word
        return _read_status(path)

    def _save_status(self, word: str) -> None:
        """Written whole and synced before it replaces the old file, and the rename synced:
        after a power cut the file holds the old status or the new one, never nothing (a
        rename of unsynced data can leave an empty file)."""
        path = self._status_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(STATUS_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, (word + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(path.parent)

    def keep_status_file(self) -> None:
        """Write the status file again if it was deleted under the server (a tmp cleaner
        takes a file not written since the status was set; an rm -r takes it too): a drained
        server would otherwise come back UP at its next start. UP needs no file."""
        path = self._status_file
        if path is None or self.up or path.exists():
            return
        try:
            self._save_status(self.status)
        except OSError as exc:
            _STATUS_NOT_SAVED.log("%s was deleted and cannot be written again yet: %s", path, exc)
            return
        log.warning("%s was deleted while the server runs: written again (%s)", path, self.status)

    def set_status(self, word: str) -> None:
        """Change the status and persist it (it survives a restart). OSError when it cannot
        be saved: the status is then left as it was. The status it has already is not saved
        again when its file says so (a start that could not read the file runs UP, and an
        operator's ``status UP`` must then reach the file)."""
        if word == self.status and (
            self._status_file is None or _file_says(self._status_file, word)
        ):
            return
        if self._status_file is not None:
            self.queues.slow_ops += 1
            self._save_status(word)
        self.status = word
        if word == "QUIESCENT":
            for queue in self.queues:
                queue.wake_all()  # blocked gets answer END, monitors finish


def _saved(path: Path) -> tuple[str, bytes]:
    """The word in ``path`` as a start reads it (no file: UP), and the bytes it was read
    from; OSError if it cannot be read."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return "UP", b""
    return text.decode("ascii", "replace").strip().upper(), text


def _file_says(path: Path, word: str) -> bool:
    try:
        return _saved(path)[0] == word
    except OSError:
        return False


def _read_status(path: Path) -> str:
    """The status saved in ``path``: UP if there is none, and if it cannot be read (said in
    the log: an operator who drained this server must hear that it takes writes again)."""
    try:
        word, text = _saved(path)
    except OSError as exc:
        log.warning("cannot read the saved status in %s (%s): starting UP", path, exc)
        return "UP"
    if word not in STATUSES:
        log.warning("%s holds no status (%r): starting UP", path, text[:40])
        return "UP"
    return word


__all__ = ["STATUS_FILE", "STATUSES", "Counters", "Deadlines", "ServerState"]
