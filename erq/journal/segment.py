"""Segment files: creation (preallocated before it is mapped), opening, syncing, closing."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

from ..journal_api import JournalError
from ..open_files import MAPPING_HOLDS_A_DESCRIPTOR
from . import codec
from .format import (
    FORMAT_VERSION,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    REC_VALID,
    SEGMENT_SUFFIX,
    segment_name,
)
from .unlinked import unlinked

log = logging.getLogger("erq.journal")

PAGE = mmap.PAGESIZE
_HEADER_TAIL = struct.Struct("<II")  # crc32c of the first 24 bytes, reserved zero
_ZERO_CHUNK = bytes(1 << 20)
# fdatasync on Linux also writes back the file's dirty mmap pages; elsewhere use msync.
_FDATASYNC_COVERS_MMAP = sys.platform.startswith("linux")
# Mapped without a copy of the descriptor where Python can (3.13): the segment's own is the
# one the syncs, compaction's sendfile and the deleted-file check use.
_MAP_OPTIONS: dict[str, bool] = {} if MAPPING_HOLDS_A_DESCRIPTOR else {"trackfd": False}


class SegmentHeaderError(Exception):
    """The file does not start with a valid segment header."""


class SegmentVersionError(SegmentHeaderError):
    """A sound header of another format version: a journal this erq must not read or change."""


def encode_header(seq: int, flags: int, id_floor: int) -> bytes:
    head = HEADER_STRUCT.pack(MAGIC, FORMAT_VERSION, flags, seq, id_floor)
    return head + _HEADER_TAIL.pack(codec.crc32c(head), 0)


def decode_header(data: bytes) -> tuple[int, int, int]:
    """(flags, seq, id_floor) of a header; SegmentHeaderError if it is not one."""
    if len(data) < HEADER_SIZE:
        raise SegmentHeaderError(f"{len(data)} bytes, shorter than a header")
    head = data[: HEADER_STRUCT.size]
    magic, version, flags, seq, id_floor = HEADER_STRUCT.unpack(head)
    if magic != MAGIC:
        raise SegmentHeaderError(f"bad magic {magic!r}")
    if _HEADER_TAIL.unpack_from(data, HEADER_STRUCT.size)[0] != codec.crc32c(head):
        raise SegmentHeaderError("bad header CRC")
    if version != FORMAT_VERSION:
        raise SegmentVersionError(f"format version {version}, this erq reads {FORMAT_VERSION}")
    return flags, seq, id_floor


# A journal's first segment, and the size an idle, empty queue's journal shrinks back to; the
# sizes double from here up to the segment size as the queue writes.
INITIAL_SEGMENT_SIZE = 64 * 1024


def round_up(n: int, unit: int = PAGE) -> int:
    return (n + unit - 1) // unit * unit


def _preallocate(fd: int, size: int) -> None:
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
        return
    # No fallocate (macOS): write the zeros, which allocates the blocks just as surely.
    written = 0
    while written < size:
        written += os.pwrite(fd, _ZERO_CHUNK[: min(len(_ZERO_CHUNK), size - written)], written)


class Spare:
    """A segment file allocated ahead of need, on a worker thread.

    Allocating a large file can block for tens of milliseconds while the file system reads
    its block bitmaps; a rotation on the event loop would stall every connection for that
    long. A journal allocates its next segment's file as a spare once it starts a segment;
    the rotation then only writes the header and renames it. Its name ends like an
    interrupted creation (``.seg.new``), so recovery deletes one left by a crash.
    """

    __slots__ = ("path", "fd", "size")

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size

    @classmethod
    def allocate(cls, directory: Path, number: int, size: int) -> Spare:
        """Create and allocate ``size`` zero bytes (any thread; raises OSError)."""
        path = directory / f"spare-{number}{SEGMENT_SUFFIX}.new"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _preallocate(fd, size)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        return cls(path, fd, size)

    def discard(self) -> None:
        os.close(self.fd)
        _unlink_quietly(self.path)


def discard_spare(pending: Future) -> None:
    """Done-callback of a spare segment's allocation that nobody will use: remove its file."""
    if not pending.cancelled() and pending.exception() is None:
        pending.result().discard()


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Segment:
    """One journal file, mapped whole. ``used`` is the end of its records.

    The lock serialises ``sync`` (run in fsync threads) with ``close`` (on the loop thread),
    so a file descriptor is never synced after it was closed.

    ``durable_to``: the bytes before it were written by a sync that succeeded. ``redo_from``
    (-1 when none): a sync failed, and the next one must write again from there. A failed
    fdatasync does not leave its pages dirty (Linux marks them clean, data unwritten and still
    in the page cache), so a second fdatasync would report success without writing them.
    """

    __slots__ = (
        "path",
        "seq",
        "flags",
        "id_floor",
        "size",
        "used",
        "mm",
        "durable_to",
        "redo_from",
        "_checked_to",
        "replaced",
        "_fd",
        "_lock",
    )

    def __init__(
        self, path: Path, seq: int, flags: int, id_floor: int, fd: int, mm: mmap.mmap
    ) -> None:
        self.path = path
        self.seq = seq
        self.flags = flags
        self.id_floor = id_floor
        self.size = len(mm)
        self.used = HEADER_SIZE
        self.mm = mm
        self.durable_to = 0
        self.redo_from = -1
        self._checked_to = 0  # records before it were checked by an earlier _write_again
        # A compaction's snapshot holds its records and is in place: the job deletes it next,
        # from its thread, so a sync that finds it deleted owes nothing (set before the unlink).
        self.replaced = False
        self._fd = fd
        self._lock = threading.Lock()

    @classmethod
    def create(
        cls,
        directory: Path,
        seq: int,
        size: int,
        *,
        flags: int = 0,
        id_floor: int = 0,
        spare: Spare | None = None,
    ) -> Segment:
        """A new zero-filled segment of ``size`` bytes, allocated on disk before it is mapped.

        The header is written and the space allocated under a temporary name, then renamed:
        a file named like a segment always has its header. A full disk (or any I/O error)
        raises JournalError and leaves nothing behind, so a later attempt can succeed.
        With a ``spare`` (of at least ``size`` bytes) its file, already allocated, is used.
        """
        path = directory / segment_name(seq)
        if spare is not None:
            tmp, fd, size = spare.path, spare.fd, spare.size
        else:
            tmp = path.with_name(path.name + ".new")
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise JournalError(f"cannot create {tmp}: {exc.strerror}") from exc
        try:
            os.pwrite(fd, encode_header(seq, flags, id_floor), 0)
            if spare is None:
                _preallocate(fd, size)
            mm = mmap.mmap(
                fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, **_MAP_OPTIONS
            )
            os.rename(tmp, path)
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(tmp)
            why = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise JournalError(
                f"cannot allocate journal segment {path} ({size} bytes): {why}"
            ) from exc
        return cls(path, seq, flags, id_floor, fd, mm)

    @classmethod
    def open(cls, path: Path, *, writable: bool, damaged_as: int | None = None) -> Segment:
        """Map an existing segment; SegmentHeaderError if its header is not valid.

        ``damaged_as``: the header is known to be damaged; map the file as plain segment
        ``damaged_as`` (its file name's number), whose records carry their own CRCs, with
        ``id_floor`` 0 until the caller knows better. SegmentHeaderError then only if the
        file is too short to hold any record."""
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if damaged_as is None:
                flags, seq, id_floor = decode_header(os.pread(fd, HEADER_SIZE, 0))
            elif size <= HEADER_SIZE:
                raise SegmentHeaderError(f"{size} bytes, no room for a record")
            else:
                flags, seq, id_floor = 0, damaged_as, 0
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, **_MAP_OPTIONS)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, seq, flags, id_floor, fd, mm)

    def rewrite_header(self) -> None:
        """Write this segment's header from its fields and sync it (raises OSError)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, encode_header(self.seq, self.flags, self.id_floor), 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def zero(self, start: int) -> None:
        """Zero every non-zero byte from ``start`` to the end (a truncated tail)."""
        mm, end, pos = self.mm, self.size, start
        while True:
            nz = codec.first_nonzero(mm, pos, end)
            if nz < 0:
                return
            stop = min(end, nz + len(_ZERO_CHUNK))
            mm[nz:stop] = _ZERO_CHUNK[: stop - nz]
            pos = stop

    def drop_pages(self, start: int = 0, end: int | None = None) -> None:
        """Unmap the pages of [start, end) from the process: they stay in the page cache (dirty
        ones too) and are faulted back in if read again. Keeps resident memory small."""
        if self.closed:
            return
        start = round_up(start)
        end = self.size if end is None else end
        if end > start:
            self.mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def fileno(self) -> int:
        return self._fd

    def unlinked(self) -> bool:
        """True when the file has no name left (deleted under the server): its records then
        live only as long as this mapping. It takes no lock (an fsync can hold it for long):
        call it on the thread that closes segments (the loop's), or under the lock."""
        fd = self._fd
        if fd < 0:
            return False
        return unlinked(fd)

    def sync(self, end: int) -> None:
        """Make the records before ``end`` durable (raises OSError); after a failed sync,
        write them again from ``redo_from`` first."""
        with self._lock:
            if self._fd < 0:
                return
            redo_from = self.redo_from
            if 0 <= redo_from < end:
                self._write_again(redo_from, end)
            if _FDATASYNC_COVERS_MMAP:
                os.fdatasync(self._fd)
            else:
                self.mm.flush()
                os.fsync(self._fd)
            if self.unlinked():  # synced, but no restart can find it
                raise FileNotFoundError(errno.ENOENT, "deleted while the server runs", self.path)
            if redo_from >= 0 and self.redo_from == redo_from:
                self.redo_from = -1
            if end > self.durable_to:
                self.durable_to = end

    def _first_bad_record(self, start: int, end: int) -> int:
        """The offset of the first record in [start, end) (whole records, from a sync's end)
        that is not valid in the mapping, or -1; a damaged header counts as offset 0."""
        mm = self.mm
        if start < HEADER_SIZE:
            try:
                decode_header(mm[:HEADER_SIZE])
            except SegmentHeaderError:
                return 0
            start = HEADER_SIZE
        while start < end:
            status, nxt = codec.check_record(mm, start, end)
            if status != REC_VALID:
                return start
            start = nxt
        return -1

    def sync_failed(self) -> None:
        """A sync of this segment failed: the next one writes everything since the last
        good sync again (on the loop thread, or under the lock)."""
        if self.redo_from < 0 or self.durable_to < self.redo_from:
            self.redo_from = self.durable_to

    def synced(self, end: int) -> None:
        """The fsync worker synced [0, ``end``) (it does not write again: a segment with a
        ``redo_from`` is synced by :meth:`sync` instead)."""
        if self.redo_from < 0 and end > self.durable_to:
            self.durable_to = end

    def _write_again(self, start: int, end: int) -> None:
        """Copy [start, end) from the mapping onto the file, which dirties its pages again:
        the data a failed writeback left in the page cache, clean, is written by the next
        fdatasync. In steps of a megabyte, which bounds the copy held at once.

        Should the kernel have dropped those pages meanwhile (clean pages can be reclaimed),
        the mapping reads back what the disk holds instead: the records there then fail their
        CRC, and the loss is logged here rather than found by the next start only."""
        mm, fd = self.mm, self._fd
        # A disk that keeps failing brings this back every period: check each record once.
        lost = self._first_bad_record(max(start, self._checked_to), end)
        self._checked_to = max(self._checked_to, end)
        if lost >= 0:
            log.error(
                "%s: the records from offset %d to %d were lost by a failed fsync (the page "
                "cache no longer held them; what they held stays queued only until a restart, "
                "which reports them damaged)",
                self.path,
                lost,
                end,
            )
        while start < end:
            stop = min(end, start + len(_ZERO_CHUNK))
            data = mm[start:stop]
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:] if done else data, start + done)
            start = stop

    def close(self) -> None:
        """Unmap and close. Writers and readers of ``mm`` must have released it."""
        with self._lock:
            if self._fd < 0:
                return
            self.mm.close()
            os.close(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __repr__(self) -> str:
        return f"Segment({self.path.name}, seq={self.seq}, used={self.used}/{self.size})"
