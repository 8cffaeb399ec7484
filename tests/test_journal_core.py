"""AppendCore, QueueJournal's per-append path: fast path, call-backs, errors, and mixes of a
core of one implementation with the SegmentWriter of the other (tests swap codecs at run time)."""

from __future__ import annotations

import errno
import os
import sys

import pytest
from test_journal_support import (
    KiB,
    Model,
    all_items,
    codec_module,
    item,
    run_scenario,
    segment_files,
    use_codec,
    write_ops,
)

import erq.journal.codec as codec_selector
from erq.journal import JournalError, QueueJournal
from erq.journal.format import (
    ADD_OVERHEAD,
    OP_ADD,
    OP_CONFIRM,
    OP_FLUSH,
    OP_OPEN,
    OP_RECORD_SIZE,
    OP_REMOVE,
    OP_UNREMOVE,
)

APPENDS = ["add", "remove", "open", "confirm", "unremove"]


def other(impl: str) -> str:
    return "py" if impl == "c" else "c"


@pytest.fixture(params=["own-writer", "other-writer"])
def writer_impl(request, impl, monkeypatch) -> str:
    """Journals get ``impl``'s AppendCore, with its own SegmentWriter or the other one's."""
    use_codec(impl, monkeypatch)
    chosen = impl if request.param == "own-writer" else other(impl)
    monkeypatch.setattr(codec_selector, "SegmentWriter", codec_module(chosen).SegmentWriter)
    return chosen


@pytest.fixture
def journals(writer_impl, tmp_path):
    """Open (and at the end close) journals in ``tmp_path``."""
    opened: list[QueueJournal] = []

    def _open(name: str = "q", **kw) -> QueueJournal:
        kw.setdefault("fsync", "never")
        journal, _ = QueueJournal.open(tmp_path / name, **kw)
        opened.append(journal)
        return journal

    yield _open
    for journal in opened:
        journal.close()


def append(journal: QueueJournal, name: str, id: int):
    if name == "add":
        return journal.add(id, 0, 0, 0, b"data")
    return getattr(journal, name)(id)


def no_space(fd, offset, length):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_journals_run_on_the_chosen_core_and_writer(impl, writer_impl, journals):
    journal = journals()
    journal.add(1, 0, 0, 0, b"a")
    assert type(journal).__mro__[1] is codec_module(impl).AppendCore
    assert type(journal._writer) is codec_module(writer_impl).SegmentWriter


def test_quiet_appends_return_none_without_asking_the_fsync_policy(journals):
    journal = journals()
    journal.add(1, 0, 0, 0, b"first")  # makes the first segment
    journal._written = lambda: pytest.fail("_written called on the quiet path")
    assert journal._quiet is True
    writer = journal._writer
    position = writer.position
    for name in ["add", "open", "unremove", "open", "confirm", "add", "remove"]:
        assert append(journal, name, 2) is None
        position += ADD_OVERHEAD + 4 if name == "add" else OP_RECORD_SIZE
        assert writer.position == position
    # ADDs, their bytes, greatest id, then REMOVE, OPEN, CONFIRM, UNREMOVE, FLUSH records
    assert writer.counters() == (3, 3 * ADD_OVERHEAD + 5 + 4 + 4, 2, 1, 2, 1, 1, 0)


def test_appends_that_are_not_quiet_return_what_the_policy_returns(journals):
    journal = journals()
    journal.add(1, 0, 0, 0, b"first")
    journal._quiet = False
    calls = []
    ticket = object()
    journal._written = lambda: calls.append(1) or ticket
    for name in APPENDS:
        assert append(journal, name, 1) is ticket
    assert len(calls) == len(APPENDS)
    assert journal.flush() is ticket


def test_writer_and_quiet_flag_can_be_read_and_assigned(journals):
    journal = journals()
    assert journal._quiet is True  # fsync "never"
    journal._quiet = False
    assert journal._quiet is False
    journal.update_policy(fsync="never")
    journal.add(1, 0, 0, 0, b"a")
    writer = journal._writer
    journal._writer = journal._null_writer
    assert journal._writer is journal._null_writer
    journal._writer = writer
    journal.add(2, 0, 0, 0, b"b")
    assert writer.counters()[0] == 2


def test_a_full_segment_rotates_through_the_subclass_and_the_record_lands_in_the_new_one(
    journals,
):
    journal = journals(segment_size=4 * KiB)
    asked = []
    rotate = journal._rotate

    def spy(record_size, size=None):
        asked.append(record_size)
        return rotate(record_size, size)

    journal._rotate = spy
    model = Model()
    write_ops(journal, model, [(OP_ADD, item(1, size=3000)), (OP_ADD, item(2, size=2000))])
    assert asked == [ADD_OVERHEAD + 3000, ADD_OVERHEAD + 2000]  # the first segment, then full
    ops = [(OP_OPEN, 1), (OP_UNREMOVE, 1), (OP_OPEN, 1), (OP_CONFIRM, 1), (OP_REMOVE, 2)]
    for k, op in enumerate(ops):
        filler = item(100 + k, size=journal._writer.remaining - ADD_OVERHEAD - 10)
        write_ops(journal, model, [(OP_ADD, filler)])
        assert journal._writer.remaining == 10
        asked.clear()
        write_ops(journal, model, [op])
        assert asked == [OP_RECORD_SIZE]
        assert journal._writer.position == 32 + OP_RECORD_SIZE  # first in the new segment
    assert journal.rotations == 6
    journal.close()
    journal, rec = QueueJournal.open(journal.directory, fsync="never", segment_size=4 * KiB)
    assert len(segment_files(journal.directory)) == 7
    assert all_items(journal, rec) == model.expected()
    journal.close()


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd (Linux)")
def test_a_segment_holds_one_descriptor_where_python_maps_without_a_copy(journals):
    """Each segment a deep queue keeps costs descriptors, and no setting bounds how many
    segments there are: from Python 3.13 the mapping keeps no copy of the segment's
    descriptor (trackfd), so a segment holds one, not two, and the limit goes twice as far.
    The syncs still work through the segment's own, and the items come back."""
    from erq.open_files import DESCRIPTORS_PER_SEGMENT

    assert (1 if sys.version_info >= (3, 13) else 2) == DESCRIPTORS_PER_SEGMENT
    journal = journals(segment_size=4 * KiB)
    model = Model()
    write_ops(journal, model, [(OP_ADD, item(1, size=3000))])
    before = _open_descriptors()
    write_ops(journal, model, [(OP_ADD, item(i, size=3000)) for i in range(2, 12)])
    assert journal.rotations == 10
    assert _open_descriptors() - before == 10 * DESCRIPTORS_PER_SEGMENT
    journal.sync()
    journal.close()
    assert _open_descriptors() == before - DESCRIPTORS_PER_SEGMENT
    journal, rec = QueueJournal.open(journal.directory, fsync="never", segment_size=4 * KiB)
    assert all_items(journal, rec) == model.expected()
    journal.close()


def test_an_item_kept_on_disk_is_registered_with_its_offset_even_after_a_rotation(journals):
    journal = journals(segment_size=4 * KiB)
    journal.add(1, 0, 0, 0, b"a" * 3000)
    journal.add(2, 0, 0, 0, b"b" * 100, in_memory=False)
    journal.add(3, 0, 0, 0, b"c" * 2000, in_memory=False)  # rotates first
    journal.add(4, 0, 0, 0, b"d" * 10, in_memory=True)
    assert (journal.disk_items, journal.disk_bytes, journal.segment_count) == (2, 2100, 2)
    back = journal.read_behind(1 << 20)
    assert [(it.id, it.data) for it in back] == [(2, b"b" * 100), (3, b"c" * 2000)]


@pytest.mark.parametrize("name", APPENDS)
def test_a_full_disk_raises_journal_error_and_changes_nothing(journals, monkeypatch, name):
    journal = journals(segment_size=4 * KiB)
    journal.add(1, 0, 0, 0, b"x" * (4 * KiB - 32 - ADD_OVERHEAD - 10))  # 10 bytes left
    journal._written = lambda: pytest.fail("_written called for a record not written")
    journal._quiet = False
    writer = journal._writer
    state = (writer.position, writer.counters(), journal.rotations, journal.segment_count)
    counts = (journal.live_items, journal.open_reads, journal.disk_items, journal.used_bytes)
    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", no_space)
        with pytest.raises(JournalError, match="disk full"):
            if name == "add":
                journal.add(2, 0, 0, 0, b"y" * 20, in_memory=False)
            else:
                append(journal, name, 1)
    assert journal._writer is writer
    assert (writer.position, writer.counters(), journal.rotations, journal.segment_count) == state
    assert (
        journal.live_items,
        journal.open_reads,
        journal.disk_items,
        journal.used_bytes,
    ) == counts
    assert sorted(p.name for p in journal.directory.iterdir()) == [
        "0000000000000001-0000000000000001.range",
        "0000000000000001.seg",
    ]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1, 0, 0, 0, b"a"), OverflowError),
        ((1, 2**32, 0, 0, b"a"), OverflowError),
        ((1, 0, 2**64, 0, b"a"), OverflowError),
        (("1", 0, 0, 0, b"a"), TypeError),
        ((1, 0, 0, 0, "text"), TypeError),
    ],
)
def test_bad_add_arguments_raise_and_write_nothing(journals, args, error):
    journal = journals()
    journal.add(1, 0, 0, 0, b"a")
    position, counters = journal._writer.position, journal._writer.counters()
    with pytest.raises(error):
        journal.add(*args)
    with pytest.raises((OverflowError, TypeError)):
        journal.remove(-1)
    assert (journal._writer.position, journal._writer.counters()) == (position, counters)


def test_open_is_a_classmethod_on_the_class_and_an_append_on_an_instance(journals, tmp_path):
    journal = journals()
    assert "open" not in vars(QueueJournal)  # the instance call reaches AppendCore.open
    assert journal.open.__self__ is journal and journal.open.__name__ == "open"
    journal.add(1, 0, 0, 0, b"a")
    assert journal.open(1) is None
    assert journal.open_reads == 1 and journal._writer.counters()[4] == 1
    second, rec = type(journal).open(tmp_path / "other", fsync="never")
    assert rec.items == [] and second.open(7) is None  # an id never added: still journaled
    second.close()


def test_a_random_workload_recovers_the_same_state_on_every_core_and_writer(journals):
    journal = journals(segment_size=16 * KiB, max_memory_size=6 * KiB)
    q, model = run_scenario(journal, max_memory=6 * KiB, seed=7, steps=600)
    assert journal.rotations > 3 and q.disk
    journal.close()
    journal, rec = QueueJournal.open(journal.directory, fsync="never", max_memory_size=6 * KiB)
    model.restarted()
    assert all_items(journal, rec) == model.expected()
    journal.close()


def test_both_cores_write_byte_identical_segments(tmp_path, monkeypatch):
    ops = [(OP_ADD, item(i, size=300 + i)) for i in range(1, 30)]
    ops += [(OP_OPEN, 1), (OP_REMOVE, 2), (OP_OPEN, 3), (OP_UNREMOVE, 3), (OP_CONFIRM, 1)]
    ops += [(OP_FLUSH, None), (OP_ADD, item(40, size=0))]
    images = []
    for impl in ("c", "py"):
        with monkeypatch.context() as m:
            use_codec(impl, m)
            journal, _ = QueueJournal.open(tmp_path / impl, fsync="never", segment_size=4 * KiB)
            write_ops(journal, Model(), ops)
            journal.add(41, 0, 0, 0, b"on disk", in_memory=False)
            journal.close()
        images.append([p.read_bytes() for p in segment_files(tmp_path / impl)])
    assert len(images[0]) > 2
    assert images[0] == images[1]


def test_c_core_quiet_appends_run_no_python_code(tmp_path, monkeypatch):
    use_codec("c", monkeypatch)  # the C core and writer (fails if the extension is missing)
    journal, _ = QueueJournal.open(tmp_path / "q", fsync="never")
    journal.add(1, 0, 0, 0, b"first")  # the first segment is made in Python
    frames: list[str] = []

    def profile(frame, event, arg):
        if event == "call":
            frames.append(frame.f_code.co_name)

    def appends(id: int) -> None:
        add, remove, open_, confirm, unremove = (
            journal.add,
            journal.remove,
            journal.open,
            journal.confirm,
            journal.unremove,
        )
        sys.setprofile(profile)
        try:
            add(id, 0, 0, 0, b"x" * 10)
            add(id + 1, 0, 0, 0, b"y" * 10, in_memory=True)
            open_(id)
            unremove(id)
            open_(id)
            confirm(id)
            remove(id + 1)
        finally:
            sys.setprofile(None)

    appends(2)
    assert frames == []
    journal._quiet = False  # the profiler does see Python called back from C
    appends(4)
    assert frames == ["_written"] * 7
    journal.close()
