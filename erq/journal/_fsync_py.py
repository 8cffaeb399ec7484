"""An fsync worker thread, pure Python (twin of erq/_fast/_fsync.pyx; selector
erq.journal.fsync_worker).

The owner (the event loop thread) hands it one job at a time: file descriptors to fdatasync
and directory descriptors to fsync. The thread syncs and closes every descriptor, records each
errno, and then makes the notification descriptor readable (an eventfd where the os module has
one, a pipe elsewhere), which the loop watches with add_reader.

State machine, guarded by the condition's lock (``_Core.state``)::

    IDLE --submit--> PENDING --thread takes it--> RUNNING --synced--> DONE --collect--> IDLE

The notification is written under the lock together with the move to DONE, and drained by
collect under the lock together with the move to IDLE: the descriptor is readable exactly
while a finished job waits to be collected.

Unlike the C build this thread needs the GIL to run; the behaviour is the same.
"""

from __future__ import annotations

import errno
import operator
import os
import threading
import weakref

from ..startsignals import in_worker_thread
from .unlinked import unlinked

_IDLE, _PENDING, _RUNNING, _DONE = range(4)
_EVENTFD = hasattr(os, "eventfd")
# macOS has no fdatasync: fsync there, as the C build does.
_datasync = getattr(os, "fdatasync", os.fsync)


class _Core:
    """What the thread shares with the owner; it holds no reference to the FsyncWorker, so a
    worker that is dropped without close() is collected and its finalizer stops the thread."""

    __slots__ = ("cond", "state", "stop", "fds", "dirs", "errs", "notify", "close_on_exit")

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.state = _IDLE
        self.stop = False
        self.fds: list[int] = []
        self.dirs: list[int] = []
        self.errs: list[int] = []
        self.close_on_exit = False  # the finalizer ran on this very thread: close on the way out
        if _EVENTFD:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.notify = (fd, fd)
        else:
            r, w = os.pipe()  # non-inheritable already
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self.notify = (r, w)

    def post(self) -> None:
        if _EVENTFD:
            os.eventfd_write(self.notify[1], 1)
        else:
            os.write(self.notify[1], b"\x01")

    def drain(self) -> None:
        try:
            if _EVENTFD:
                os.eventfd_read(self.notify[0])
            else:
                while os.read(self.notify[0], 16):
                    pass
        except BlockingIOError:
            pass

    def close_notify(self) -> None:
        r, w = self.notify
        if r >= 0:
            os.close(r)
            if w != r:
                os.close(w)
        self.notify = (-1, -1)


def _as_c_int(fd) -> int:
    fd = operator.index(fd)
    if not -(1 << 31) <= fd < 1 << 31:
        raise OverflowError(f"file descriptor {fd} does not fit a C int")
    return fd


def _sync(fd: int, sync) -> int:
    """Sync and close ``fd`` (ours since submit); the errno, 0 when it synced. A file or
    directory deleted under the server syncs, but no restart can find it: ENOENT."""
    try:
        sync(fd)
        if unlinked(fd):
            return errno.ENOENT
    except OSError as exc:
        return exc.errno or 5  # EIO: an OSError without an errno is still a failure
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # says nothing about durability
    return 0


def _run(core: _Core) -> None:
    """The thread: run jobs until stopped. A job submitted before the stop still runs."""
    cond = core.cond
    try:
        while True:
            with cond:
                while core.state != _PENDING and not core.stop:
                    cond.wait()
                if core.state != _PENDING:
                    return
                core.state = _RUNNING
                fds, dirs = core.fds, core.dirs
            errs = [_sync(fd, _datasync) for fd in fds]
            errs += [_sync(fd, os.fsync) for fd in dirs]
            with cond:
                core.errs = errs
                core.state = _DONE
                core.post()
                cond.notify_all()
    finally:
        with cond:
            if core.close_on_exit:
                core.close_notify()


def _shutdown(core: _Core, thread: threading.Thread) -> None:
    """Stop the thread after the job in flight, join it, close the notification descriptor."""
    with core.cond:
        core.stop = True
        core.cond.notify_all()
        if thread is threading.current_thread():  # collected on the worker thread itself
            core.close_on_exit = True
            return
    thread.join()
    core.close_notify()


class FsyncWorker:
    """One thread that syncs one job of descriptors at a time; see the module docstring."""

    __slots__ = ("_core", "_finalizer", "__weakref__")

    def __init__(self) -> None:
        self._core = core = _Core()
        thread = threading.Thread(
            target=in_worker_thread(_run), args=(core,), name="erq-fsync", daemon=True
        )
        thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, core, thread)

    def _check_open(self) -> _Core:
        if not self._finalizer.alive:
            raise ValueError("FsyncWorker is closed")
        return self._core

    def fileno(self) -> int:
        """Readable while a finished job waits for :meth:`collect`."""
        return self._check_open().notify[0]

    def submit(self, fds: list[int], dirs: list[int]) -> None:
        """Start a job: fdatasync each of ``fds``, then fsync each of ``dirs``. The worker owns
        the descriptors from here on and closes them; if this raises, they stay the caller's."""
        core = self._check_open()
        if not isinstance(fds, list) or not isinstance(dirs, list):
            raise TypeError("fds and dirs must be lists")
        fds = [_as_c_int(fd) for fd in fds]  # checked like the C build, before any change
        dirs = [_as_c_int(fd) for fd in dirs]
        with core.cond:
            if core.state != _IDLE:
                raise RuntimeError("FsyncWorker: a job is in flight; collect() it first")
            core.fds, core.dirs = fds, dirs
            core.state = _PENDING
            core.cond.notify_all()

    def collect(self, wait: bool = False) -> list[int] | None:
        """The errno of each descriptor of the finished job, in submit order (0 = synced), or
        None while it runs (or when there is none). ``wait``: block until it finishes."""
        core = self._check_open()
        with core.cond:
            if wait:
                while core.state == _PENDING or core.state == _RUNNING:
                    core.cond.wait()
            if core.state != _DONE:
                return None
            core.drain()
            core.state = _IDLE
            errs, core.errs = core.errs, []
            return errs

    @property
    def busy(self) -> bool:
        """A job was submitted and not yet collected."""
        if not self._finalizer.alive:
            return False
        with self._core.cond:
            return self._core.state != _IDLE

    def close(self) -> None:
        """Finish the job in flight (its result is dropped), stop and join the thread, close
        the notification descriptor. Idempotent."""
        self._finalizer()


__all__ = ["FsyncWorker"]
