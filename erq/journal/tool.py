"""The journal tools behind ``erq journal dump|check|pack``.

``dump`` and ``check`` only read, and work on the directory of a running server too (a
record it is appending is looked at again); ``pack`` needs the server stopped (it takes the
data directory's lock), opens each queue's journal exactly as the server would (recovery
included) and compacts it. Each writes its report to ``out`` and, when it
cannot do its work at all (exit status 2), says why on ``err`` (``out`` if not given).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import TextIO

from .. import datadir
from ..datadir import DELETING_PREFIX, DataDirBusy
from ..journal_api import JournalError
from . import codec
from .format import (
    HEADER_FLAG_SNAPSHOT,
    HEADER_SIZE,
    OP_ADD,
    OPCODE_NAMES,
    SEGMENT_SUFFIX,
    parse_segment_name,
    segment_name,
)
from .journal import QueueJournal
from .recovery import (
    DAMAGED_SUFFIX,
    HEADER_SUFFIX,
    Listing,
    Problem,
    SegmentScan,
    classify,
    missing_segments,
)
from .segment import Segment, SegmentHeaderError, SegmentVersionError
from .segrange import RANGE_SUFFIX, pick_range, several_ranges

_REPR_BYTES = 32


def _segment_paths(directory: Path) -> list[Path]:
    found = []
    for entry in os.scandir(directory):
        seq = parse_segment_name(entry.name)
        if seq is not None and entry.is_file():
            found.append((seq, Path(entry.path)))
    return [path for _, path in sorted(found)]


_LISTINGS = 20


def _queue_files(directory: Path) -> Listing:
    """One consistent look at a queue's directory (read only). On the directory of a running
    server, a rotation or a release renames the range file and creates or deletes segments
    while it is listed: it is listed again until two listings in a row agree."""
    entries = None
    for _ in range(_LISTINGS):
        again = sorted((entry.name, entry.is_file()) for entry in os.scandir(directory))
        if again == entries:
            break
        entries = again
    return classify(directory, entries)


def _not_a_directory(path: Path, err: TextIO) -> bool:
    """Say why ``path`` cannot be worked on, if it is not a directory."""
    if path.is_dir():
        return False
    why = "not a directory" if path.exists() else "no such directory"
    err.write(f"{path}: {why}\n")
    return True


def _queue_dirs(data_dir: Path) -> list[Path]:
    """Every directory under ``data_dir`` holding journal files (``data_dir`` itself too)."""
    subdirs = sorted(
        p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(DELETING_PREFIX)
    )
    return [directory for directory in [data_dir, *subdirs] if _holds_journal(directory)]


def _holds_journal(directory: Path) -> bool:
    """Whether ``directory`` is a queue's: it holds a segment, one set aside, or a range file
    (a queue whose segments are all lost keeps its range file)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:  # a queue deleted meanwhile (on a live directory)
        return False
    return any(name.endswith((SEGMENT_SUFFIX, DAMAGED_SUFFIX, RANGE_SUFFIX)) for name in names)


def _live_from(segments: list[Segment]) -> int:
    """Index of the first segment replay reads (the last snapshot; older ones are superseded)."""
    for i in range(len(segments) - 1, -1, -1):
        if segments[i].flags & HEADER_FLAG_SNAPSHOT:
            return i
    return 0


def _open_all(paths: list[Path], out: TextIO) -> tuple[list[Segment], int]:
    """Every segment mapped, one with a damaged header as recovery reads it (a plain segment
    numbered by its file name), and the number of bad headers (each reported)."""
    segments: list[Segment] = []
    bad = 0
    try:
        for path in paths:
            bad += _open_one(path, segments, out)
    except BaseException:
        for seg in segments:
            seg.close()
        raise
    return segments, bad


def _open_one(path: Path, segments: list[Segment], out: TextIO) -> int:
    """Map one segment into ``segments`` as ``_open_all`` says; 1 if its header is bad."""
    try:
        seg = Segment.open(path, writable=False)
    except SegmentVersionError as exc:
        out.write(f"{path}: {exc}: not read\n")
        return 1
    except SegmentHeaderError as exc:
        try:
            segments.append(
                Segment.open(path, writable=False, damaged_as=parse_segment_name(path.name))
            )
        except SegmentHeaderError as short:  # no room for a record: nothing to read in it
            out.write(
                f"{path}: bad segment header ({exc}; {short}): recovery sets the file aside "
                f"as {path.name}{DAMAGED_SUFFIX}, what it held is lost\n"
            )
        else:
            out.write(f"{path}: bad segment header ({exc})\n")
        return 1
    else:
        if seg.seq == parse_segment_name(path.name):
            segments.append(seg)
            return 0
        # A sound header naming another segment: a misplaced file, which recovery sets
        # aside unread (a copy of another segment would replay its records twice).
        out.write(
            f"{path}: bad segment header (header names segment {seg.seq}): a misplaced "
            "file, which recovery sets aside unread\n"
        )
        seg.close()
        return 1


def _list_and_open(directory: Path, out: TextIO) -> tuple[Listing, list[Segment], int]:
    """The queue's files (``_queue_files``) and its segments mapped (``_open_all``), as one
    consistent look. On the directory of a running server a segment listed can be gone before
    it is opened (released as the head passed it, or replaced by a compaction's snapshot): the
    directory is then listed again, so that a live check or dump does not fail on it. Raises
    FileNotFoundError only if the directory keeps changing under it."""
    for attempt in range(_LISTINGS):
        listing = _queue_files(directory)
        said = io.StringIO()  # the bad headers of this attempt: said once it has worked
        try:
            segments, bad = _open_all([path for _, path in listing.found], said)
        except FileNotFoundError:
            if attempt == _LISTINGS - 1:
                raise
            continue
        out.write(said.getvalue())
        return listing, segments, bad
    raise AssertionError("unreachable")


def _skim(mm, start: int, end: int) -> tuple[int, int]:
    """Read past valid records without decoding them (check only looks for damage)."""
    records = codec.iter_records(mm, start, end, False)
    for _ in records:
        pass
    return records.status, records.position


def _short(data: bytes) -> str:
    text = repr(data[:_REPR_BYTES])
    return text + ("..." if len(data) > _REPR_BYTES else "")


def dump(queue_dir: str | os.PathLike, out: TextIO, err: TextIO | None = None) -> int:
    """Print every record of one queue's journal, one line each; 1 if anything is damaged."""
    err = out if err is None else err
    directory = Path(queue_dir)
    if _not_a_directory(directory, err):
        return 2
    (found, _, aside, ranges), segments, damaged = _list_and_open(directory, out)
    if not found and not ranges:
        err.write(
            f"{directory}: no journal segments here (dump takes a queue's directory, "
            "DATA_DIR/QUEUE)\n"
        )
        return 2
    # A running server may be writing a record at the end of the last segment (dump works on
    # a live directory): a torn record there is looked at again, as check does.
    live_server = datadir.in_use(directory.resolve().parent)
    try:
        first = _live_from(segments)
        for index, seg in enumerate(segments):
            kind = "snapshot" if seg.flags & HEADER_FLAG_SNAPSHOT else "segment"
            note = " (superseded by a later snapshot)" if index < first else ""
            out.write(
                f"# {seg.path.name}: {kind} seq={seg.seq} id_floor={seg.id_floor} "
                f"size={seg.size}{note}\n"
            )
            scan = SegmentScan(seg.mm, data=True)
            records, problems = list(scan), scan.problems
            if live_server and index == len(segments) - 1:
                records, problems = _records_unless_being_written(seg, records, problems)
            reported = 0
            for offset, op, id, flags, add_time, expiry, data in records:
                while reported < len(problems) and problems[reported].offset < offset:
                    out.write(_describe(problems[reported], seg.path) + "\n")
                    reported += 1
                name = OPCODE_NAMES[op]
                if op == OP_ADD:
                    out.write(
                        f"{offset:>10} {name:<8} id={id} flags={flags} add_time={add_time} "
                        f"expiry={expiry} len={len(data)} data={_short(data)}\n"
                    )
                else:
                    out.write(f"{offset:>10} {name:<8} id={id}\n")
            for problem in problems[reported:]:
                out.write(_describe(problem, seg.path) + "\n")
            damaged += len(problems)
        expected = pick_range(ranges)
        if expected is not None:
            out.write(
                f"# {expected.name}: the journal holds segments "
                f"{segment_name(expected.first)} to {segment_name(expected.last)}\n"
            )
        several = several_ranges(directory, ranges)
        if several is not None:
            out.write(f"# {several}\n")
            damaged += 1
        # As recovery: a file there is no missing segment, even one it sets aside unread.
        accounted = aside.union(seq for seq, _ in found)
        gaps = missing_segments(directory, segments[first:], accounted, expected)
        for gap in gaps:
            out.write(f"# {gap.describe()}\n")
        damaged += len(gaps)
    finally:
        for seg in segments:
            seg.close()
    return 1 if damaged else 0


def _describe(problem, path: Path) -> str:
    """A problem as seen offline: nothing has been truncated or skipped yet."""
    if problem.resume < 0:
        return f"{path}: torn record at offset {problem.offset} (recovery truncates it)"
    return problem.describe(path)


def check(data_dir: str | os.PathLike, out: TextIO, err: TextIO | None = None) -> int:
    """Verify every journal under ``data_dir``: 0 clean, 1 damage (a line per problem)."""
    err = out if err is None else err
    root = Path(data_dir)
    if _not_a_directory(root, err):
        return 2
    problems = checked = 0
    queues = []
    # A running server appends to these journals (check works on a live directory): the end
    # of a queue's last segment may hold a record being written.
    live_server = datadir.in_use(root.resolve().parent if _holds_journal(root) else root)
    for directory in _queue_dirs(root):
        said = io.StringIO()  # said once the queue is seen whole
        try:
            found = _check_queue(directory, said, live_server)
        except FileNotFoundError:
            if directory.exists():
                raise
            found = None
        if found is None or not directory.exists():
            continue  # a queue deleted while it was checked (on a live directory)
        out.write(said.getvalue())
        problems += found[0]
        checked += found[1]
        queues.append(directory)
    if not queues:
        out.write(f"{root}: no queue journals here (check takes a data directory)\n")
    verdict = "clean" if not problems else f"{problems} problem(s)"
    out.write(f"checked {checked} segment(s) of {len(queues)} queue(s): {verdict}\n")
    return 1 if problems else 0


def _scan(seg: Segment, start: int) -> list[Problem]:
    """The damage in ``seg`` from ``start`` on."""
    scan = SegmentScan(seg.mm, start=start)
    scan.run(lambda begin, end, mm=seg.mm: _skim(mm, begin, end))
    return scan.problems


_SETTLE_TRIES = 100  # looks, 10 ms apart, at a torn record ending a live journal


def _unless_being_written(seg: Segment, found: list[Problem]) -> list[Problem]:
    """``found`` in the last segment of a journal a running server appends to, without a torn
    record at its end that was a write in progress: the end is looked at again until the
    record there is whole (the server's start truncated any torn tail a crash had left, so a
    torn record there is one being written, unless it stays torn)."""
    for _ in range(_SETTLE_TRIES):
        if not found or found[-1].resume >= 0:
            break
        time.sleep(0.01)
        found = found[:-1] + _scan(seg, found[-1].offset)
    return found


def _records_unless_being_written(
    seg: Segment, records: list[tuple], found: list[Problem]
) -> tuple[list[tuple], list[Problem]]:
    """``_unless_being_written`` for dump: the records read past the torn end once it is
    whole are added to ``records``."""
    for _ in range(_SETTLE_TRIES):
        if not found or found[-1].resume >= 0:
            break
        time.sleep(0.01)
        tail = SegmentScan(seg.mm, data=True, start=found[-1].offset)
        records = records + list(tail)
        found = found[:-1] + tail.problems
    return records, found


def _check_queue(directory: Path, out: TextIO, live_server: bool) -> tuple[int, int]:
    """Check one queue's journal: the problems found (each said on ``out``) and the segments
    read. FileNotFoundError if the directory goes away meanwhile. ``live_server``: a server
    holds the data directory, and may be writing a record at the end of the last segment."""
    problems = checked = 0
    for path in directory.iterdir():
        if path.name.endswith(HEADER_SUFFIX):
            out.write(f"{path}: a damaged header, replaced by recovery and kept here\n")
            problems += 1
        elif path.name.endswith(DAMAGED_SUFFIX):
            out.write(f"{path}: segment set aside by recovery (bad header)\n")
            problems += 1
    (found, _, aside, ranges), segments, bad = _list_and_open(directory, out)
    accounted = aside.union(seq for seq, _ in found)  # as recovery: a file there is not missing
    problems += bad
    try:
        live = segments[_live_from(segments) :]
        for seg in live:
            found = _scan(seg, HEADER_SIZE)
            if live_server and seg is live[-1]:
                found = _unless_being_written(seg, found)
            for problem in found:
                out.write(_describe(problem, seg.path) + "\n")
            problems += len(found)
            checked += 1
        several = several_ranges(directory, ranges)
        if several is not None:
            out.write(several + "\n")
            problems += 1
        for gap in missing_segments(directory, live, accounted, pick_range(ranges)):
            out.write(gap.describe() + "\n")
            problems += 1
    finally:
        for seg in segments:
            seg.close()
    return problems, checked


def pack(data_dir: str | os.PathLike, out: TextIO, err: TextIO | None = None) -> int:
    """Compact every queue's journal under ``data_dir`` (recovering each first), or the one
    queue's if ``data_dir`` is a queue's directory: 0 packed, 1 if a journal could not be
    packed or had damage (repaired as a start repairs it, each problem reported): the
    snapshot no longer shows it, so ``pack && check`` must not pass for clean."""
    err = out if err is None else err
    root = Path(data_dir)
    if _not_a_directory(root, err):
        return 2
    # A queue's directory is packed under its data directory's lock, the one a server holds:
    # a lock taken in the queue's directory would stop nobody.
    # A data directory holds queues' directories; a queue's holds journal files, if only its
    # range file (its segments all lost): it is still a queue's, under its parent's lock.
    one_queue = _holds_journal(root)
    lock_dir = root.resolve().parent if one_queue else root
    try:
        held = datadir.lock(lock_dir, who="erq journal pack")
    except DataDirBusy as exc:  # a server appends to these journals: packing them loses items
        err.write(f"{exc.strerror}: stop it first\n")
        return 2
    except OSError as exc:  # cannot even create the lock file: nothing could be rewritten
        err.write(f"{lock_dir}: cannot lock it: {exc.strerror or exc}\n")
        return 2
    try:
        if not one_queue:
            datadir.remove_leftovers(root)
        return _pack_all(root, out)
    finally:
        held.release()


def _pack_all(root: Path, out: TextIO) -> int:
    status = 0
    for directory in _queue_dirs(root):
        before = sum(path.stat().st_size for path in _segment_paths(directory))
        try:
            # No item is read into memory (an empty one neither: each costs a byte here), so
            # the snapshot copies the live records as they are, and a queue of any depth
            # costs a few bytes of memory per item.
            journal, recovery = QueueJournal.open(
                directory, fsync="never", max_memory_size=0, item_overhead=1
            )
        except (JournalError, OSError) as exc:
            out.write(f"{directory}: cannot open: {exc}\n")
            status = 1
            continue
        for warning in recovery.warnings:
            out.write(f"{warning}\n")
        if recovery.warnings:
            status = 1
        items = len(recovery.items) + recovery.disk_items
        records_before = journal.used_bytes
        try:
            records_after = journal.pack(recovery.items)  # and closes it
            error = journal.last_compaction_error
        except JournalError as exc:
            error = exc
            records_after = records_before  # the old segments are still the journal
        if error is not None:  # it says which directory
            out.write(f"{error}\n")
            status = 1
        after = sum(path.stat().st_size for path in _segment_paths(directory))
        out.write(
            f"{os.path.basename(os.path.abspath(directory))}: {items} item(s), records {records_before:,} -> "
            f"{records_after:,} bytes, files {before:,} -> {after:,} bytes\n"
        )
    return status
