"""Parse a 4 KiB pipeline of mixed requests in one feed() call."""

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


def test_parse_4k_pipeline(benchmark, impl):
    Parser = load(impl, "_parser", "_parser_py").Parser
    parser = Parser()
    benchmark.group = "parser: 4 KiB pipeline"
    result = benchmark(parser.feed, PIPELINE)
    assert len(result) > 100
