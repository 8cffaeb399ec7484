"""Compaction snapshots: the live state of a queue, written beside the journal in a thread.

A snapshot is a segment with the SNAPSHOT header flag. The journal first rotates (new appends
go to a fresh segment numbered after the snapshot), then this job writes, in order: an ADD
for every open read followed by an OPEN for each, the items held in memory, and the
not-in-memory items copied record by record from the old segments (streamed, never all in
RAM). Then: fsync, rename into place, fsync the directory, delete the old segments.

Crash safety: until the rename the snapshot is a ``.tmp`` file that recovery deletes, and the
old segments are intact. From the rename on, replay starts at the snapshot and skips (and
deletes) every older segment, so nothing is lost and nothing is replayed twice.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from array import array
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..datadir import fsync_directory
from ..startsignals import in_worker_thread
from . import codec
from .format import HEADER_FLAG_SNAPSHOT, OP_OPEN, segment_name
from .segment import Segment, encode_header

log = logging.getLogger("erq.journal")

_U32 = struct.Struct("<I")
_BUFFER = 1 << 20
_ABORT_CHECK = 1024  # items between checks of the abort flag
_DROP_EVERY = 4096  # disk items whose lengths are read between two drops of mapped pages


class CompactionAborted(Exception):
    pass


# The file-system steps, one function each (tests make each one fail in turn).
def _fsync_file(fd: int) -> None:
    os.fsync(fd)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _fsync_dir(directory: Path) -> None:
    fsync_directory(directory)


def _unlink(path: Path) -> None:
    os.unlink(path)


class SnapshotJob:
    """Writes one snapshot on a thread; the journal swaps it in when ``done`` is set."""

    def __init__(
        self,
        directory: Path,
        seq: int,
        id_floor: int,
        open_items: Sequence,
        memory_items: Sequence,
        disk_runs: list[tuple[Segment, Iterable[int]]],
        old_segments: list[Segment],
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.directory = directory
        self.seq = seq
        self.id_floor = id_floor
        self._open_items = open_items
        self._memory_items = memory_items
        self._disk_runs = disk_runs
        self.old_segments = old_segments  # replaced by the snapshot; deleted once it is in place
        self._old_paths = [segment.path for segment in old_segments]
        self._on_done = on_done
        self._abort = False
        self._thread: threading.Thread | None = None
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.segment: Segment | None = None  # the snapshot, mapped, once it is in place
        self.offsets = array("Q")  # where the copied not-in-memory items now are
        self.size = 0

    @property
    def tmp_path(self) -> Path:
        return self.directory / (segment_name(self.seq) + ".tmp")

    def start(self) -> None:
        self._thread = threading.Thread(
            target=in_worker_thread(self.run),
            name=f"erq-compact-{self.directory.name}",
            daemon=True,
        )
        self._thread.start()

    def abort(self) -> None:
        """Give up if the rename has not happened yet (the old segments stay valid)."""
        self._abort = True

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def run(self) -> None:
        tmp = self.tmp_path
        final = self.directory / segment_name(self.seq)
        renamed = False
        try:
            self.size = self._write(tmp)
            if self._abort:
                raise CompactionAborted
            _rename(tmp, final)
            renamed = True
            self.segment = Segment.open(final, writable=False)
            try:
                _fsync_dir(self.directory)
            except OSError as exc:
                # The snapshot is in place but maybe not durable yet: keep the old segments
                # on disk (a restart deletes them, superseded) rather than risk both.
                log.warning("compaction of %s: directory fsync failed (%s)", self.directory, exc)
            else:
                for segment in self.old_segments:
                    segment.replaced = True  # before the unlink a sync may find (journal.py)
                for path in self._old_paths:
                    try:
                        _unlink(path)
                    except FileNotFoundError:
                        pass
        except BaseException as exc:
            if not renamed:
                self.error = exc
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            elif self.segment is None:
                self.error = exc
            else:
                log.warning("compaction of %s: cleanup failed (%s)", self.directory, exc)
        finally:
            self._open_items = self._memory_items = ()
            self._disk_runs = []
            self.done.set()
            if self._on_done is not None:
                self._on_done()

    def _check_abort(self, n: int) -> None:
        if n % _ABORT_CHECK == 0 and self._abort:
            raise CompactionAborted

    def _write(self, path: Path) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            out = _Output(fd)
            out.write(encode_header(self.seq, HEADER_FLAG_SNAPSHOT, self.id_floor))
            encode_add = codec.encode_add
            for item in self._open_items:
                out.write(encode_add(item.id, item.flags, item.add_time, item.expiry, item.data))
            for item in self._open_items:
                out.write(codec.encode_op(OP_OPEN, item.id))
            items = self._memory_items  # the job's own list (QueueJournal.compact copies it)
            for n in range(len(items)):
                item = items[n]
                items[n] = None  # written: the queue may drain it and free its memory now
                out.write(encode_add(item.id, item.flags, item.add_time, item.expiry, item.data))
                self._check_abort(n + 1)
            offsets = self.offsets
            n = 0
            for segment, offs in self._disk_runs:
                mm = segment.mm
                start = end = -1
                for off in offs:
                    if off != end:  # copy runs of consecutive records in one go
                        out.copy(segment, start, end)
                        start = end = off
                    size = 8 + _U32.unpack_from(mm, off)[0]
                    end += size
                    offsets.append(out.pos)
                    out.pos += size
                    n += 1
                    self._check_abort(n)
                    if n % _DROP_EVERY == 0:
                        # The length reads map the run's pages: give them back as it goes,
                        # a run may span a whole (snapshot-sized) segment.
                        segment.drop_pages()
                out.copy(segment, start, end)
                segment.drop_pages()  # the length reads above mapped some of its pages
            out.flush()
            _fsync_file(fd)
            return out.pos
        finally:
            os.close(fd)


class _Output:
    """Writes to a file descriptor: encoded records through a buffer, runs of records
    copied from a segment file by the kernel (no copy through this process).

    ``pos`` is the file offset of the next byte, counting copies not yet made."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data
        self.pos += len(data)
        if len(self._buffer) >= _BUFFER:
            self.flush()

    def flush(self) -> None:
        view = memoryview(self._buffer)
        while view:
            view = view[os.write(self.fd, view) :]
        view.release()
        self._buffer.clear()

    def copy(self, segment: Segment, start: int, end: int) -> None:
        """Append [start, end) of ``segment``; ``pos`` already counts these bytes."""
        if start >= end:
            return
        self.flush()
        try:
            while start < end:
                sent = os.sendfile(self.fd, segment.fileno(), start, end - start)
                if sent == 0:
                    raise OSError(f"{segment.path} ends before offset {end}")
                start += sent
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP):
                raise
            while start < end:  # no file-to-file sendfile here: copy through the mapping
                stop = min(end, start + _BUFFER)
                self._buffer += segment.mm[start:stop]
                self.flush()
                start = stop
