"""The erq server: event loop (uvloop when importable), recovery, listener, signals,
periodic sweep, reload and graceful shutdown.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import gc
import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from . import __version__, datadir, open_files, startsignals
from ._compat import IMPLEMENTATION
from .admin import AdminServer
from .config import Config, ConfigError, load_config
from .datadir import DataDirBusy
from .heap import one_arena, paused_gc, release_free_memory
from .item import ITEM_MAKER
from .journal_api import JournalError
from .listener import CONNECTION_LAYER, listen
from .protocol import MemcacheProtocol
from .queues import QueueCollection, RecoveryStopped
from .ring import ITEM_OVERHEAD
from .sliced import finish_now
from .state import ServerState
from .throttle import Throttle

log = logging.getLogger("erq.server")

# A graceful stop waits this long at most for its clients to take the replies already made.
SHUTDOWN_SEND_SECONDS = 5.0
TRIM_AFTER_DROP = 32 << 20  # data bytes taken from memory between two trims of the C heap
SWEEP_SLICE = 0.002  # seconds of periodic sweeping before the loop serves its sockets again

try:  # pragma: no cover - depends on the platform
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


class StartError(Exception):
    """The server cannot start (a port is taken): the message is the one log line that says why."""


def event_loop_name() -> str:
    return "uvloop" if uvloop is not None else "asyncio"


def _recover(queues: QueueCollection, stop: threading.Event) -> list:
    """Start-up recovery's replay, run on a worker thread: every queue opened, for ``adopt``.

    The cyclic GC is off meanwhile, with one full collection at the end. Recovery makes
    long-lived objects by the million and no garbage cycles, and each collection their growing
    number triggers walks all of them holding the GIL (0.1-0.2 s per million): a quarter of the
    time it took to recover 10 million small items, in pauses where the loop thread could not
    answer the admin port."""
    with paused_gc():
        if queues.data_dir is not None:
            datadir.remove_leftovers(queues.data_dir)
        opened = queues.open_existing(stop)
        gc.collect()  # once: the recovered objects land in the oldest generation
        return opened


async def _probe_port(loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
    """Bind (without listening) every address the memcache port will listen on, then let go:
    OSError (EADDRINUSE) when another process listens there. The port itself opens only
    after recovery, so that no client reaches a half-loaded queue."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, type_, proto, _, address in infos:
        with socket.socket(family, type_, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)


async def _probe_ports(
    loop: asyncio.AbstractEventLoop, host: str, admin_port: int, port: int
) -> None:
    """StartError if the server could not listen where it is told to: a host that does not
    resolve or is not this machine's, a port taken. Asked before the data directory is made or
    locked, so that a refused start leaves nothing behind, and before a long replay. The
    memcache port is tried even as 0 (any free port): the host is tried with it."""
    admin = [("admin HTTP", admin_port)] if admin_port else []  # 0: no admin listener
    for what, number in [*admin, ("memcache", port)]:
        try:
            await _probe_port(loop, host, number)
        except OSError as exc:
            raise StartError(f"cannot open the {what} port {host}:{number}: {exc}") from None


class Server:
    """One erq server process: owns the loop-side objects and their lifecycle."""

    def __init__(self, config: Config, *, cli_overrides: dict | None = None) -> None:
        self.config = config
        self._cli = cli_overrides or {}
        self.state: ServerState | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._admin: AdminServer | None = None
        self._sweeper: asyncio.Handle | None = None  # the next sweep, or its next slice
        self._next_expiry = 0.0
        self._swept_bytes = 0  # data bytes in memory in the queues the current sweep has seen
        self._peak_bytes = 0  # most data bytes in memory at the end of a sweep since a trim
        self._stopped: asyncio.Event | None = None
        self._stop_recovery = threading.Event()  # set by a shutdown request during recovery
        self._reload_after_recovery = False  # a SIGHUP came during recovery
        self._commit = None
        self._lock: datadir.DataDirLock | None = None  # held until the process ends
        self._lock_lost = Throttle(log, logging.ERROR)  # retried each sweep: a line per 10 s
        # Any client may send reload: its reloads log a line per reason per 10 s, not per
        # request (a SIGHUP's always log: the log is all its sender hears).
        self._reload_refused = Throttle(log, logging.ERROR)
        self._reload_partial = Throttle(log, logging.WARNING)
        self._reloaded = Throttle(log, logging.INFO)
        self.unsynced_at_exit: list[str] = []  # queues whose last fsync at shutdown failed

    # ---- start -------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config.server
        one_arena()  # before any thread of ours allocates (erq.heap: why)
        await _start_resolver_threads(loop)
        open_file_limit = open_files.raise_limit(cfg.max_connections, cfg.max_queues)
        await _probe_ports(loop, cfg.host, cfg.admin_port, cfg.port)
        data_dir = Path(cfg.data_dir)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self._lock = datadir.lock(data_dir, who=f"erq serve on {cfg.host}:{cfg.port}")
        except DataDirBusy as exc:
            raise StartError(f"cannot use the data directory: {exc.strerror}") from None
        except OSError as exc:
            raise StartError(f"cannot use the data directory {data_dir}: {exc}") from None
        log.info(
            "data directory %s, configuration %s",
            data_dir.resolve(),
            self.config.path or "embedded defaults (no file)",
        )
        from .journal import GroupCommit, QueueJournal

        self._commit = GroupCommit(loop)

        def open_journal(directory: Path, qcfg):
            recovering = self.state is None or not self.state.ready
            return QueueJournal.open(
                directory,
                fsync=qcfg.fsync,
                max_memory_size=qcfg.max_memory_size,
                max_journal_size=qcfg.max_journal_size,
                commit=self._commit,
                item_overhead=ITEM_OVERHEAD,
                stop=self._stop_recovery if recovering else None,  # a stop signal, at once
                item_cls=ITEM_MAKER,  # the queue's own items, no tuple each
            )

        queues = QueueCollection(
            self.config,
            data_dir,
            journal_factory=open_journal,
            background=self._commit.background,
        )
        self.state = state = ServerState(self.config, queues, loop)
        state.open_file_limit = queues.open_file_limit = open_file_limit
        state.shutdown_requested = self.request_shutdown
        state.reload_requested = self._reload_for_a_client
        started = loop.time()
        self._stopped = asyncio.Event()
        # From here on SIGTERM and SIGINT stop the server the orderly way, recovery included:
        # a replay takes seconds on a large journal, and an operator's stop must not wait for
        # it, nor kill the process outright (SIGTERM's default) or end it with a traceback.
        handlers = {
            signal.SIGTERM: functools.partial(self.request_shutdown, "SIGTERM"),
            signal.SIGINT: functools.partial(self.request_shutdown, "SIGINT"),
            signal.SIGHUP: self._sighup,
        }
        for sig, handler in handlers.items():
            try:
                loop.add_signal_handler(sig, handler)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - not on this platform
                pass
        for sig in startsignals.take():  # what came while the process was starting
            log.info("%s while starting", signal.Signals(sig).name)
            handlers[sig]()
        if cfg.admin_port:  # before recovery: a probe finds the port while the server starts
            self._admin = AdminServer(state)
            try:
                await self._admin.start(cfg.host, cfg.admin_port)
            except OSError as exc:
                raise StartError(
                    f"cannot open the admin HTTP port {cfg.host}:{cfg.admin_port}: {exc}"
                ) from None
            log.info("admin HTTP port on %s:%d", cfg.host, self._admin.port)
        # Recovery happens before the memcache port is opened: nobody can talk to a half-loaded
        # queue. The journals are replayed on a worker thread, so that the loop answers the
        # admin port meanwhile (a liveness probe must not kill a server that is only slow to
        # recover); the thread builds queues no one sees until they are adopted, here.
        try:
            recover = startsignals.in_worker_thread(_recover)  # signals: the main thread's
            opened = await asyncio.to_thread(recover, queues, self._stop_recovery)
        except JournalError as exc:  # a journal this erq must not touch (another version)
            why = str(exc)
            if os.strerror(errno.EMFILE) in why:  # the hard limit is short of the segments
                each = "one" if open_files.DESCRIPTORS_PER_SEGMENT == 1 else "two"
                why += (
                    f" (the open-file limit is {open_file_limit}, and each journal segment"
                    f" holds {each}: raise the hard limit, ulimit -Hn)"
                )
            raise StartError(f"cannot recover the journals: {why}") from None
        queues.adopt(opened)
        if self._stopped.is_set():  # stopped while replaying (which got to its end): no port
            return
        # Recovery's replay tables are garbage now, in pages below the recovered items.
        trim_started = time.perf_counter()
        if len(queues) and release_free_memory():
            log.debug(
                "free heap released after recovery in %.3fs", time.perf_counter() - trim_started
            )
        # What recovery read into memory: a drain right after the start trims the heap too,
        # though no sweep saw the queues full.
        self._peak_bytes = sum(queue.mem_bytes for queue in queues)
        try:
            self._listener = await listen(
                loop, cfg.host, cfg.port, lambda: MemcacheProtocol(state), backlog=1024
            )
        except OSError as exc:
            raise StartError(
                f"cannot open the memcache port {cfg.host}:{cfg.port}: {exc}"
            ) from None
        # Ready once the port is open (/readyz said UP while it was still shut), and with no
        # await in between: the reload a SIGHUP during recovery asked for comes before the
        # first request is read.
        state.ready = True
        if self._reload_after_recovery:
            self.reload()
        self._schedule_sweep()
        port = self._listener.sockets[0].getsockname()[1] if self._listener.sockets else cfg.port
        self.port = port
        log.info(
            "erq %s ready on %s:%d (implementation=%s, loop=%s, connections=%s, status=%s); "
            "recovered %d items, %d bytes in %d queues in %.3fs",
            __version__,
            cfg.host,
            port,
            IMPLEMENTATION,
            event_loop_name(),
            CONNECTION_LAYER,
            state.status,
            queues.recovered_items,
            queues.recovered_bytes,
            len(queues),
            loop.time() - started,
        )
        if len(queues) > cfg.max_queues:
            log.warning(
                "%d queues in the data directory, more than max_queues = %d: every one is "
                "served, and no new queue is made until enough are deleted",
                len(queues),
                cfg.max_queues,
            )
        if IMPLEMENTATION == "python":
            log.warning(
                "running the pure-Python build (ERQ_NO_EXTENSIONS or no compiled extensions): slower"
            )

    def _schedule_sweep(self) -> None:
        assert self.state is not None
        # open_timeout is checked at least once a second; expiry every expiry_sweep.
        period = self.state.config.server.expiry_sweep / 1000.0
        self._sweeper = self.state.loop.call_later(min(period, 1.0), self._sweep)

    def _sweep(self) -> None:
        state = self.state
        if state is None:
            return
        now = state.loop.time()
        expire = now >= self._next_expiry
        if expire:
            self._next_expiry = now + state.config.server.expiry_sweep / 1000.0 - 0.001
        self._swept_bytes = 0  # a pass that did not finish (a reload rescheduled it) counts not
        self._sweep_slice(iter(state.queues), expire)

    def _sweep_slice(self, queues: Iterator, expire: bool) -> None:
        """Sweep queues for at most SWEEP_SLICE seconds, then let the loop serve its sockets
        before the next slice: a sweep over thousands of queues (a few microseconds each)
        would otherwise hold every request back for tens of milliseconds once a second."""
        state = self.state
        if state is None:
            return
        try:
            deadline = time.perf_counter() + SWEEP_SLICE
            for queue in queues:
                while state.queues.sweep_queue(queue, expire):  # more expired at its head
                    if time.perf_counter() >= deadline:
                        queues = itertools.chain((queue,), queues)  # this one again first
                        break
                else:
                    self._swept_bytes += queue.mem_bytes
                if time.perf_counter() >= deadline:
                    self._sweeper = state.loop.call_soon(self._sweep_slice, queues, expire)
                    return
            self._trim_after_drain()
            timeout = state.config.server.client_timeout
            if timeout:
                now = state.loop.time()
                limit = timeout / 1000
                for proto in list(state.connections):
                    session = proto.session
                    # A get waiting for an item is not idle; one stopped between its keys
                    # because the client does not take its replies is.
                    if session is None or session.waits_for_an_item():
                        continue
                    idle = now - proto.last_active
                    if idle >= limit:
                        proto.close_idle(idle >= 2 * limit)
            state.keep_status_file()  # first: it makes the data directory again, if need be
            self._keep_lock()
        except Exception:  # pragma: no cover - a bug; keep the server alive
            log.exception("periodic sweep failed")
        self._schedule_sweep()

    def _trim_after_drain(self) -> None:
        """At the end of a sweep: once the queues hold TRIM_AFTER_DROP bytes fewer in memory
        than at their peak since the last trim, hand the C heap's free pages back. A drained
        queue's items were freed in pages that glibc keeps resident below longer-lived blocks
        (after a restart over 1,000,000 x 1 KiB items and their drain, 85 MB of anonymous
        RSS, 20 MB once trimmed); trimming costs a few ms (logged), at most once per sweep
        and per TRIM_AFTER_DROP bytes taken."""
        in_memory, self._swept_bytes = self._swept_bytes, 0
        self._peak_bytes = max(self._peak_bytes, in_memory)
        if self._peak_bytes - in_memory < TRIM_AFTER_DROP:
            return
        self._peak_bytes = in_memory
        started = time.perf_counter()
        if release_free_memory():
            log.debug(
                "free heap released in %.3fs after the queues' memory fell by %d bytes or more",
                time.perf_counter() - started,
                TRIM_AFTER_DROP,
            )

    def _keep_lock(self) -> None:
        """A lock file deleted under the server keeps nobody out: a second server or an
        ``erq journal pack`` would make and lock a new one, and write over the journals this
        server appends to. Take the lock again under its name (once the data directory is
        there again, if it went too)."""
        lock = self._lock
        if lock is None or not lock.lost():
            return
        try:
            again = datadir.lock(lock.path.parent, who=lock.who)
        except OSError as exc:  # DataDirBusy included: too late, another process has it
            self._lock_lost.log("%s was deleted and cannot be taken again yet: %s", lock.path, exc)
            return
        lock.release()
        self._lock = again
        log.warning("%s was deleted while the server runs: made and locked again", lock.path)

    # ---- reload ------------------------------------------------------------------------
    def _reload_for_a_client(self) -> str:
        return self.reload(by_client=True)

    def reload(self, by_client: bool = False) -> str:
        """Re-read the config file; queue settings change live. Returns the reply line."""
        state = self.state
        assert state is not None

        def say(throttle: Throttle, msg: str, *args: object) -> None:
            if by_client:
                throttle.log(msg, *args)
            else:
                log.log(throttle.level, msg, *args)

        try:
            new = load_config(self.config.path, cli=self._cli)
        except ConfigError as exc:
            say(self._reload_refused, "reload refused, keeping the running configuration: %s", exc)
            return f"SERVER_ERROR reload refused: {exc}"
        restart = self.config.restart_required(new)
        if restart:
            say(
                self._reload_partial,
                "reload: changes to %s need a restart and were not applied",
                ", ".join(restart),
            )
            new = _keep_restart_settings(new, self.config)
        self.config = new
        state.config = new
        state.queues.reconfigure(new)
        state.open_file_limit = state.queues.open_file_limit = open_files.raise_limit(
            new.server.max_connections, new.server.max_queues
        )
        # A shorter expiry_sweep applies from now, not once the old period has run out.
        sooner = state.loop.time() + new.server.expiry_sweep / 1000.0 - 0.001
        self._next_expiry = min(self._next_expiry, sooner)
        for proto in state.connections:  # open connections too: a pool's may never close
            proto.parser.set_limits(new.server.max_line, new.server.max_item_size)
        if new.path is None:
            say(
                self._reloaded,
                "configuration reloaded (no file: defaults, ERQ_* variables and flags)",
            )
        else:
            say(self._reloaded, "configuration reloaded from %s", new.path)
        return "Reloaded config."

    def _sighup(self) -> None:
        if self._stopped is not None and self._stopped.is_set():
            return  # stopping: nothing left to reload for
        state = self.state
        if state is not None and not state.ready:
            # The replay thread is still building queues from the configuration it has: the
            # new one is read once they are adopted, so that it reaches them too.
            log.info("SIGHUP during recovery: the configuration is reloaded when it ends")
            self._reload_after_recovery = True
            return
        self.reload()

    # ---- stop --------------------------------------------------------------------------
    def request_shutdown(self, why: str = "the shutdown command") -> None:
        if self._stopped is not None and not self._stopped.is_set():
            log.info("shutting down (%s)", why)
            self._stopped.set()
            self._stop_recovery.set()  # a replay in progress stops at its next check

    async def wait_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    async def shutdown(self) -> None:
        """Stop accepting, answer blocked gets END, flush replies, fsync, close journals."""
        state = self.state
        if self._listener is not None:
            self._listener.close()
        if self._admin is not None:
            self._admin.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if state is None:
            self._release_lock()
            return
        # A stats or flush_expired that runs in slices finishes now, while the journals are
        # open, and answers; so does one pipelined behind it or behind a woken get.
        state.stopping = True
        for proto in list(state.connections):
            if proto.session is not None:
                finish_now(proto.session)
        for queue in state.queues:
            queue.wake_all()
        await asyncio.sleep(0)  # let woken sessions run their pipelines
        await self._run_what_was_read(state)
        if self._commit is not None:
            await self._commit.drain()
        # Open reads go back to the head now, journaled, rather than when each transport's
        # close reaches its session, after the journals closed; queue by queue, in the order
        # they were opened whichever connection holds them (a session at a time would put one
        # connection's reads ahead of older reads of another).
        for queue in state.queues:
            queue.unremove_every_open()
        for proto in list(state.connections):
            session = proto.session
            if session is not None:
                proto.stop_reading(False)
                # What was answered goes out, then the connection closes (a lingering close,
                # MemcacheProtocol._close_transport); requests held back behind replies the
                # client has not taken yet are dropped unrun (a get among them would take an
                # item).
                session.close_after(None)
                session.flush()
        await self._send_replies_made(state)
        # Every connection is closed now: erq's epoll layer closes its epoll set too, which
        # the loop held, and its descriptor, until the loop closed (an embedder that stops a
        # server may keep its loop running).
        if self._listener is not None and CONNECTION_LAYER == "epoll":
            self._listener.close_clients()
        self.unsynced_at_exit = state.queues.close()
        state.deadlines.close()  # blocked gets were answered above: only empty buckets left
        if self._commit is not None:
            self._commit.close()
        self._release_lock()  # after the journals are closed
        if self.unsynced_at_exit:
            log.error(
                "stopped, but the last writes of %d queue(s) may not be on disk (their fsync "
                "failed, or their deleted journal could not be written again; see above): %s",
                len(self.unsynced_at_exit),
                ", ".join(self.unsynced_at_exit),
            )
        else:
            log.info("stopped")

    async def _run_what_was_read(self, state: ServerState) -> None:
        """PROTOCOL §6: in-flight requests finish. A pipeline runs REQUESTS_PER_PASS requests
        a pass of the loop, and a large read is parsed as its requests run, so the requests
        the connections have read take passes to run; nothing more is read meanwhile. At
        most SHUTDOWN_SEND_SECONDS; those behind replies their client does not take are
        dropped unrun by the close, as before."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_SEND_SECONDS
        for proto in list(state.connections):
            proto.stop_reading()
        while loop.time() < deadline:
            if not any(proto.input_to_run() for proto in list(state.connections)):
                return
            await asyncio.sleep(0)

    async def _send_replies_made(self, state: ServerState) -> None:
        """Let the closing connections send the replies they hold (up to OUT_BUDGET and a
        transport's buffer each) and end before the process exits: a reply dropped unsent
        loses the item its get took. A client that has not taken them and closed after
        SHUTDOWN_SEND_SECONDS is dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_SEND_SECONDS
        while state.connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if state.connections:
            log.warning(
                "%d client(s) did not take their last replies and close in %g s; dropping them",
                len(state.connections),
                SHUTDOWN_SEND_SECONDS,
            )
            for proto in list(state.connections):
                if proto.transport is not None:
                    proto.transport.abort()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _keep_restart_settings(new: Config, old: Config) -> Config:
    from dataclasses import replace

    server = replace(
        new.server,
        host=old.server.host,
        port=old.server.port,
        admin_port=old.server.admin_port,
        data_dir=old.server.data_dir,
    )
    return replace(new, server=server)


async def _serve(config: Config, cli: dict) -> int:
    server = Server(config, cli_overrides=cli)
    try:
        return await _run(server)
    finally:
        _ignore_stop_signals()


async def _start_resolver_threads(loop: asyncio.AbstractEventLoop) -> None:
    """The loop resolves addresses on threads it starts at its first lookup and keeps (libuv's
    pool under uvloop, the default executor under asyncio). Started here, with the stop and
    reload signals blocked, they keep them blocked, as erq's own workers do
    (startsignals.block_in_this_thread): only the main thread takes them, which
    _ignore_stop_signals relies on."""
    with startsignals.blocked():
        try:
            await loop.getaddrinfo("127.0.0.1", None)
        except OSError:  # pragma: no cover - no loopback address: nothing to resolve then
            pass


def _ignore_stop_signals() -> None:
    """The server has stopped: for the rest of the exit, ignore the stop and reload signals.

    The loop's handlers would go with the loop, and Python's own at its finalization, after
    which a stop signal repeated (a second Ctrl-C, a supervisor signalling the process group
    and the pid) would turn a stop already made into an exit by that signal.

    The loop's removal sets their default action for a moment: they are blocked meanwhile
    (every other thread blocks them for good: startsignals.block_in_this_thread,
    _start_resolver_threads), and one that arrived is dropped by SIG_IGN before they are
    unblocked."""
    loop = asyncio.get_running_loop()
    blocking = hasattr(signal, "pthread_sigmask")
    if blocking:
        signal.pthread_sigmask(signal.SIG_BLOCK, startsignals.HELD)
    try:
        for sig in startsignals.HELD:
            try:
                loop.remove_signal_handler(sig)  # SIG_DFL until the next line
                signal.signal(sig, signal.SIG_IGN)  # which finalization leaves alone
            except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
                pass  # no signals here, or not the main thread
    finally:
        if blocking:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, startsignals.HELD)


async def _run(server: Server) -> int:
    try:
        await server.start()
    except StartError as exc:
        log.error("%s", exc)
        await server.shutdown()  # close what opened before the failure (journals, admin port)
        return 1
    except RecoveryStopped:
        log.info("recovery stopped before it finished; the next start replays the journals")
        await server.shutdown()
        return 0
    try:
        await server.wait_stopped()
    finally:
        await server.shutdown()
    return 1 if server.unsynced_at_exit else 0


def run(config: Config, cli: dict | None = None) -> int:
    """Run the server until SIGTERM/SIGINT/shutdown; returns the exit status (1: it could not
    start, see the log)."""
    coro = _serve(config, cli or {})
    if uvloop is not None:
        return uvloop.run(coro)
    return asyncio.run(coro)  # pragma: no cover
