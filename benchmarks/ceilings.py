"""Machine ceilings: what the disk under the benchmark allows any journal, measured in Python.

Two bars are bounded by the machine as much as by the server. A journal that syncs every
100 ms cannot keep taking more bytes per second than the machine makes durable
(:func:`disk_write_bandwidth`: through the page cache as a journal keeps it, and again with
each synced range dropped from the cache, so that its memory is reused: on a VM whose host
backs guest memory only once it is touched, the first can be several times slower than the
second, and than the disk), and one writer that syncs after every record cannot go faster
than one ``fdatasync`` at a time (:func:`fdatasync_rate`). Both write the way erq's journal
does (a preallocated file, mapped, written in place, ``os.fdatasync``) but share no code with
it: standard library only. Each is bounded in time and bytes, and removes its file.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
import threading
import time

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
BLOCK = 64 * KIB  # the value size of the 64 KiB scenario
SYNC_PERIOD_S = 0.1  # erq's default fsync period
# Written but not yet covered by a finished fdatasync: past this the writer waits, so the
# final fdatasync (and the probe) ends within ~1 s of ``seconds`` on a slow disk.
MAX_BACKLOG = 256 * MIB
# Left free on the file system whatever the cap (the servers' data directories share it).
FREE_MARGIN = 2 * GIB
MIN_FILE = 64 * MIB
# Bytes of a journal ADD record besides its data: erq/journal/format.py ADD_OVERHEAD (length
# u32, crc32c u32, opcode u8, id u64, flags u32, add_time u64, expiry u64). Copied, not
# imported: this module measures the machine and runs without erq.
ADD_OVERHEAD = 37
SMALL_RECORD = ADD_OVERHEAD + 10  # an ADD record of a 10 B item, qload's default size


def _open_mapped(directory: str | os.PathLike, size: int) -> tuple[str, int, mmap.mmap]:
    """A new file of ``size`` bytes in ``directory``, allocated and mapped shared."""
    fd, path = tempfile.mkstemp(prefix="erq-ceiling-", dir=directory)
    try:
        os.posix_fallocate(fd, 0, size)
        return path, fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise


def _room(directory: str | os.PathLike, wanted: int) -> int:
    """``wanted`` bytes, or less so that ``FREE_MARGIN`` stays free; a whole number of blocks."""
    room = min(wanted, shutil.disk_usage(directory).free - FREE_MARGIN) // BLOCK * BLOCK
    least = min(wanted, MIN_FILE)
    if room < least:
        raise OSError(errno.ENOSPC, f"less than {FREE_MARGIN + least} bytes free", directory)
    return room


def disk_write_bandwidth(
    directory: str | os.PathLike,
    seconds: float = 3.0,
    max_bytes: int = 2 * GIB,
    reuse_cache: bool = False,
) -> float:
    """Bytes per second made durable by a journal-like writer that syncs every 100 ms.

    A preallocated file of at most ``max_bytes`` is mapped and written in 64 KiB blocks from
    its start. As in erq, the periodic ``fdatasync`` runs on another thread and the writer does
    not wait for it, unless what it wrote past the last finished sync exceeds ``MAX_BACKLOG``.
    Writing stops after ``seconds`` or at the end of the file; the figure is the bytes written
    over the time until the final ``fdatasync`` returned. ``reuse_cache``: after each sync the
    synced pages are unmapped and dropped from the page cache (``posix_fadvise``
    DONTNEED), so the writer's next pages reuse their memory instead of new memory.
    """
    size = _room(directory, max_bytes)
    path, fd, mapped = _open_mapped(directory, size)
    block = bytes(range(256)) * (BLOCK // 256)
    written = synced = 0
    done = threading.Event()
    progress = threading.Condition()
    failure: list[OSError] = []

    def syncer() -> None:
        nonlocal synced
        dropped = 0
        started = time.monotonic()
        try:
            # One fdatasync every 100 ms, start to start; back to back when one takes longer.
            while not done.wait(max(0.0, started + SYNC_PERIOD_S - time.monotonic())):
                started = time.monotonic()
                covered = written  # the writer only adds: everything up to here is in the file
                os.fdatasync(fd)
                if reuse_cache:
                    _drop_cached(mapped, fd, dropped, covered)
                    dropped = covered
                with progress:
                    synced = covered
                    progress.notify()
        except OSError as exc:  # re-raised on the writer's thread
            failure.append(exc)
            with progress:
                progress.notify()

    thread = threading.Thread(target=syncer, name="ceiling-fdatasync", daemon=True)
    began = time.monotonic()
    deadline = began + seconds
    thread.start()
    try:
        while written + BLOCK <= size and time.monotonic() < deadline and not failure:
            if written - synced > MAX_BACKLOG:
                with progress:  # the syncer updates ``synced`` under this lock, then notifies
                    if written - synced > MAX_BACKLOG and not failure:
                        progress.wait(1.0)
                continue
            mapped[written : written + BLOCK] = block
            written += BLOCK
        done.set()
        thread.join()
        if failure:
            raise failure[0]
        os.fdatasync(fd)
        elapsed = time.monotonic() - began
    finally:
        done.set()
        thread.join()
        mapped.close()
        os.close(fd)
        os.unlink(path)
    return written / elapsed


def _drop_cached(mapped: mmap.mmap, fd: int, start: int, end: int) -> None:
    """Unmap [start, end) (whole blocks, page-aligned) and drop it from the page cache."""
    if end > start:
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)


def fdatasync_rate(
    directory: str | os.PathLike, seconds: float = 2.0, max_bytes: int = 16 * MIB
) -> float:
    """``fdatasync`` calls per second of one writer that appends a small record before each.

    The record is the size of erq's ADD record of a 10 B item, written at the end of the data
    in a preallocated, mapped file as the journal does: one writer's ceiling under
    ``fsync = "always"``. Stops after ``seconds`` or at the end of the file.
    """
    size = _room(directory, max_bytes)
    path, fd, mapped = _open_mapped(directory, size)
    record = bytes(range(1, SMALL_RECORD + 1))
    syncs = pos = 0
    try:
        began = time.monotonic()
        deadline = began + seconds
        while pos + SMALL_RECORD <= size and time.monotonic() < deadline:
            mapped[pos : pos + SMALL_RECORD] = record
            pos += SMALL_RECORD
            os.fdatasync(fd)
            syncs += 1
        elapsed = time.monotonic() - began
    finally:
        mapped.close()
        os.close(fd)
        os.unlink(path)
    return syncs / elapsed
