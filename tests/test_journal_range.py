"""The segment range (segrange.py): a lost first or last segment file is reported as a lost
middle one is, and no crash point or normal reclaim raises a false alarm (both builds)."""

from __future__ import annotations

import io
import os
import shutil

import pytest
from test_journal_support import KiB, added_ids, all_items, segment_files, use_codec

from erq.journal import QueueJournal, compaction, tool
from erq.journal.segrange import RANGE_SUFFIX, SegmentRange, parse_range_name

SEGMENT = 4 * KiB
WHY = "what it held is lost (the items it added; the items it removed come back)"


@pytest.fixture
def codec(impl, monkeypatch):
    return use_codec(impl, monkeypatch)


def open_journal(directory):
    return QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)


def written(directory, n_items: int = 300) -> list:
    """A journal of ``n_items`` items of 100 bytes over several segments; its files."""
    journal, _ = open_journal(directory)
    for i in range(1, n_items + 1):
        journal.add(i, 0, 0, 0, b"r" * 100)
    journal.close()
    files = segment_files(directory)
    assert len(files) >= 6
    return files


def range_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(RANGE_SUFFIX))


def stated(directory) -> SegmentRange:
    [name] = range_files(directory)
    return parse_range_name(name)


def reopened(directory) -> tuple[list[str], list[int]]:
    """(warnings, ids) of a restart of the journal in ``directory``."""
    journal, rec = open_journal(directory)
    try:
        return rec.warnings, [it.id for it in all_items(journal, rec)]
    finally:
        journal.close()


def check(directory) -> tuple[int, str]:
    out = io.StringIO()
    return tool.check(directory, out), out.getvalue()


def test_the_range_file_names_the_first_and_last_segment(codec, tmp_path):
    directory = tmp_path / "q"
    files = written(directory)
    assert range_files(directory) == [f"0000000000000001-{len(files):016x}.range"]
    assert stated(directory) == SegmentRange(1, len(files))


@pytest.mark.parametrize("lost", ["first", "first two", "last", "last two"])
def test_a_lost_first_or_last_segment_is_reported_and_the_rest_recovered(codec, tmp_path, lost):
    directory = tmp_path / "q"
    files = written(directory)
    gone = {"first": files[:1], "first two": files[:2], "last": files[-1:], "last two": files[-2:]}
    gone = gone[lost]
    lost_ids = set().union(*(added_ids(path) for path in gone))
    for path in gone:
        path.unlink()
    names = gone[0].name if len(gone) == 1 else f"{gone[0].name} to {gone[-1].name}"
    if lost.startswith("first"):
        where = f"before {files[len(gone)].name}, the first one left"
    else:
        where = f"after {files[-len(gone) - 1].name}, the last one left"
    report = f"{directory}: segment {names} missing {where}: {WHY}"

    assert check(directory)[0] == 1 and report in check(directory)[1]
    out = io.StringIO()
    assert tool.dump(directory, out) == 1 and f"# {report}" in out.getvalue()
    journal, rec = open_journal(directory)
    assert rec.warnings == [report]
    items = all_items(journal, rec)
    assert lost_ids and [it.id for it in items] == [i for i in range(1, 301) if i not in lost_ids]
    journal.add(301, 0, 0, 0, b"after")  # a lost number is never made again
    journal.close()
    assert (directory / gone[-1].name).exists() is False
    warnings, _ = reopened(directory)
    assert len(warnings) == 1 and names in warnings[0]  # until compaction rewrites the journal

    journal, rec = open_journal(directory)
    journal.compact([], all_items(journal, rec), wait=True)
    journal.close()
    assert reopened(directory) == ([], [it.id for it in items] + [301])
    assert check(directory)[0] == 0


def test_a_journal_with_every_segment_lost_is_reported(codec, tmp_path):
    directory = tmp_path / "q"
    files = written(directory)
    for path in files:
        path.unlink()
    report = (
        f"{directory}: segment {files[0].name} to {files[-1].name} missing and no segment "
        f"of this journal is left: {WHY}"
    )
    assert check(directory) == (
        1,
        f"{report}\nchecked 0 segment(s) of 1 queue(s): 1 problem(s)\n",
    )
    out = io.StringIO()
    assert tool.dump(directory, out) == 1 and f"# {report}" in out.getvalue()
    journal, rec = open_journal(directory)
    assert rec.warnings == [report] and rec.items == []
    journal.add(1000, 0, 0, 0, b"new")  # the journal starts again after the lost numbers
    journal.close()
    assert stated(directory) == SegmentRange(len(files) + 1, len(files) + 1)
    assert reopened(directory) == ([], [1000])


def test_a_journal_written_without_a_range_file_opens_silently_and_gets_one(codec, tmp_path):
    # As the erq before range files wrote it: nothing to compare with, nothing reported.
    directory = tmp_path / "q"
    files = written(directory)
    for name in range_files(directory):
        os.unlink(directory / name)
    lost = added_ids(files[0])
    files[0].unlink()  # lost before the range was kept: it cannot be told
    assert check(directory)[0] == 0
    warnings, ids = reopened(directory)
    assert warnings == [] and ids == [i for i in range(1, 301) if i not in lost]
    assert stated(directory) == SegmentRange(2, len(files))
    files[1].unlink()  # from now on a loss is seen
    warnings, _ = reopened(directory)
    assert len(warnings) == 1 and f"segment {files[1].name} missing before" in warnings[0]


def test_a_segment_created_before_its_range_grew_is_no_loss(codec, tmp_path):
    # A crash between a rotation's rename of the new segment and that of the range file.
    directory = tmp_path / "q"
    files = written(directory)
    before = directory / stated(directory).name
    before.rename(directory / SegmentRange(1, len(files) - 1).name)
    assert check(directory)[0] == 0
    assert reopened(directory) == ([], list(range(1, 301)))
    assert stated(directory) == SegmentRange(1, len(files))  # grown at open
    files[-1].unlink()  # and so its loss is seen again
    assert reopened(directory)[0] != []


def test_release_and_a_crash_between_its_range_rename_and_its_deletions_raise_no_alarm(
    codec, tmp_path
):
    directory = tmp_path / "q"
    files = written(directory)
    journal, rec = open_journal(directory)
    for id in range(1, 201):
        journal.remove(id)
    saved = tmp_path / "saved"
    saved.mkdir()
    for path in files:
        shutil.copy(path, saved / path.name)
    released = journal.release_head(201)
    assert released >= 2
    journal.close()
    first = stated(directory).first
    assert first == released + 1 and not (directory / files[0].name).exists()
    assert check(directory)[0] == 0
    assert reopened(directory) == ([], list(range(201, 301)))
    for path in saved.iterdir():  # as if killed before the deletions reached the disk
        if not (directory / path.name).exists():
            shutil.copy(path, directory / path.name)
    assert check(directory)[0] == 0
    assert reopened(directory) == ([], list(range(201, 301)))
    assert stated(directory).first == first


def test_compaction_and_a_crash_before_its_range_rename_raise_no_alarm(codec, tmp_path):
    directory = tmp_path / "q"
    files = written(directory)
    stale = stated(directory)
    journal, rec = open_journal(directory)
    items = all_items(journal, rec)
    for it in items[:150]:
        journal.remove(it.id)
    journal.compact([], items[150:], wait=True)
    assert journal.rewrites == 1
    journal.close()
    snapshot = len(files) + 1
    assert stated(directory) == SegmentRange(snapshot, snapshot + 1)
    assert check(directory)[0] == 0
    assert reopened(directory) == ([], list(range(151, 301)))
    # Killed after the snapshot's thread deleted the old segments, before the loop renamed
    # the range: the snapshot says where the journal starts.
    os.rename(directory / stated(directory).name, directory / SegmentRange(1, stale.last).name)
    assert check(directory)[0] == 0
    assert reopened(directory) == ([], list(range(151, 301)))
    (directory / f"{snapshot:016x}.seg").unlink()  # and the loss of the snapshot is seen
    warnings, _ = reopened(directory)
    assert len(warnings) == 1 and "missing before" in warnings[0]


def test_a_compaction_that_did_not_finish_leaves_its_number_unused_without_an_alarm(
    codec, tmp_path, monkeypatch
):
    directory = tmp_path / "q"
    files = written(directory)
    journal, rec = open_journal(directory)
    items = all_items(journal, rec)

    def fail(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(compaction, "_rename", fail)
    journal.compact([], items, wait=True)
    assert journal.last_compaction_error is not None
    journal.add(301, 0, 0, 0, b"after")
    journal.close()
    unused = len(files) + 1  # the snapshot's number, inside the range: the next one says so
    assert not (directory / f"{unused:016x}.seg").exists()
    assert stated(directory) == SegmentRange(1, unused + 1)
    assert check(directory)[0] == 0
    assert reopened(directory) == ([], list(range(1, 302)))


def test_a_drained_queue_and_pack_leave_a_range_that_raises_no_alarm(codec, tmp_path):
    data_dir = tmp_path / "data"
    directory = data_dir / "q"
    written(directory)
    journal, rec = open_journal(directory)
    for it in all_items(journal, rec):
        journal.remove(it.id)
    journal.compact([], [])  # drained: every older segment goes at once
    assert journal.segment_count == 1
    journal.add(301, 0, 0, 0, b"kept")
    journal.close()
    assert stated(directory).first == stated(directory).last
    assert reopened(directory) == ([], [301])
    assert tool.pack(data_dir, io.StringIO()) == 0
    (snapshot,) = segment_files(directory)  # pack leaves one file: the snapshot
    seq = int(snapshot.stem, 16)
    assert stated(directory) == SegmentRange(seq, seq)  # pack's own rename, not a start's
    assert check(data_dir)[0] == 0
    assert reopened(directory) == ([], [301])


def test_several_range_files_are_reported_and_the_newest_kept(codec, tmp_path):
    directory = tmp_path / "q"
    files = written(directory)
    extra = SegmentRange(1, 2).name
    (directory / extra).touch()  # put there by hand: a rename never leaves two
    status, out = check(directory)
    assert status == 1 and f"several range files ({extra}, " in out
    warnings, ids = reopened(directory)
    assert len(warnings) == 1 and "several range files" in warnings[0]
    assert ids == list(range(1, 301))
    assert stated(directory) == SegmentRange(1, len(files))


def test_a_compaction_whose_rotation_failed_leaves_no_number_unused(codec, tmp_path, monkeypatch):
    # A full disk refuses the segment a compaction starts: no segment says that the number
    # it took for the snapshot may stay unused, so the next segment made takes it.
    directory = tmp_path / "q"
    files = written(directory)
    journal, rec = open_journal(directory)
    items = all_items(journal, rec)

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", no_space)
        journal.compact([], items, wait=True)
    assert journal.last_compaction_error is not None and journal.rewrites == 0
    for id in range(301, 341):  # rotates once space is back
        journal.add(id, 0, 0, 0, b"r" * 100)
    journal.close()
    assert [p.name for p in segment_files(directory)[len(files) :]][:1] == [
        f"{len(files) + 1:016x}.seg"
    ]
    assert check(directory)[0] == 0
    assert reopened(directory) == ([], list(range(1, 341)))
