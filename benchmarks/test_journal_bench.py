"""Journal codec: record encode, and the append of one ADD record into a mapped segment."""

import mmap

from conftest import load

DATA = b"0123456789"


def test_encode_add(benchmark, impl):
    codec = load(impl, "_journal", "journal._codec_py")
    benchmark.group = "journal: encode one 10-byte ADD record"
    record = benchmark(codec.encode_add, 17, 0, 1_700_000_000_000, 0, DATA)
    assert len(record) > len(DATA)


def test_append_add_into_mmap(benchmark, impl):
    codec = load(impl, "_journal", "journal._codec_py")
    size = 64 << 20
    region = mmap.mmap(-1, size)
    state = {"writer": codec.SegmentWriter(region, 32), "id": 0}

    def append_1000():
        writer = state["writer"]
        if writer.remaining < 1 << 20:
            writer.release()
            writer = state["writer"] = codec.SegmentWriter(region, 32)
        append = writer.append_add
        base = state["id"]
        for i in range(base, base + 1000):
            append(i, 0, 1_700_000_000_000, 0, DATA)
        state["id"] = base + 1000

    benchmark.group = "journal: append 1000 10-byte ADD records into an mmap"
    benchmark(append_1000)
    state["writer"].release()
    assert state["id"] >= 1000
