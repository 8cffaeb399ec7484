"""Healing: a journal whose files were deleted under the running server writes its live
state again.

An operator's ``rm -rf``, or a tmp cleaner, can delete a queue's directory or segments while
the server has them mapped: appends still land in the mappings, but a restart would find
nothing. The journal notices (each fsync period for the current segment, each sweep for all of
them, and at once when a rotation finds the directory gone), makes the directory again and
writes the live state there as a compaction snapshot. Part of :class:`QueueJournal`, kept
apart because it is its own state machine: found lost, healing, healed (or refusing writes
while no segment with a name can take them).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..journal_api import JournalError
from .compaction import CompactionAborted, SnapshotJob

log = logging.getLogger("erq.journal")

DIR_SETTLE = 0.5  # seconds an unchanged directory mtime must last before it is trusted
HEAL_LOG_EVERY = 60.0  # a heal that keeps failing the same way is logged again after this long


def directory_identity(directory: str | Path) -> tuple[int, ...] | None:
    """(device, inode) of ``directory``; None if it is gone, () if that cannot be told."""
    try:
        st = os.stat(directory)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return ()
    return (st.st_dev, st.st_ino)


class Healing:
    """QueueJournal's part that heals deleted files (a mixin: the state is the journal's)."""

    __slots__ = ()

    def _init_healing(self, directory: Path) -> None:
        # The owner of the live state sets on_lost, called on the loop when the fsync
        # period's check finds the files gone, or a rotation finds their directory gone.
        self.on_lost: Callable[[], object] | None = None
        self._lost = False  # files gone, live state not yet written again
        self._refusing = False  # ... and no segment with a name to append to: appends fail
        self._heal_job: SnapshotJob | None = None
        self._heal_soon = False  # a failed rotation found the directory gone: on_lost is due
        self._heal_logged: tuple[str, float] = ("", 0.0)
        self._dir_path = os.fspath(directory)  # a str: os.stat converts a Path for ~4 us
        self._dir_id = directory_identity(self._dir_path)
        # The directory's mtime at the thorough checks (see _missing_path): first seen when,
        # and unchanged for long enough that its segments need no asking.
        self._dir_mtime: int | None = None
        self._dir_seen_at = 0.0
        self._dir_settled = False

    def files_lost(self, thorough: bool = True) -> bool:
        """True from the moment the journal finds its files deleted (by an operator, or a tmp
        cleaner, while the server runs) until :meth:`heal` has written the live state again:
        meanwhile its records are only in mappings of files a restart cannot find.

        ``thorough``: check the directory and every segment (the sweep's check, about once a
        second); else only the current segment (each fsync period). One ERROR line names the
        queue and the path found gone. On the loop thread.
        """
        if self._lost:
            return True
        if self._closed:
            return False
        gone = self._missing_path(thorough)
        if gone is None:
            return False
        self._lost = True
        log.error(
            "queue %s: %s was deleted while the server runs; writing the queue's live state "
            "again in %s",
            self.directory.name,
            gone,
            self.directory,
        )
        return True

    def _directory_gone(self) -> None:
        """A new segment could not be made because its directory is gone: have the owner
        heal the journal on the loop's next pass (not inside this append), rather than at
        the next fsync period's or sweep's check, with every write refused until then."""
        commit, on_lost = self._commit, self.on_lost
        if commit is None or on_lost is None or self._lost or self._heal_soon:
            return
        self._heal_soon = True
        commit.loop.call_soon(self._heal_if_lost)

    def _heal_if_lost(self) -> None:
        self._heal_soon = False
        if not self._closed and self.on_lost is not None and self.files_lost():
            self.on_lost()

    def check_current(self) -> None:
        """Each fsync period: the current segment must still have a name; if not, call
        ``on_lost`` (whose owner heals the journal with its live state)."""
        if not self._lost and self.files_lost(thorough=False) and self.on_lost is not None:
            self.on_lost()

    def _missing_path(self, thorough: bool) -> Path | None:
        """The first of the journal's paths that is gone, or None.

        The thorough check asks every segment only while the directory changes: unlinking or
        renaming a file sets its directory's mtime, so once checks DIR_SETTLE seconds apart
        have found the same mtime and every segment named, a change since would have given
        another mtime (the wait rules out one made within the clock tick of the mtime read
        first, which could leave it as it was). An idle queue then costs one stat a sweep."""
        self._poll_compaction()
        mtime = None
        if thorough:
            try:
                st = os.stat(self._dir_path)
            except (FileNotFoundError, NotADirectoryError):
                return self.directory
            except OSError:  # cannot tell: ask the segments
                pass
            else:
                here = (st.st_dev, st.st_ino)
                if self._dir_id and here != self._dir_id:
                    return self.directory  # another directory in its place
                if not self._dir_id:
                    self._dir_id = here
                mtime = st.st_mtime_ns
                if self._dir_settled and mtime == self._dir_mtime:
                    return None
            segments = self._segments
        else:
            segments = self._segments[-1:]
        job = self._job
        passing = set(job.old_segments) if job is not None else ()  # a compaction unlinks them
        for segment in segments:
            if segment not in passing and segment.unlinked():
                return segment.path
        if thorough:
            now = time.monotonic()
            if mtime is None or mtime != self._dir_mtime:
                self._dir_mtime, self._dir_seen_at, self._dir_settled = mtime, now, False
            else:
                self._dir_settled = now - self._dir_seen_at >= DIR_SETTLE
        return None

    def heal(self, open_items: Sequence, memory_items: Sequence) -> None:
        """After :meth:`files_lost`: make the directory again and write the live state there
        (arguments as for :meth:`compact`) as a compaction snapshot: written beside, fsynced,
        renamed, so a crash meanwhile loses nothing that a crash before could keep. The items
        only on disk are copied from the deleted files, still mapped; those are released
        once the snapshot is in place. A failure is logged and leaves ``files_lost`` true for
        the next call to try again; while no segment with a name takes appends, they raise
        JournalError (SERVER_ERROR) rather than go where a restart cannot find them."""
        self._poll_compaction()
        if not self._lost or self._closed:
            return
        job = self._job
        if job is not None:
            if job is self._heal_job:
                return  # under way
            self._stop_compaction()  # its snapshot would go to the old directory, or nowhere
        try:
            self._make_directory()
            self._drop_spare()
            self._refusing = False
            self._heal_job = self._start_snapshot(list(open_items), list(memory_items))
        except (OSError, JournalError) as exc:
            self._heal_failed(exc)
        else:
            self._needs_rewrite = False  # the snapshot holds no damaged record either
            # The deleted segments can never be synced where a restart looks: what they hold
            # goes into the snapshot, which is synced before it replaces them. Kept pending,
            # they would fail the sync of every append made meanwhile, in the new segment.
            self._unsynced = [segment for segment in self._unsynced if not segment.unlinked()]

    def _make_directory(self) -> None:
        """The queue's directory again (its parent is not made: a data directory that is
        gone is the operator's to restore)."""
        try:
            os.mkdir(self.directory)
        except FileExistsError:
            pass
        else:
            if self.directory.parent not in self._dirs_unsynced:
                self._dirs_unsynced.append(self.directory.parent)
        self._dir_id = directory_identity(self._dir_path)
        self._dir_mtime, self._dir_settled = None, False

    def _heal_failed(self, exc: BaseException) -> None:
        """Stop appending into a file without a name, and say why (again only after a while,
        or if the reason changes)."""
        if self._writer is not self._null_writer and self._segments[-1].unlinked():
            self._seal_current()
        self._refusing = self._writer is self._null_writer
        if isinstance(exc, CompactionAborted):
            return  # closed or deleted meanwhile: nothing to say
        why, now = str(exc), time.monotonic()
        last, at = self._heal_logged
        if why != last or now - at >= HEAL_LOG_EVERY:
            self._heal_logged = (why, now)
            log.error(
                "queue %s: cannot write its deleted journal again in %s (%s); trying again%s",
                self.directory.name,
                self.directory,
                why,
                ", refusing writes meanwhile" if self._refusing else "",
            )

    def _healed(self) -> None:
        self._lost = self._refusing = False
        self._heal_logged = ("", 0.0)
        log.info(
            "queue %s: its live state is in %s again; the deleted files are released",
            self.directory.name,
            self.directory,
        )
