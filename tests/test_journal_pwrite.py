"""Large ADD records written with pwritev() on the segment's file (SegmentWriter's ``fd``):
the same bytes, offsets and counters as the copy into the mapping, on both implementations
and across the size threshold; the mapping still reads them; a failed or short write leaves
the writer and the segment as they were and raises JournalError."""

from __future__ import annotations

import array
import contextlib
import errno
import os
import resource
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_journal_support import codec_module, item, segment_files, use_codec

import erq.journal.codec as codec_selector
from erq.journal import JournalError, QueueJournal
from erq.journal.format import (
    ADD_OVERHEAD,
    HEADER_SIZE,
    OP_ADD,
    OP_CONFIRM,
    OP_FLUSH,
    OP_OPEN,
    OP_REMOVE,
    OP_UNREMOVE,
    REC_END,
)
from erq.journal.segment import Segment

KiB = 1024
PY, C = codec_module("py"), codec_module("c")
T = PY.PWRITE_THRESHOLD  # the twins agree (pinned below)
AROUND = [0, 1, 100, 4 * KiB, T - 1, T, T + 1, 2 * T + 3, 64 * KiB]


@pytest.fixture
def codec(impl):
    return codec_module(impl)


@contextlib.contextmanager
def segments(directory: Path):
    """Make segments as the journal does (header, fallocate, shared mapping), each the first
    of its own directory (same header); close them all at the end (their writers must have
    been released)."""
    made: list[Segment] = []

    def make(size: int = 1 << 20) -> Segment:
        home = directory / f"seg{len(made)}"
        home.mkdir(parents=True)
        seg = Segment.create(home, 1, size)
        made.append(seg)
        return seg

    try:
        yield make
    finally:
        for seg in made:
            seg.close()


@contextlib.contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE at ``limit``: the kernel cuts a write that crosses it short and fails one
    that starts at or past it (EFBIG; SIGXFSZ ignored). Only the code under test runs inside."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


_PATTERN = bytes(range(1, 256)) * 300  # no zero byte: a zeroed byte always shows


def data_of(id: int, size: int) -> bytes:
    start = id * 7 % 255
    assert start + size <= len(_PATTERN)
    return _PATTERN[start : start + size]


def play(writer, ops: list[tuple]) -> list[tuple]:
    """Apply (opcode, id, size) to ``writer``; what it reported after each one."""
    out = []
    for op, id, size in ops:
        if op == OP_ADD:
            at = writer.append_add(id, id % 7, 1_000 + id, id * 3, data_of(id, size))
        else:
            at = writer.append_op(op, id)
        out.append((at, writer.position, writer.remaining, writer.counters()))
    return out


def write_segment(codec, make, ops: list[tuple], *, fd: bool, size: int = 1 << 20):
    """(what the writer reported, the segment file's bytes) for ``ops`` on a new segment."""
    seg = make(size)
    writer = codec.SegmentWriter(seg.mm, HEADER_SIZE, True, seg.fileno() if fd else -1)
    reports = play(writer, ops)
    writer.release()
    return reports, seg.path.read_bytes()


def mixed_ops(sizes: list[int]) -> list[tuple]:
    ops: list[tuple] = []
    for id, size in enumerate(sizes, 1):
        ops.append((OP_ADD, id, size))
        if id % 3 == 0:
            ops += [(OP_OPEN, id, 0), (OP_UNREMOVE, id, 0), (OP_REMOVE, id - 1, 0)]
    return [*ops, (OP_FLUSH, 0, 0), (OP_CONFIRM, 2, 0)]


# ---- same bytes, same reports ------------------------------------------------------------
def test_twins_share_the_pwrite_threshold():
    assert PY.PWRITE_THRESHOLD == C.PWRITE_THRESHOLD
    assert 4 * KiB <= T <= 64 * KiB


def test_pwrite_and_copy_write_byte_identical_segments_across_the_threshold(tmp_path):
    ops = mixed_ops(AROUND + AROUND[::-1])
    with segments(tmp_path) as make:
        results = {
            (codec.__name__, fd): write_segment(codec, make, ops, fd=fd)
            for codec in (PY, C)
            for fd in (True, False)
        }
    reference = results[(C.__name__, False)]
    assert all(got == reference for got in results.values())
    reports, image = reference
    assert reports[-1][3][:2] == (len(AROUND) * 2, sum(AROUND) * 2 + ADD_OVERHEAD * len(AROUND) * 2)
    # the file holds every record, read back through a mapping-free copy of it
    assert [r[6] for r in C.iter_records(image) if r[1] == OP_ADD] == [
        data_of(id, size) for id, size in enumerate(AROUND + AROUND[::-1], 1)
    ]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(
        st.one_of(st.sampled_from(AROUND), st.integers(T - 40, T + 40), st.integers(0, 70000)),
        min_size=1,
        max_size=25,
    ),
    segment_pages=st.integers(16, 160),
)
def test_twins_pwrite_the_same_bytes_as_they_copy(sizes, segment_pages):
    directory = Path(tempfile.mkdtemp(prefix="erq-pwrite-"))
    try:
        ops = mixed_ops(sizes)  # the segment may fill up: refused records must match too
        with segments(directory) as make:
            size = segment_pages * 4096
            results = [
                write_segment(codec, make, ops, fd=fd, size=size)
                for codec in (PY, C)
                for fd in (True, False)
            ]
        assert all(got == results[0] for got in results[1:])
    finally:
        shutil.rmtree(directory)


def test_a_record_that_does_not_fit_is_refused_before_any_write(codec, tmp_path):
    with segments(tmp_path) as make:
        seg = make(64 * KiB)
        writer = codec.SegmentWriter(seg.mm, HEADER_SIZE, True, seg.fileno())
        assert writer.append_add(1, 0, 0, 0, data_of(1, T)) == HEADER_SIZE
        room = writer.remaining
        assert writer.append_add(2, 0, 0, 0, data_of(2, room - ADD_OVERHEAD + 1)) == -1
        assert writer.remaining == room and not any(seg.mm[writer.position :])
        assert writer.append_add(3, 0, 0, 0, data_of(3, room - ADD_OVERHEAD)) >= 0
        assert writer.remaining == 0
        writer.release()


def test_the_mapping_reads_what_pwritev_wrote(codec, tmp_path):
    with segments(tmp_path) as make:
        seg = make()
        writer = codec.SegmentWriter(seg.mm, HEADER_SIZE, True, seg.fileno())
        small = writer.append_add(1, 5, 6, 7, b"small")
        big = writer.append_add(2, 8, 9, 10, data_of(2, T + 10))
        after = writer.append_add(3, 0, 0, 0, b"after")
        assert codec.read_add(seg.mm, big) == (2, 8, 9, 10, data_of(2, T + 10))
        assert codec.read_add(seg.mm, after)[4] == b"after"
        offsets = array.array("Q", [small, big, after])
        out: list = []
        assert codec.read_adds(seg.mm, offsets, 0, 1 << 20, tuple, out) == (3, T + 20, True)
        writer.release()


def test_any_buffer_is_written_as_its_bytes(codec, tmp_path):
    data = data_of(4, T + 8)
    with segments(tmp_path) as make:
        seg = make()
        writer = codec.SegmentWriter(seg.mm, HEADER_SIZE, True, seg.fileno())
        offsets = [
            writer.append_add(4, 0, 0, 0, buf)
            for buf in (data, bytearray(data), memoryview(data), memoryview(data).cast("Q"))
        ]
        state = (writer.position, writer.counters())
        with pytest.raises(TypeError):
            writer.append_add(5, 0, 0, 0, "x" * T)
        assert (writer.position, writer.counters()) == state
        writer.release()
        assert [codec.read_add(seg.mm, at)[4] for at in offsets] == [data] * 4


def test_a_trimming_writer_keeps_every_large_record(codec, tmp_path):
    with segments(tmp_path) as make:
        seg = make(8 << 20)
        writer = codec.SegmentWriter(seg.mm, HEADER_SIZE, True, seg.fileno())
        sizes = [T, 100, 3 * T, 64 * KiB, 7]
        n = 0
        while writer.append_add(n, 0, 0, 0, data_of(n, sizes[n % len(sizes)])) >= 0:
            n += 1
        writer.release()
        expected = [data_of(i, sizes[i % len(sizes)]) for i in range(n)]
        assert n > 100
        assert [r[6] for r in codec.iter_records(seg.mm)] == expected
        assert [r[6] for r in codec.iter_records(seg.path.read_bytes())] == expected


def test_the_writer_takes_an_fd_only_with_a_mapping(codec, tmp_path):
    with segments(tmp_path) as make:
        seg = make()
        with pytest.raises(TypeError):
            codec.SegmentWriter(bytearray(4096), HEADER_SIZE, False, seg.fileno())
        with pytest.raises(ValueError):
            codec.SegmentWriter(seg.mm, HEADER_SIZE, True, -2)
    buf = bytearray(HEADER_SIZE + ADD_OVERHEAD + T)
    writer = codec.SegmentWriter(buf, HEADER_SIZE, True)  # no fd: every record is copied
    assert writer.append_add(1, 0, 0, 0, data_of(1, T)) == HEADER_SIZE
    writer.release()
    assert codec.read_add(buf, HEADER_SIZE)[4] == data_of(1, T)


# ---- failures ------------------------------------------------------------------------------
def assert_untouched(writer, seg: Segment, state: tuple) -> None:
    """The writer reports what it did before, and nothing lies past its position."""
    assert (writer.position, writer.remaining, writer.counters()) == state
    assert not any(seg.mm[writer.position :])
    assert not any(os.pread(seg.fileno(), seg.size, 0)[writer.position :])


def prepared(codec, seg: Segment, fd: int):
    """A writer that appended a few records (one of them large) before the failure."""
    writer = codec.SegmentWriter(seg.mm, HEADER_SIZE, True, fd)
    play(writer, [(OP_ADD, 1, 10), (OP_OPEN, 1, 0), (OP_ADD, 2, 10)])
    return writer, (writer.position, writer.remaining, writer.counters())


@pytest.mark.parametrize(
    ("device", "message", "code"),
    [
        ("/dev/full", "disk full", errno.ENOSPC),
        (None, "Bad file descriptor", errno.EBADF),  # the segment opened read-only
    ],
)
def test_a_failed_pwrite_raises_journal_error_and_changes_nothing(
    codec, tmp_path, device, message, code
):
    with segments(tmp_path) as make:
        seg = make()
        fd = os.open(device or seg.path, os.O_RDONLY if device is None else os.O_WRONLY)
        try:
            writer, state = prepared(codec, seg, fd)
            with pytest.raises(JournalError, match=message) as caught:
                writer.append_add(3, 0, 0, 0, data_of(3, T))
            assert isinstance(caught.value.__cause__, OSError)
            assert caught.value.__cause__.errno == code
            assert_untouched(writer, seg, state)
            # a record under the threshold is copied into the mapping: it still goes in
            assert writer.append_add(4, 0, 0, 0, data_of(4, T - 1)) == state[0]
            writer.release()
        finally:
            os.close(fd)
        assert [r[2] for r in codec.iter_records(seg.mm) if r[1] == OP_ADD] == [1, 2, 4]


@pytest.mark.parametrize("landed", [0, 1, 4, ADD_OVERHEAD, ADD_OVERHEAD + 1000, "all but one"])
def test_a_short_pwrite_is_zeroed_and_raises_journal_error(codec, tmp_path, landed):
    add = [(OP_ADD, 3, 2 * T)]
    size = ADD_OVERHEAD + 2 * T
    landed = size - 1 if landed == "all but one" else landed
    with segments(tmp_path) as make:
        seg = make()
        writer, state = prepared(codec, seg, seg.fileno())
        at = writer.position
        with file_size_limit(at + landed), pytest.raises(JournalError) as caught:
            play(writer, add)
        if landed:
            assert f"short write ({landed} of {size} bytes)" in str(caught.value)
        else:
            assert caught.value.__cause__.errno == errno.EFBIG
        assert_untouched(writer, seg, state)
        # what recovery reads there: a clean end, nothing to accept or to report
        assert codec.check_record(seg.mm, at) == (REC_END, at)
        assert codec.first_nonzero(seg.mm, at) == -1
        # the same append once the limit is gone lands where the failed one would have
        assert play(writer, add)[0][0] == at
        writer.release()
        image = seg.path.read_bytes()
    with segments(tmp_path / "clean") as make:
        ops = [(OP_ADD, 1, 10), (OP_OPEN, 1, 0), (OP_ADD, 2, 10), *add]
        assert write_segment(codec, make, ops, fd=False)[1] == image


# ---- through the journal ------------------------------------------------------------------
def copy_only(module):
    """The ``module``'s SegmentWriter as built before the fd existed (it copies every record)."""

    def writer(buffer, position=HEADER_SIZE, trim=False, fd=-1):
        return module.SegmentWriter(buffer, position, trim)

    return writer


def test_journals_write_byte_identical_segments_on_both_cores_and_paths(tmp_path, monkeypatch):
    sizes = [20, T - 1, T, 100, T + 1, 64 * KiB, 3, 40 * KiB, T]
    images = []
    for impl in ("c", "py"):
        for path in ("pwrite", "copy"):
            directory = tmp_path / f"{impl}-{path}"
            with monkeypatch.context() as m:
                module = use_codec(impl, m)
                if path == "copy":
                    m.setattr(codec_selector, "SegmentWriter", copy_only(module))
                journal, _ = QueueJournal.open(directory, fsync="never", segment_size=96 * KiB)
                for id, size in enumerate(sizes, 1):
                    it = item(id, size=size)
                    journal.add(it.id, it.flags, it.add_time, it.expiry, it.data, id % 2 == 0)
                    if id % 3 == 0:
                        journal.open(id)
                journal.remove(1)
                journal.close()
            images.append([p.read_bytes() for p in segment_files(directory)])
    assert len(images[0]) > 2  # rotations, some for a record larger than the room left
    assert all(image == images[0] for image in images[1:])


def test_a_failed_journal_add_leaves_nothing_recovery_would_take(impl, tmp_path, monkeypatch):
    use_codec(impl, monkeypatch)
    directory = tmp_path / "q"
    journal, _ = QueueJournal.open(directory, fsync="never", max_memory_size=1 * KiB)
    items = [item(id, size=size) for id, size in enumerate([T, 10, 2 * T], 1)]
    for it in items:
        journal.add(it.id, it.flags, it.add_time, it.expiry, it.data, in_memory=False)
    writer = journal._writer
    state = (writer.position, writer.counters(), journal.live_items, journal.disk_items)
    at = writer.position
    with file_size_limit(at + ADD_OVERHEAD + 100), pytest.raises(JournalError):
        journal.add(4, 0, 0, 0, data_of(4, 2 * T), in_memory=False)
    assert (writer.position, writer.counters(), journal.live_items, journal.disk_items) == state
    assert journal.read_behind(1 << 20) == items  # read through the mapping
    journal.close()
    journal, recovery = QueueJournal.open(directory, fsync="never", max_memory_size=1 * KiB)
    assert recovery.warnings == []
    assert [*recovery.items, *journal.read_behind(1 << 20)] == items
    journal.close()
