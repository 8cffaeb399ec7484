"""The journal codec on both implementations: CRC32C, encoding, the mmap appender, the reader."""

from __future__ import annotations

import importlib
import mmap
import random
import struct
from array import array

import google_crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_journal_support import CODEC_MODULES, codec_module

from erq.journal.format import (
    ADD_OVERHEAD,
    FLUSH_RECORD_SIZE,
    HEADER_SIZE,
    OP_ADD,
    OP_CONFIRM,
    OP_FLUSH,
    OP_OPEN,
    OP_RECORD_SIZE,
    OP_REMOVE,
    OP_UNREMOVE,
    REC_BAD,
    REC_END,
    REC_TORN,
    REC_VALID,
)


@pytest.fixture
def codec(impl):
    return codec_module(impl)


@pytest.fixture(scope="module")
def both():
    return codec_module("py"), codec_module("c")


def segment_image(codec, records: list[bytes], size: int = 4096) -> bytearray:
    buf = bytearray(size)
    pos = HEADER_SIZE
    for rec in records:
        buf[pos : pos + len(rec)] = rec
        pos += len(rec)
    return buf


# ---- CRC32C --------------------------------------------------------------------------------
def test_crc32c_known_vectors(codec):
    assert codec.crc32c(b"") == 0
    assert codec.crc32c(b"123456789") == 0xE3069283
    assert codec.crc32c(bytes(32)) == 0x8A9136AA
    assert codec.crc32c(b"\xff" * 32) == 0x62A8AB43


def test_crc32c_continues_a_previous_value(codec):
    data = bytes(range(256)) * 5
    for cut in (0, 1, 7, 8, 9, 100, len(data)):
        assert codec.crc32c(data[cut:], codec.crc32c(data[:cut])) == codec.crc32c(data)


def crc32c_paths(codec) -> list:
    """The codec's crc32c and, in the C build, its table path (what a CPU without SSE4.2 runs)."""
    return [codec.crc32c] + ([codec._crc32c_portable] if hasattr(codec, "_crc32c_portable") else [])


# Around the edges of the C hardware path's rounds (3 x 256 and 3 x 8192 bytes), a 64 KiB item
# give or take its record's head, and odd sizes.
LARGE_LENGTHS = (
    3 * 8192 - 1,
    3 * 8192,
    3 * 8192 + 1,
    3 * 8192 + 3 * 256 + 7,
    (64 << 10) - 9,
    (64 << 10) - 1,
    64 << 10,
    (64 << 10) + 1,
    (64 << 10) + 37,
    (64 << 10) + 771,
    100_003,
    1 << 20,
    (1 << 20) + 13,
)


@pytest.fixture(scope="module")
def random_blob() -> bytes:
    rng = random.Random(7)
    return rng.randbytes((1 << 20) + 64)


def test_crc32c_matches_google_on_every_length_and_alignment(codec, random_blob):
    # Sixteen consecutive offsets give every address modulo 16, whatever the blob's own.
    view = memoryview(random_blob)
    for fn in crc32c_paths(codec):
        for start in range(16):
            for length in range(0, 4201):
                chunk = view[start : start + length]
                assert fn(chunk) == google_crc32c.value(bytes(chunk)), (fn, start, length)


@pytest.mark.parametrize("length", LARGE_LENGTHS)
def test_crc32c_matches_google_on_large_buffers_at_every_alignment(codec, random_blob, length):
    view = memoryview(random_blob)
    for start in range(16):
        chunk = view[start : start + length]
        expected = google_crc32c.value(bytes(chunk))
        for fn in crc32c_paths(codec):
            assert fn(chunk) == expected, (fn, start)


@pytest.mark.parametrize("length", [4200, (64 << 10) + 5, 1 << 20])
def test_crc32c_continues_a_previous_value_across_long_buffers(codec, random_blob, length):
    data = memoryview(random_blob)[3 : 3 + length]
    whole = google_crc32c.value(bytes(data))
    cuts = {0, 1, 7, 767, 768, 769, 4096 + 3, 3 * 8192 + 1, length // 2, length - 1, length}
    for fn in crc32c_paths(codec):
        for cut in sorted(c for c in cuts if c <= length):
            assert fn(data[cut:], fn(data[:cut])) == whole, (fn, cut)
        for seed in (1, 0xDEADBEEF, 2**32 - 1):
            assert fn(data, seed) == google_crc32c.extend(seed, bytes(data)), (fn, seed)


@settings(max_examples=300)
@given(data=st.binary(max_size=5000), seed=st.integers(0, 2**32 - 1))
def test_crc32c_twins_agree_with_google(both, data, seed):
    py, c = both
    expected = google_crc32c.extend(seed, data)
    assert py.crc32c(data, seed) == c.crc32c(data, seed) == expected


@settings(max_examples=200)
@given(data=st.binary(max_size=3000))
def test_crc32c_c_portable_table_path_agrees_with_hardware_path(both, data):
    _, c = both
    assert c._crc32c_portable(data) == c.crc32c(data) == google_crc32c.value(data)


def test_crc32c_rejects_a_crc_out_of_range(codec):
    with pytest.raises(OverflowError):
        codec.crc32c(b"x", 1 << 32)


# ---- encoding ------------------------------------------------------------------------------
def test_encode_add_layout(codec):
    rec = codec.encode_add(5, 7, 100, 200, b"hello")
    length, crc = struct.unpack_from("<II", rec)
    assert length == 29 + 5 and len(rec) == ADD_OVERHEAD + 5
    assert crc == google_crc32c.value(rec[8:])
    assert struct.unpack_from("<BQIQQ", rec, 8) == (OP_ADD, 5, 7, 100, 200)
    assert rec[ADD_OVERHEAD:] == b"hello"


@pytest.mark.parametrize("op", [OP_REMOVE, OP_OPEN, OP_CONFIRM, OP_UNREMOVE])
def test_encode_id_op_layout(codec, op):
    rec = codec.encode_op(op, 2**64 - 1)
    assert len(rec) == OP_RECORD_SIZE
    assert struct.unpack_from("<IIBQ", rec) == (9, google_crc32c.value(rec[8:]), op, 2**64 - 1)


@pytest.mark.parametrize("size", [(64 << 10) - 1, 64 << 10, (64 << 10) + 3, 1 << 20])
def test_encode_add_crc_covers_a_large_value(codec, random_blob, size):
    for start in (0, 5):
        data = memoryview(random_blob)[start : start + size]
        rec = codec.encode_add(5, 7, 100, 200, data)
        assert struct.unpack_from("<I", rec, 4)[0] == google_crc32c.value(rec[8:])
        assert rec[ADD_OVERHEAD:] == data


def test_encode_flush_has_no_body(codec):
    rec = codec.encode_op(OP_FLUSH, 99)
    assert len(rec) == FLUSH_RECORD_SIZE and rec[8] == OP_FLUSH
    assert struct.unpack_from("<I", rec)[0] == 1


def test_encode_rejects_bad_opcodes_and_ranges(codec):
    for op in (0, OP_ADD, 7, 255):
        with pytest.raises(ValueError):
            codec.encode_op(op, 1)
    with pytest.raises(OverflowError):
        codec.encode_op(OP_REMOVE, -1)
    with pytest.raises(OverflowError):
        codec.encode_add(1, 1 << 32, 0, 0, b"")
    with pytest.raises(OverflowError):
        codec.encode_add(-1, 0, 0, 0, b"")
    with pytest.raises(OverflowError):
        codec.encode_add(1, 0, 1 << 64, 0, b"")


@settings(max_examples=200)
@given(
    id=st.integers(0, 2**64 - 1),
    flags=st.integers(0, 2**32 - 1),
    times=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    data=st.binary(max_size=300),
    op=st.sampled_from([OP_REMOVE, OP_OPEN, OP_CONFIRM, OP_UNREMOVE, OP_FLUSH]),
)
def test_twins_encode_identical_bytes(both, id, flags, times, data, op):
    py, c = both
    assert py.encode_add(id, flags, *times, data) == c.encode_add(id, flags, *times, data)
    assert py.encode_op(op, id) == c.encode_op(op, id)


def test_encode_add_accepts_any_buffer(codec):
    expected = codec.encode_add(1, 2, 3, 4, b"abc")
    assert codec.encode_add(1, 2, 3, 4, bytearray(b"abc")) == expected
    assert codec.encode_add(1, 2, 3, 4, memoryview(b"xabc")[1:]) == expected


# ---- reading -------------------------------------------------------------------------------
def sample_records(codec) -> list[bytes]:
    return [
        codec.encode_add(1, 3, 10, 0, b"first"),
        codec.encode_add(2, 0, 11, 99, b""),
        codec.encode_op(OP_OPEN, 1),
        codec.encode_op(OP_CONFIRM, 1),
        codec.encode_op(OP_UNREMOVE, 2),
        codec.encode_op(OP_REMOVE, 2),
        codec.encode_op(OP_FLUSH),
    ]


def test_iter_records_round_trips_every_opcode(codec):
    buf = segment_image(codec, sample_records(codec))
    it = codec.iter_records(buf)
    recs = list(it)
    assert [r[1:] for r in recs] == [
        (OP_ADD, 1, 3, 10, 0, b"first"),
        (OP_ADD, 2, 0, 11, 99, b""),
        (OP_OPEN, 1, 0, 0, 0, None),
        (OP_CONFIRM, 1, 0, 0, 0, None),
        (OP_UNREMOVE, 2, 0, 0, 0, None),
        (OP_REMOVE, 2, 0, 0, 0, None),
        (OP_FLUSH, 0, 0, 0, 0, None),
    ]
    assert recs[0][0] == HEADER_SIZE and recs[1][0] == HEADER_SIZE + ADD_OVERHEAD + 5
    assert it.status == REC_END
    assert it.position == HEADER_SIZE + sum(len(r) for r in sample_records(codec))


def test_iter_records_without_data_yields_none(codec):
    buf = segment_image(codec, sample_records(codec))
    assert all(r[6] is None for r in codec.iter_records(buf, data=False))


def test_iter_records_ends_exactly_at_the_buffer_end(codec):
    recs = sample_records(codec)
    buf = bytes(HEADER_SIZE) + b"".join(recs)
    it = codec.iter_records(buf)
    assert len(list(it)) == len(recs) and it.status == REC_END and it.position == len(buf)


def test_iter_records_reports_torn_record(codec):
    recs = sample_records(codec)
    image = bytes(HEADER_SIZE) + b"".join(recs)
    cut = len(image) - 3  # inside the last record (FLUSH, 9 bytes)
    it = codec.iter_records(image[:cut])
    assert len(list(it)) == len(recs) - 1
    assert it.status == REC_TORN and it.position == len(image) - FLUSH_RECORD_SIZE


def test_iter_records_reports_bad_crc(codec):
    recs = sample_records(codec)
    buf = segment_image(codec, recs)
    buf[HEADER_SIZE + 8 + 10] ^= 0x01  # a body byte of the first record
    it = codec.iter_records(buf)
    assert list(it) == [] and it.status == REC_BAD and it.position == HEADER_SIZE


def test_malformed_record_with_a_good_crc_is_bad(codec):
    body = bytes([OP_REMOVE]) + b"\x01" * 4  # REMOVE needs 8 id bytes
    rec = struct.pack("<II", len(body), google_crc32c.value(body)) + body
    assert codec.check_record(segment_image(codec, [rec]), HEADER_SIZE)[0] == REC_BAD
    body = bytes([9]) + bytes(8)  # unknown opcode
    rec = struct.pack("<II", len(body), google_crc32c.value(body)) + body
    assert codec.check_record(segment_image(codec, [rec]), HEADER_SIZE)[0] == REC_BAD


def test_a_record_with_an_id_or_time_past_the_signed_range_is_bad(codec):
    """erq writes none (ids count up from 1, times are capped at 2**63 - 1); the queue holds
    them as signed 64-bit integers, and one such record in a foreign file stopped the compiled
    server's start. With a good CRC it is damage, reported and skipped like any other."""
    top, big = (1 << 63) - 1, 1 << 63

    def add(id, add_time, expiry):
        body = struct.pack("<BQIQQ", OP_ADD, id, 0, add_time, expiry) + b"data"
        return struct.pack("<II", len(body), google_crc32c.value(body)) + body

    def op(id):
        body = struct.pack("<BQ", OP_REMOVE, id)
        return struct.pack("<II", len(body), google_crc32c.value(body)) + body

    for rec, status in [
        (add(top, top, top), REC_VALID),
        (op(top), REC_VALID),
        (add(big, 0, 0), REC_BAD),
        (add(1, big, 0), REC_BAD),
        (add(1, 0, (1 << 64) - 1), REC_BAD),
        (op(big), REC_BAD),
    ]:
        assert codec.check_record(segment_image(codec, [rec]), HEADER_SIZE)[0] == status, rec


def test_check_record_statuses(codec):
    rec = codec.encode_op(OP_OPEN, 4)
    buf = bytes(HEADER_SIZE) + rec + b"\x01\x00"
    assert codec.check_record(buf, HEADER_SIZE) == (REC_VALID, HEADER_SIZE + len(rec))
    assert codec.check_record(buf, HEADER_SIZE + len(rec)) == (REC_TORN, HEADER_SIZE + len(rec))
    assert codec.check_record(bytes(10), 3) == (REC_END, 3)
    assert codec.check_record(bytes(10), 8) == (REC_END, 8)  # fewer than 4 bytes, all zero
    assert codec.check_record(b"\x00" * 8 + b"\x00\x05", 8) == (REC_TORN, 8)
    assert codec.check_record(bytes(HEADER_SIZE) + rec[:-1], HEADER_SIZE) == (REC_TORN, HEADER_SIZE)
    with pytest.raises(ValueError):
        codec.check_record(buf, len(buf) + 1)


def test_read_add_returns_the_item(codec):
    recs = sample_records(codec)
    buf = segment_image(codec, recs)
    assert codec.read_add(buf, HEADER_SIZE) == (1, 3, 10, 0, b"first")
    with pytest.raises(ValueError):
        codec.read_add(buf, HEADER_SIZE + len(recs[0]) + len(recs[1]))  # an OPEN
    buf[HEADER_SIZE + ADD_OVERHEAD] ^= 0x80
    with pytest.raises(ValueError):
        codec.read_add(buf, HEADER_SIZE)


def test_first_nonzero(codec):
    buf = bytearray(100)
    assert codec.first_nonzero(buf) == -1
    for at in (0, 1, 7, 8, 9, 63, 64, 99):
        buf[at] = 5
        assert codec.first_nonzero(buf) == at
        assert codec.first_nonzero(buf, at + 1) == -1
        assert codec.first_nonzero(buf, 0, at) == -1
        buf[at] = 0
    big = bytearray(3 << 20)
    big[-1] = 1
    assert codec.first_nonzero(big, 5) == len(big) - 1


def test_resync_skips_a_record_damaged_in_its_body(codec):
    recs = sample_records(codec)
    buf = segment_image(codec, recs)
    buf[HEADER_SIZE + ADD_OVERHEAD + 1] ^= 0x04
    assert codec.resync(buf, HEADER_SIZE) == HEADER_SIZE + len(recs[0])


def test_resync_recovers_from_a_damaged_length(codec):
    recs = sample_records(codec)
    for flip in (0x01, 0x10, 0x80000000):
        buf = segment_image(codec, recs)
        length = struct.unpack_from("<I", buf, HEADER_SIZE)[0]
        struct.pack_into("<I", buf, HEADER_SIZE, length ^ flip)
        assert codec.resync(buf, HEADER_SIZE) == HEADER_SIZE + len(recs[0]), flip


def test_resync_finds_nothing_in_a_torn_tail(codec):
    recs = sample_records(codec)
    buf = segment_image(codec, recs)
    tail = HEADER_SIZE + sum(len(r) for r in recs[:-1])
    buf[tail + 5 :] = bytes(len(buf) - tail - 5)  # last record half written
    assert codec.resync(buf, tail) == -1


def test_resync_needs_two_valid_records_or_a_clean_end(codec):
    # One valid record embedded in garbage, followed by more garbage: not a resync point.
    inner = codec.encode_op(OP_REMOVE, 77)
    buf = bytearray(HEADER_SIZE) + b"\xee" * 20 + inner + b"\xdd" * 30
    assert codec.resync(buf, HEADER_SIZE) == -1
    # The same record followed by a clean end is one.
    buf = bytearray(HEADER_SIZE) + b"\xee" * 20 + inner + bytes(30)
    assert codec.resync(buf, HEADER_SIZE) == HEADER_SIZE + 20


# ---- the appender --------------------------------------------------------------------------
def test_writer_appends_records_that_read_back(codec):
    mm = mmap.mmap(-1, 4096)
    try:
        w = codec.SegmentWriter(mm, HEADER_SIZE)
        assert w.position == HEADER_SIZE and w.remaining == 4096 - HEADER_SIZE
        a = w.append_add(9, 1, 2, 3, b"payload")
        b = w.append_op(OP_OPEN, 9)
        c = w.append_op(OP_FLUSH)
        assert (a, b, c) == (
            HEADER_SIZE,
            HEADER_SIZE + ADD_OVERHEAD + 7,
            HEADER_SIZE + ADD_OVERHEAD + 7 + 17,
        )
        assert w.position == c + FLUSH_RECORD_SIZE
        w.release()
        assert [r[1:3] for r in codec.iter_records(mm)] == [
            (OP_ADD, 9),
            (OP_OPEN, 9),
            (OP_FLUSH, 0),
        ]
        assert bytes(mm[a : a + ADD_OVERHEAD + 7]) == codec.encode_add(9, 1, 2, 3, b"payload")
    finally:
        mm.close()


def test_writer_refuses_a_record_that_does_not_fit_and_writes_nothing(codec):
    buf = bytearray(HEADER_SIZE + ADD_OVERHEAD + 10)
    w = codec.SegmentWriter(buf, HEADER_SIZE)
    assert w.append_add(1, 0, 0, 0, b"x" * 11) == -1
    assert w.position == HEADER_SIZE and not any(buf)
    assert w.append_add(1, 0, 0, 0, b"x" * 10) == HEADER_SIZE
    assert w.remaining == 0
    assert w.append_op(OP_REMOVE, 1) == -1 and w.append_op(OP_FLUSH) == -1
    w.release()


def test_writer_release_lets_the_mmap_close(codec):
    mm = mmap.mmap(-1, 4096)
    w = codec.SegmentWriter(mm, HEADER_SIZE)
    w.append_op(OP_REMOVE, 1)
    with pytest.raises(BufferError):
        mm.close()
    w.release()
    mm.close()
    with pytest.raises(ValueError):
        w.append_op(OP_REMOVE, 2)
    assert w.remaining == 0


def test_writer_needs_a_writable_buffer_and_a_valid_position(codec):
    with pytest.raises(TypeError):
        codec.SegmentWriter(bytes(100), HEADER_SIZE)
    with pytest.raises(ValueError, match="position 101 outside a buffer of 100 bytes"):
        codec.SegmentWriter(bytearray(100), 101)


def test_writer_handles_a_large_item(codec):
    data = bytes(range(256)) * (1 << 12)  # 1 MiB: copied without the GIL in C
    buf = bytearray(HEADER_SIZE + ADD_OVERHEAD + len(data))
    w = codec.SegmentWriter(buf, HEADER_SIZE)
    assert w.append_add(1, 0, 0, 0, data) == HEADER_SIZE
    w.release()
    assert codec.read_add(buf, HEADER_SIZE)[4] == data


def test_reader_releases_the_buffer_when_done(codec):
    mm = mmap.mmap(-1, 4096)
    it = codec.iter_records(mm)
    list(it)
    mm.close()  # would raise BufferError if the iterator still held it


# ---- the twins agree on arbitrary (damaged) input ------------------------------------------
record_st = st.one_of(
    st.builds(lambda i, d: ("add", i, d), st.integers(0, 2**64 - 1), st.binary(max_size=60)),
    st.builds(
        lambda o, i: ("op", o, i),
        st.sampled_from([OP_REMOVE, OP_OPEN, OP_CONFIRM, OP_UNREMOVE, OP_FLUSH]),
        st.integers(0, 2**64 - 1),
    ),
)


@settings(max_examples=300)
@given(
    records=st.lists(record_st, max_size=12),
    damage=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=3),
    cut=st.integers(0, 10_000),
    tail=st.integers(0, 40),
)
def test_twins_read_damaged_buffers_identically(both, records, damage, cut, tail):
    py, c = both
    parts = [
        py.encode_add(r[1], 0, 0, 0, r[2]) if r[0] == "add" else py.encode_op(r[1], r[2])
        for r in records
    ]
    buf = bytearray(HEADER_SIZE) + b"".join(parts) + bytes(tail)
    for at, xor in damage:
        if HEADER_SIZE <= at < len(buf):
            buf[at] ^= xor
    buf = bytes(buf[: max(HEADER_SIZE, min(len(buf), cut + HEADER_SIZE))])
    results = []
    for codec in (py, c):
        it = codec.iter_records(buf)
        recs = list(it)
        pos = it.position
        out = [recs, it.status, pos, codec.first_nonzero(buf, pos)]
        out.append(codec.resync(buf, pos) if pos < len(buf) else None)
        out.append([codec.check_record(buf, p) for p in range(HEADER_SIZE, len(buf), 5)])
        results.append(out)
    assert results[0] == results[1]


# ---- reading items back, counters, trimming, replay ----------------------------------------
def test_read_add_builds_the_requested_tuple_type(codec):
    from erq.journal import RecoveredItem

    buf = segment_image(codec, sample_records(codec))
    got = codec.read_add(buf, HEADER_SIZE, RecoveredItem)
    assert type(got) is RecoveredItem and got == RecoveredItem(1, 3, 10, 0, b"first")
    assert got.data == b"first" and got.id == 1
    assert type(codec.read_add(buf, HEADER_SIZE)) is tuple

    class WithDict(tuple):
        pass

    for cls in (dict, WithDict):
        with pytest.raises(TypeError):
            codec.read_add(buf, HEADER_SIZE, cls)


def test_read_adds_reads_a_run_within_a_byte_budget(codec):
    from array import array

    recs = [codec.encode_add(i, 0, 0, 0, bytes([i]) * (10 * i)) for i in range(1, 6)]
    buf = segment_image(codec, recs)
    offsets = array("Q", [HEADER_SIZE + sum(len(r) for r in recs[:i]) for i in range(5)])
    out: list = []
    assert codec.read_adds(buf, offsets, 0, 35, tuple, out) == (2, 30, True)  # 10 + 20 fit
    assert [it[0] for it in out] == [1, 2]
    assert codec.read_adds(buf, offsets, 2, 5, tuple, out) == (2, 0, True)  # 30 does not fit
    assert codec.read_adds(buf, offsets, 2, 5, tuple, []) == (3, 30, True)  # one, whatever
    more: list = []
    assert codec.read_adds(buf, offsets, 1, 10**9, tuple, more) == (5, 140, True)
    assert [it[4] for it in more] == [bytes([i]) * (10 * i) for i in range(2, 6)]
    offsets[3] += 1  # not a record
    assert codec.read_adds(buf, offsets, 1, 10**9, tuple, []) == (3, 50, False)
    with pytest.raises(ValueError):
        codec.read_adds(buf, offsets, 6, 10, tuple, [])


def test_read_adds_makes_the_rings_items_with_its_item_maker(codec, impl):
    """The queue's refill: items made from their records (the compiled maker in C)."""
    ring = importlib.import_module("erq._fast._ring" if impl == "c" else "erq._ring_py")
    recs = [
        codec.encode_add(i, i % 3, 1_000 + i, 0 if i % 2 else 9_000 + i, b"v%d" % i)
        for i in range(1, 6)
    ]
    buf = segment_image(codec, recs)
    offsets = array("Q", [HEADER_SIZE + sum(len(r) for r in recs[:i]) for i in range(5)])
    out: list = []
    assert codec.read_adds(buf, offsets, 0, 6, ring.ITEM_MAKER, out) == (3, 6, True)
    assert [type(it) for it in out] == [ring.Item] * 3
    got = [(it.id, it.flags, it.add_time, it.expiry, it.data) for it in out]
    assert got == [codec.read_add(buf, offsets[i]) for i in range(3)]
    assert got[1] == (2, 2, 1_002, 9_002, b"v2")
    offsets[4] += 1  # not a record: what came before it is taken
    assert codec.read_adds(buf, offsets, 3, 10**9, ring.ITEM_MAKER, out) == (4, 2, False)
    assert [it.id for it in out] == [1, 2, 3, 4]
    for wrong in (list, object(), codec.ItemMaker.__new__(codec.ItemMaker)):
        with pytest.raises((TypeError, AttributeError)):
            codec.read_adds(buf, offsets, 0, 10, wrong, [])


def test_writer_counts_what_it_appends(codec):
    w = codec.SegmentWriter(bytearray(4096), HEADER_SIZE)
    assert w.counters() == (0, 0, 0, 0, 0, 0, 0, 0)
    w.append_add(7, 0, 0, 0, b"abc")
    w.append_add(3, 0, 0, 0, b"")
    for op in (OP_REMOVE, OP_OPEN, OP_OPEN, OP_CONFIRM, OP_UNREMOVE, OP_FLUSH):
        w.append_op(op, 7)
    assert w.append_add(9, 0, 0, 0, b"x" * 5000) == -1  # refused: not counted
    assert w.counters() == (2, 2 * ADD_OVERHEAD + 3, 7, 1, 2, 1, 1, 1)


def test_trimming_writer_keeps_every_record(codec, tmp_path):
    path = tmp_path / "seg"
    path.write_bytes(bytes(4 << 20))
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 4 << 20)
    w = codec.SegmentWriter(mm, HEADER_SIZE, True)
    data = bytes(range(256)) * 4
    n = 0
    while w.append_add(n, 0, 0, 0, data) >= 0:
        n += 1
    w.release()
    assert n > 3000
    records = list(codec.iter_records(mm))
    assert len(records) == n and all(r[6] == data for r in records)
    mm.close()
    assert len(list(codec.iter_records(path.read_bytes()))) == n
    # private memory is never trimmed: its contents would be lost
    buf = bytearray(4 << 20)
    w = codec.SegmentWriter(buf, HEADER_SIZE, True)
    while w.append_add(1, 0, 0, 0, data) >= 0:
        pass
    w.release()
    assert all(r[6] == data for r in codec.iter_records(buf))


def replay_buffer(codec, ops) -> bytes:
    parts = []
    for op, id in ops:
        if op == OP_ADD:
            parts.append(codec.encode_add(id, 0, 0, 0, b"d%d" % id))
        else:
            parts.append(codec.encode_op(op, id))
    return bytes(HEADER_SIZE) + b"".join(parts) + bytes(16)


def test_replay_records_applies_the_queue_semantics(codec):
    ops = [(OP_ADD, 1), (OP_ADD, 2), (OP_ADD, 3), (OP_ADD, 4), (OP_OPEN, 1), (OP_OPEN, 2)]
    ops += [(OP_UNREMOVE, 2), (OP_REMOVE, 3), (OP_CONFIRM, 9), (OP_ADD, 4), (OP_OPEN, 4)]
    ops += [(OP_ADD, 5), (OP_UNREMOVE, 4), (OP_FLUSH, 0), (OP_ADD, 6)]
    buf = replay_buffer(codec, ops)
    tail, head, opened, dups = codec.ReplayTail(), {}, {}, []
    status, stop, max_id = codec.replay_records(
        buf, HEADER_SIZE, -1, 1 << 40, tail, head, opened, 0, dups
    )
    assert status == REC_END and stop == len(buf) - 16 and max_id == 9
    assert list(tail) == [6] and head == {} and list(opened) == [1]
    assert all(v >> 40 == 1 for v in [*(p for _, p in tail.items()), *opened.values()])
    assert len(dups) == 1  # the second ADD of 4, while 4 was live


def four_records(codec) -> list[bytes]:
    """ADDs of 10, 0 and 1,000 data bytes, a REMOVE after the first."""
    return [
        codec.encode_add(1, 0, 0, 0, b"x" * 10),
        codec.encode_op(OP_REMOVE, 1),
        codec.encode_add(2, 0, 0, 0, b""),
        codec.encode_add(3, 0, 0, 0, b"y" * 1000),
    ]


def test_add_data_bytes_sums_the_data_of_the_add_records_at_offsets(codec):
    records = four_records(codec)
    buf = segment_image(codec, records)
    starts = [HEADER_SIZE]
    for rec in records:
        starts.append(starts[-1] + len(rec))
    adds = array("Q", [starts[0], starts[2], starts[3]])
    assert codec.add_data_bytes(buf, adds) == 1010
    assert codec.add_data_bytes(buf, adds, 1) == 1000
    assert codec.add_data_bytes(buf, adds, 0, 2) == 10
    assert codec.add_data_bytes(buf, adds, 2, 2) == 0
    assert codec.add_data_bytes(buf, array("Q")) == 0
    for bad in (starts[1], starts[4], len(buf) - 4, 2**63, starts[0] + 1):
        with pytest.raises(ValueError):  # a REMOVE, zeros, past the end, inside a record
            codec.add_data_bytes(buf, array("Q", [starts[0], bad]))
    with pytest.raises(ValueError):  # the record runs past the end of the buffer
        codec.add_data_bytes(bytes(buf[: starts[3] + 500]), adds)
    for start, end in ((2, 1), (-1, 2), (0, 4)):
        with pytest.raises(ValueError):
            codec.add_data_bytes(buf, adds, start, end)


def test_record_offsets_walks_records_laid_end_to_end_by_their_lengths(codec):
    """Read-behind's spans: the offsets of records back to back, from the first one's."""
    records = four_records(codec)
    starts = [HEADER_SIZE]
    for rec in records:
        starts.append(starts[-1] + len(rec))
    buf = segment_image(codec, records, size=starts[-1])  # the last record ends the buffer
    out = array("Q", bytes(8 * 6))
    assert codec.record_offsets(buf, HEADER_SIZE, out) == 5  # and where the next would be
    assert list(out[:5]) == starts
    few = array("Q", bytes(8 * 2))
    assert codec.record_offsets(buf, starts[2], few) == 2
    assert list(few) == starts[2:4]
    assert codec.record_offsets(buf, HEADER_SIZE, array("Q")) == 0
    # A length past the end: filled, and the walk stops there (the reader refuses it).
    damaged = bytearray(buf)
    damaged[starts[2] : starts[2] + 4] = (1 << 30).to_bytes(4, "little")
    assert codec.record_offsets(damaged, HEADER_SIZE, out) == 3
    assert list(out[:3]) == starts[:3]
    # An offset whose length cannot be read: filled, then no further.
    assert codec.record_offsets(buf, len(buf) - 4, out) == 1
    assert out[0] == len(buf) - 4
    with pytest.raises(ValueError):
        codec.record_offsets(buf, -1, out)


@settings(max_examples=300)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(
                [OP_ADD, OP_ADD, OP_REMOVE, OP_OPEN, OP_CONFIRM, OP_UNREMOVE, OP_FLUSH]
            ),
            st.integers(1, 12),
        ),
        max_size=60,
    ),
    cut=st.integers(0, 3000),
)
def test_twins_replay_identically(both, ops, cut):
    py, c = both
    buf = replay_buffer(py, ops)
    buf = buf[: HEADER_SIZE + cut]
    results = []
    for codec in (py, c):
        tail, head, opened, dups = codec.ReplayTail(), {}, {}, []
        ret = codec.replay_records(buf, HEADER_SIZE, -1, 5 << 40, tail, head, opened, 3, dups)
        state = (list(tail.items()), tail.slots, tail.indexed)
        results.append((ret, state, list(head.items()), list(opened.items()), dups))
    assert results[0] == results[1]


def test_twins_export_the_same_names(both):
    import erq.journal.codec as selector

    py, c = both
    exported = []
    for name in CODEC_MODULES:  # each C module has every name of its twin
        twin = importlib.import_module(f"erq.journal.{name}_py")
        fast = importlib.import_module(f"erq._fast.{name}")
        assert [n for n in twin.__all__ if not hasattr(fast, n)] == [], name
        exported += twin.__all__
    assert sorted(selector.__all__) == sorted(exported)
    assert py.CRC32C_IMPLEMENTATION.startswith("google-crc32c")
    assert c.CRC32C_IMPLEMENTATION in ("sse4.2", "slicing-by-8")
