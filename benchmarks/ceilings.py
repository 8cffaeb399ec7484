"""Machine ceilings: what the disk under the benchmark allows any journal, measured in Python.

Two bars are bounded by the machine as much as by the server. A journal that syncs every
100 ms cannot keep taking more bytes per second than the machine makes durable
(:func:`disk_write_bandwidth`: through the page cache as a journal keeps it, and again with
each synced range dropped from the cache, so that its memory is reused: on a VM whose host
backs guest memory only once it is touched, the first can be several times slower than the
second, and than the disk), nor more than the disk itself takes, written around the page cache
(:func:`direct_write_bandwidth`: the bound on any journal, however it writes), and one writer
that syncs after every record cannot go faster than one ``fdatasync`` at a time
(:func:`fdatasync_rate`). They write the way a journal would (a preallocated file, written in
place, ``os.fdatasync``) but share no code with erq: standard library only. Each is bounded in
time and bytes, and removes its file.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
BLOCK = 64 * KIB  # the value size of the 64 KiB scenario
# Writes around the page cache: a journal doing so would gather records into large aligned
# blocks; here 1 MiB was the fastest (64 KiB direct writes one at a time made a third as much).
DIRECT_BLOCK = MIB
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


def _room(directory: str | os.PathLike, wanted: int, block: int) -> int:
    """``wanted`` bytes, or less so that ``FREE_MARGIN`` stays free; a whole number of blocks."""
    room = min(wanted, shutil.disk_usage(directory).free - FREE_MARGIN) // block * block
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
    size = _room(directory, max_bytes, BLOCK)
    path, fd, mapped = _open_mapped(directory, size)
    block = bytes(range(256)) * (BLOCK // 256)

    def write(pos: int) -> None:
        mapped[pos : pos + BLOCK] = block

    def synced(start: int, end: int) -> None:
        if reuse_cache:
            _drop_cached(mapped, fd, start, end)

    try:
        return _timed_writes(fd, size, BLOCK, seconds, write, synced)
    finally:
        mapped.close()
        os.close(fd)
        os.unlink(path)


def direct_write_bandwidth(
    directory: str | os.PathLike, seconds: float = 3.0, max_bytes: int = 2 * GIB
) -> float:
    """Bytes per second the disk itself takes: ``O_DIRECT`` writes of 1 MiB, around the cache.

    The ceiling of any journal that makes every byte durable, however it writes: one writer,
    ``DIRECT_BLOCK`` aligned writes into a preallocated file (a single writer of 1 MiB blocks
    was as fast here as two or four at once), ``fdatasync`` every 100 ms on another thread for
    the device's own cache. Raises ``OSError`` where the file system refuses ``O_DIRECT``.
    """
    size = _room(directory, max_bytes, DIRECT_BLOCK)
    fd, path = tempfile.mkstemp(prefix="erq-ceiling-", dir=directory)
    os.close(fd)
    buffer = mmap.mmap(-1, DIRECT_BLOCK)  # page-aligned, as O_DIRECT requires
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            os.posix_fallocate(fd, 0, size)
            buffer.write(bytes(range(256)) * (DIRECT_BLOCK // 256))
            return _timed_writes(
                fd, size, DIRECT_BLOCK, seconds, lambda pos: os.pwrite(fd, buffer, pos)
            )
        finally:
            os.close(fd)
    finally:
        buffer.close()
        os.unlink(path)


def _timed_writes(
    fd: int,
    size: int,
    block: int,
    seconds: float,
    write: Callable[[int], object],
    synced: Callable[[int, int], None] | None = None,
) -> float:
    """Call ``write(offset)`` for consecutive blocks while a thread syncs ``fd`` every 100 ms.

    Stops after ``seconds`` or at ``size``; returns the bytes written over the time until the
    final ``fdatasync`` returned. ``synced(start, end)`` runs on the sync thread after each
    periodic sync with the range it newly covered.
    """
    written = covered_by_sync = 0
    done = threading.Event()
    progress = threading.Condition()
    failure: list[OSError] = []

    def syncer() -> None:
        nonlocal covered_by_sync
        started = time.monotonic()
        try:
            # One fdatasync every 100 ms, start to start; back to back when one takes longer.
            while not done.wait(max(0.0, started + SYNC_PERIOD_S - time.monotonic())):
                started = time.monotonic()
                covered = written  # the writer only adds: everything up to here is in the file
                os.fdatasync(fd)
                if synced is not None:
                    synced(covered_by_sync, covered)
                with progress:
                    covered_by_sync = covered
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
        while written + block <= size and time.monotonic() < deadline and not failure:
            if written - covered_by_sync > MAX_BACKLOG:
                with progress:  # the syncer updates ``covered_by_sync`` under this lock
                    if written - covered_by_sync > MAX_BACKLOG and not failure:
                        progress.wait(1.0)
                continue
            write(written)
            written += block
    finally:
        done.set()
        thread.join()
    if failure:
        raise failure[0]
    os.fdatasync(fd)
    return written / (time.monotonic() - began)


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
    size = _room(directory, max_bytes, BLOCK)
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
