"""Parser micro-benchmarks: a 4 KiB pipeline of mixed requests in one feed() call, and one
64 KiB set arriving in 4 KiB chunks (the large-item path: the block is filled as it arrives)."""

from conftest import load


def _pipeline() -> bytes:
    parts = []
    i = 0
    while sum(map(len, parts)) < 4096:
        kind = i % 4
        if kind == 0:
            parts.append(b"set jobs 0 0 10\r\n0123456789\r\n")
        elif kind == 1:
            parts.append(b"get jobs/t=100/close/open\r\n")
        elif kind == 2:
            parts.append(b"get jobs\r\n")
        else:
            parts.append(b'set events 5 3600 22\r\n{"id": 17, "ok": true}\r\n')
        i += 1
    return b"".join(parts)


PIPELINE = _pipeline()

VALUE_64K = bytes(range(256)) * 256
SET_64K = b"set jobs 0 0 %d\r\n" % len(VALUE_64K) + VALUE_64K + b"\r\n"
# Cut the way a socket delivers it: the line and the first bytes of the block share a chunk,
# the trailer arrives with the last bytes of the block.
CHUNKS_4K = [SET_64K[i : i + 4096] for i in range(0, len(SET_64K), 4096)]


def test_parse_4k_pipeline(benchmark, impl):
    Parser = load(impl, "_parser", "_parser_py").Parser
    parser = Parser()
    benchmark.group = "parser: 4 KiB pipeline"
    result = benchmark(parser.feed, PIPELINE)
    assert len(result) > 100


def test_parse_64k_set_in_4k_chunks(benchmark, impl):
    Parser = load(impl, "_parser", "_parser_py").Parser
    parser = Parser()
    feed = parser.feed

    def feed_all() -> list[tuple]:
        out: list[tuple] = []
        for chunk in CHUNKS_4K:
            out += feed(chunk)
        return out

    benchmark.group = "parser: 64 KiB set in 4 KiB chunks"
    result = benchmark(feed_all)
    assert len(CHUNKS_4K) == 17
    assert result == [(1, b"jobs", 0, 0, VALUE_64K, False)]
    assert parser.buffered == 0
