"""The data directory's own files, beside the queues' directories.

- ``erq.lock``: a server holds an exclusive ``flock`` on it for its whole life, and so does
  ``erq journal pack``; a second server on the same directory would replay the journals the
  first one is appending to and then write over them, losing what the first acknowledged.
- Removing a queue's directory (``delete``, ``max_queue_age``): the directory is first renamed
  to ``deleting.<random>`` and the rename synced, then its files are removed. Removed file by
  file, in directory order, a crash midway would leave some segments behind, and the next
  start would replay them: items already taken would come back. A start removes what a crash
  left under such a name. In the server only the rename runs on the event loop; the sync
  (unless the queue's fsync policy is ``always``) and the removal run on a worker thread,
  so that a client deleting queues does not hold every other client up for a disk flush.
  Renames waiting there are synced together, one sync of the data directory for all of them,
  as group commit does for writes: a burst of deletes is not one flush per queue. The worker
  shares the server's core and interpreter, and queues made and deleted faster than it
  removes them (a reply queue per request, from many clients) would pile up without end, on
  disk and in memory: past ``MAX_WAITING_REMOVALS`` waiting, each delete removes two of them
  itself, so the deleters slow down to the rate the removals keep.

Every name here holds a dot, which a queue name cannot (``erq.names``), so none can be taken
for a queue.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("erq.datadir")

LOCK_FILE = "erq.lock"
DELETING_PREFIX = "deleting."
# Renamed queue directories that may wait for the worker; past it a delete removes the two
# oldest itself. REMOVAL_BATCH: how many the worker takes at a time, so that what waits is
# what the list holds.
MAX_WAITING_REMOVALS = 1024
REMOVAL_BATCH = 64


class DataDirBusy(OSError):
    """Another process (a server, or ``erq journal pack``) holds the data directory."""


class DataDirLock:
    """An exclusive lock on a data directory, held until ``release`` or the process ends
    (SIGKILL included: the kernel drops a dead process's locks)."""

    def __init__(self, fd: int, path: Path, who: str) -> None:
        self._fd = fd
        self.path = path
        self.who = who
        st = os.fstat(fd)
        self._identity = (st.st_dev, st.st_ino)

    def lost(self) -> bool:
        """Whether the lock file has lost its name (deleted by hand or by a tmp cleaner, to
        which an erq.lock never written since the start looks old): a process that opens the
        name then makes and locks a new file, so this lock keeps nobody out any more."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:  # cannot tell (permissions changed): no alarm
            return False
        return (st.st_dev, st.st_ino) != self._identity

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = -1


def lock(data_dir: Path, who: str = "erq") -> DataDirLock:
    """Take ``data_dir``'s lock without waiting; DataDirBusy names the holder's pid. The
    directory must exist."""
    path = Path(data_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 200, 0).decode("ascii", "replace").strip() or "another process"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise DataDirBusy(
                exc.errno, f"{data_dir} is in use by {holder}; one process at a time"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{who} (pid {os.getpid()})\n".encode(), 0)
    return DataDirLock(fd, path, who)


def in_use(data_dir: Path) -> bool:
    """Whether a process (a server, ``erq journal pack``) holds ``data_dir``'s lock now. Read
    only, for the read-only tools (to know that a server may be appending): the lock file is
    neither made nor written. On Linux the answer is read from /proc/locks, which takes no
    lock; elsewhere a shared lock is taken for an instant (a server starting in that instant
    would find the directory busy)."""
    path = Path(data_dir) / LOCK_FILE
    try:
        st = os.stat(path)
    except OSError:
        return False  # no lock file: no server has run here
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            table = locks.read()
    except OSError:
        return _held(path)
    # By inode number alone: the device /proc/locks names is the file system's, which is not
    # always the st_dev stat gives (btrfs subvolumes). A lock on another device's file of
    # that number only makes a read-only tool wait a little for records being written.
    inode = f":{st.st_ino}"
    return any(
        len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(inode)
        for fields in (line.split() for line in table.splitlines())
    )


def _held(path: Path) -> bool:
    """Whether ``path`` is flock-ed, told by a shared lock taken and dropped at once."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # and the shared lock with it
    return False


def remove_queue_dir(
    directory: Path,
    background: Callable[[Callable[[], None]], object] | None = None,
    *,
    durable_now: bool = True,
) -> None:
    """Remove a queue's directory so that a crash leaves all of it or none: rename, sync the
    rename, then remove the files. Errors are logged; a leftover goes at the next start.

    ``background`` runs a callable on a worker thread: given, only the rename (and, with
    ``durable_now``, its sync) happens before this returns, and the rest runs there."""
    directory = Path(directory)
    doomed = directory.with_name(DELETING_PREFIX + os.urandom(16).hex())
    try:
        os.rename(directory, doomed)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning(
            "cannot rename %s before removing it (%s): removing it in place", directory, exc
        )
        # Here, not on a worker: the queue could be made again under this name meanwhile.
        _remove_tree(directory)
        return
    synced = durable_now or background is None
    if synced:
        _sync_rename(directory.parent)
    parent = None if synced else directory.parent
    if background is None:
        _finish_removals([(doomed, parent)])
        return
    with _waiting_lock:
        first = not _waiting
        _waiting.append((doomed, parent))
        behind = _waiting[:2] if len(_waiting) > MAX_WAITING_REMOVALS else []
        del _waiting[: len(behind)]
    if first:  # else the pass already asked for takes this one too
        background(_finish_waiting_removals)
    if behind:
        _finish_removals(behind)


# Renamed directories waiting for the worker's next pass (any server's worker may take them).
_waiting: list[tuple[Path, Path | None]] = []
_waiting_lock = threading.Lock()


def _finish_waiting_removals() -> None:
    while True:
        with _waiting_lock:
            batch = _waiting[:REMOVAL_BATCH]
            del _waiting[:REMOVAL_BATCH]
        if not batch:
            return
        _finish_removals(batch)


def _sync_rename(parent: Path) -> None:
    try:
        fsync_directory(parent)
    except OSError as exc:
        log.warning("cannot sync %s: %s", parent, exc)


def _finish_removals(batch: list[tuple[Path, Path | None]]) -> None:
    """For each (renamed directory, parent whose sync of the rename is due or None): sync each
    parent once, then remove the directories' files (never before their rename is durable)."""
    for parent in dict.fromkeys(parent for _, parent in batch if parent is not None):
        _sync_rename(parent)
    for doomed, _ in batch:
        _remove_tree(doomed)


def remove_leftovers(data_dir: Path) -> int:
    """Remove the directories a crash left while being removed; returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(data_dir))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.startswith(DELETING_PREFIX) and entry.is_dir(follow_symlinks=False):
            log.info("removing %s, left by a deletion a stop interrupted", entry.path)
            _remove_tree(entry.path)
            removed += 1
    return removed


def _remove_tree(path: str | os.PathLike) -> None:
    """``shutil.rmtree``, errors ignored (a leftover goes at the next start). shutil is imported
    here, when a queue goes, not with the server: with what it loads (bz2, lzma, fnmatch) it
    is ~0.6 MiB of RSS that a server whose queues are never deleted does without."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a directory's entries (creations, renames, removals) durable; OSError if not."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "DELETING_PREFIX",
    "LOCK_FILE",
    "MAX_WAITING_REMOVALS",
    "REMOVAL_BATCH",
    "fsync_directory",
    "DataDirBusy",
    "in_use",
    "DataDirLock",
    "lock",
    "remove_leftovers",
    "remove_queue_dir",
]
