"""The segment range: which segment numbers a queue's journal must hold.

Compaction and release delete a journal's oldest segments, so a journal may start at any
number, and its newest segment has no successor to vouch for it: a lost first or last file
looks like a journal that simply starts or ends there. The range says where it starts and
ends. It is an empty file in the queue's directory whose *name* holds the two numbers,
``<first:016x>-<last:016x>.range``; changing it is one rename. A rename replaces one name by
the other atomically (never both, never neither, even across a crash), and an empty file
has no content that could reach the disk after its name: nothing to fsync but the directory,
which the journal's next sync does anyway, as it does for the segment names themselves.

The journal renames it only when segments come or go, never per record, and in the order
that keeps every crash point free of false alarms:

- a new segment first gets its name, then the range grows to it (a crash between leaves a
  segment past ``last``: not a loss, and nothing was written in it yet);
- before the oldest segments are deleted (release, an empty queue's history) ``first``
  moves past them (a crash between leaves segments before ``first``: replayed, harmlessly,
  as an interrupted release always was);
- a compaction snapshot supersedes every older segment: recovery counts from the latest
  snapshot when ``first`` is lower (the snapshot's thread deletes the old segments before
  the loop moves ``first`` to it).

Recovery reports every number from ``first`` to ``last`` with no segment, besides those
accounted for (set aside as damaged, the number a compaction that did not finish left
unused). A journal without a range (written before it existed) gets one when it is opened,
from the segments found, and nothing is reported. The renames rely on the file system
keeping the order of one directory's name changes across a power cut, as journaling file
systems (ext4, XFS, btrfs) do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

RANGE_SUFFIX = ".range"
_HEX_DIGITS = frozenset("0123456789abcdef")


class SegmentRange(NamedTuple):
    first: int
    last: int

    @property
    def name(self) -> str:
        return f"{self.first:016x}-{self.last:016x}{RANGE_SUFFIX}"


def parse_range_name(name: str) -> SegmentRange | None:
    """The range a file name states (exactly as ``SegmentRange.name`` writes it), or None."""
    if not name.endswith(RANGE_SUFFIX):
        return None
    stem = name[: -len(RANGE_SUFFIX)]
    first, dash, last = stem.partition("-")
    if not dash or len(first) != 16 or len(last) != 16:
        return None
    if not _HEX_DIGITS.issuperset(first) or not _HEX_DIGITS.issuperset(last):
        return None
    found = SegmentRange(int(first, 16), int(last, 16))
    return found if found.first <= found.last else None


def pick_range(found: list[SegmentRange]) -> SegmentRange | None:
    """The range to trust among those found: a crash never leaves two (a rename), so more
    than one was put there by hand; the newest (highest ``last``, then ``first``) raises
    the fewest alarms."""
    return max(found, default=None)


def several_ranges(directory: Path, ranges: list[SegmentRange]) -> str | None:
    """The report of more than one range file in ``directory``, or None."""
    if len(ranges) < 2:
        return None
    names = ", ".join(r.name for r in sorted(ranges))
    return f"{directory}: several range files ({names}): {pick_range(ranges).name} is kept"


def write_range(directory: Path, old: SegmentRange | None, new: SegmentRange) -> None:
    """Replace the range file ``old`` (None: there is none yet) by ``new``: one rename, or
    a creation when ``old`` is None or was deleted. Raises OSError."""
    path = directory / new.name
    if old is not None:
        if old == new:
            return
        try:
            os.rename(directory / old.name, path)
            return
        except FileNotFoundError:
            pass  # deleted by hand, or its directory was made again (a heal)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
