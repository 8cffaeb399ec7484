"""The Cython parser and its pure twin agree on random streams cut at random points.

Streams mix valid and invalid requests (binary data, many-key gets, garbage, oversized items,
over-long lines, bad trailers, the binary magic byte) and small limits so that every closing
path is reached. For each stream both parsers, fed whole and fed in random chunks, must give
the same requests, ``buffered`` and ``closed`` after every feed.
"""

from __future__ import annotations

import importlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODULES = {"py": "erq._parser_py", "c": "erq._fast._parser"}
SET, GET, CMD, UNSUPPORTED = 1, 2, 3, 4


@pytest.fixture(scope="module")
def both():
    """(pure, cython) parser modules; a missing extension fails the test."""
    try:
        fast = importlib.import_module(MODULES["c"])
    except ImportError as exc:
        pytest.fail(
            f"{MODULES['c']} is not built ({exc}); run `python setup.py build_ext --inplace`"
        )
    return importlib.import_module(MODULES["py"]), fast


# -- strategies --------------------------------------------------------------------------------


def weighted(*options: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Pick one strategy with the given relative weights (one_of does not weight)."""
    return st.sampled_from([s for w, s in options for _ in range(w)]).flatmap(lambda s: s)


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True with probability about 1/n (hypothesis favours 0 and extremes of integers())."""
    return st.sampled_from([False] * (n - 1) + [True])


spaces = st.sampled_from([b" ", b" ", b" ", b"  ", b"   "])
terminators = st.sampled_from([b"\r\n", b"\r\n", b"\n"])
token_bytes = st.binary(min_size=1, max_size=12).map(
    lambda b: b.replace(b" ", b"_").replace(b"\n", b"N") or b"k"
)
names = st.one_of(st.sampled_from([b"q", b"jobs", b"Q", b"a+b", b"jobs/open/t=10"]), token_bytes)
edge_tokens = st.sampled_from(
    [
        b"0",
        b"4294967295",
        b"4294967296",
        b"-0",
        b"-1",
        b"+1",
        b"1_0",
        b"0x1",
        b"-",
        b"9223372036854775807",
        b"9223372036854775808",
        b"-9223372036854775808",
        b"-9223372036854775809",
        b"9999999999999999999",
        b"10000000000000000000",
        b"0" * 30 + b"12",
        "\u0663".encode(),
        b"1.5",
    ]
)
int_tokens = st.one_of(
    st.integers(-(2**70), 2**70).map(lambda i: str(i).encode()),
    st.integers(0, 2**33).map(lambda i: str(i).encode()),
    edge_tokens,
    token_bytes,
)
small_ints = st.integers(0, 100).map(lambda i: str(i).encode())
flag_tokens = weighted(
    (4, small_ints),
    (2, st.sampled_from([b"4294967295", b"4294967296", b"-1", b"0" * 12 + b"1"])),
    (1, edge_tokens),
    (1, int_tokens),
)
exptime_tokens = weighted(
    (4, small_ints),
    (1, st.sampled_from([b"-1", b"-0", b"-" + b"0" * 30 + b"9", b"1" + b"0" * 30])),
    (2, st.sampled_from([b"9223372036854775807", b"9223372036854775808"])),
    (2, st.sampled_from([b"-9223372036854775808", b"-9223372036854775809"])),
    (1, edge_tokens),
    (1, int_tokens),
)


@st.composite
def cased(draw, word: bytes) -> bytes:
    mask = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return bytes(c - 32 if up and 97 <= c <= 122 else c for c, up in zip(word, mask, strict=True))


@st.composite
def line(draw, tokens: list[bytes]) -> bytes:
    """Tokens joined by runs of spaces, maybe padded, with a random terminator."""
    out = draw(st.sampled_from([b"", b"", b" "]))
    for i, tok in enumerate(tokens):
        if i:
            out += draw(spaces)
        out += tok
    return out + draw(st.sampled_from([b"", b"", b" "])) + draw(terminators)


@st.composite
def storage_request(draw) -> bytes:
    word = draw(
        cased(
            draw(
                st.sampled_from(
                    [b"set", b"set", b"set", b"add", b"replace", b"cas", b"append", b"ms"]
                )
            )
        )
    )
    data = draw(st.binary(max_size=40))
    count = draw(
        weighted(
            (12, st.just(str(len(data)).encode())),
            (1, st.integers(0, 64).map(lambda i: str(i).encode())),
            (1, st.sampled_from([b"9" * 19, b"1" + b"0" * 19, b"0" * 19 + b"1", b"0" * 18 + b"1"])),
            (1, int_tokens),
        )
    )
    args = [draw(names), draw(flag_tokens), draw(exptime_tokens), count]
    if word.lower() == b"ms":  # meta set: ms <key> <datalen> <flags>*
        args = [args[0], count, *draw(st.lists(st.sampled_from([b"T0", b"F5", b"q"]), max_size=2))]
    if word.lower() == b"cas":
        args.append(draw(int_tokens))
    args += draw(st.lists(st.sampled_from([b"noreply", b"noreply", b"NOREPLY", b"x"]), max_size=2))
    if draw(one_in(20)):
        args = args[: draw(st.integers(0, 3))]  # too few arguments
    trailer = draw(st.sampled_from([b"\r\n"] * 20 + [b"\n", b"XY", b"\r", b""]))
    return draw(line([word, *args])) + data + trailer


@st.composite
def get_request(draw) -> bytes:
    word = draw(cased(draw(st.sampled_from([b"get", b"gets"]))))
    keys = draw(st.lists(names, max_size=30))
    return draw(line([word, *keys]))


@st.composite
def other_request(draw) -> bytes:
    word = draw(
        st.one_of(
            st.sampled_from(
                [b"delete", b"flush", b"stats", b"version", b"incr", b"touch", b"flush_all"]
            ).flatmap(cased),
            token_bytes,
        )
    )
    args = draw(st.lists(st.one_of(names, int_tokens), max_size=4))
    return draw(line([word, *args]))


@st.composite
def near_limits(draw, max_line: int, max_item_size: int) -> bytes:
    """A request line or data block within a byte or two of the parser's limits."""
    delta = draw(st.sampled_from([-1, 0, 1, 2]))
    if draw(st.booleans()):
        terminator = draw(terminators)
        keylen = max(0, min(max_line, 200) + delta - 4 - len(terminator))
        return b"get " + b"k" * keylen + terminator
    data = b"d" * max(0, min(max_item_size, 100) + delta)
    return b"set q 0 0 %d\r\n" % len(data) + data + b"\r\n"


limits = st.fixed_dictionaries(
    {
        "max_line": weighted((4, st.just(65536)), (1, st.sampled_from([1, 2, 8, 24, 48, 64]))),
        "max_item_size": weighted(
            (2, st.just(64 * 1024 * 1024)), (1, st.sampled_from([0, 1, 5, 16, 32]))
        ),
    }
)


@st.composite
def chunked_streams(draw):
    """(limits, stream, chunks): a stream of mixed requests and a random way to cut it."""
    lim = draw(limits)
    # Weighted so that most streams run for a while before a closing error ends them.
    requests = weighted(
        (6, storage_request()),
        (3, get_request()),
        (2, other_request()),
        (2, near_limits(**lim)),
        (1, st.sampled_from([b"\r\n", b"\n", b"   \r\n"])),  # empty lines
        (1, st.binary(max_size=40)),  # garbage, may hold newlines, \r, 0x80
        (1, st.binary(max_size=8).map(lambda b: b"\x80" + b)),  # binary protocol
    )
    stream = b"".join(draw(st.lists(requests, min_size=1, max_size=16)))
    if stream and draw(one_in(8)):
        cuts = list(range(1, len(stream)))  # byte by byte
    else:
        cuts = sorted(set(draw(st.lists(st.integers(0, len(stream)), max_size=10))))
    bounds = [0, *cuts, len(stream)]
    return lim, stream, [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def run(mod, chunks: list[bytes], max_line: int, max_item_size: int) -> list[tuple]:
    """Per-feed trace: (requests, buffered, closed) after every chunk."""
    parser = mod.Parser(max_line=max_line, max_item_size=max_item_size)
    return [(parser.feed(chunk), parser.buffered, parser.closed) for chunk in chunks]


# -- properties --------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=chunked_streams())
def test_both_parsers_agree_whole_and_chunked(both, sc):
    lim, stream, chunks = sc
    py, fast = both
    # repr tells True from 1 and None from 0, which == does not.
    py_trace = run(py, chunks, **lim)
    assert repr(run(fast, chunks, **lim)) == repr(py_trace)
    py_whole = run(py, [stream], **lim)
    assert repr(run(fast, [stream], **lim)) == repr(py_whole)
    # The same parser fed in chunks: the same requests, held bytes and state as fed whole.
    flat = [req for out, _, _ in py_trace for req in out]
    assert repr(flat) == repr(py_whole[0][0])
    if py_trace:
        assert py_trace[-1][1:] == py_whole[0][1:]


# A token ending in \r before a bare \n terminator would lose that \r (by design).
valid_names = names.map(lambda b: b.replace(b"\r", b"R"))


@st.composite
def valid_request(draw) -> tuple[bytes, tuple]:
    """A well-formed request and the tuple it must parse into (default limits)."""
    kind = draw(st.sampled_from(["set", "get", "cmd", "unsupported"]))
    if kind == "set":
        name = draw(valid_names)
        flags = draw(st.integers(0, 2**32 - 1))
        exptime = draw(st.integers(-(2**63), 2**63 - 1))
        data = draw(st.binary(max_size=100))
        noreply = draw(st.booleans())
        tokens = [draw(cased(b"set")), name, b"%d" % flags, b"%d" % exptime, b"%d" % len(data)]
        if noreply:
            tokens.append(b"noreply")
        return draw(line(tokens)) + data + b"\r\n", (SET, name, flags, exptime, data, noreply)
    if kind == "get":
        word = draw(st.sampled_from([b"get", b"gets"]))
        keys = draw(st.lists(valid_names, max_size=20))
        return draw(line([draw(cased(word)), *keys])), (GET, tuple(keys), word == b"gets")
    if kind == "unsupported":
        word = draw(st.sampled_from([b"add", b"replace", b"append", b"prepend", b"cas", b"ms"]))
        data = draw(st.binary(max_size=30))
        noreply = draw(st.booleans())
        tokens = [draw(cased(word)), draw(valid_names), b"0", b"0", b"%d" % len(data)]
        if word == b"ms":  # meta set: no noreply argument (its quiet flag lets errors through)
            noreply = False
            tokens = [tokens[0], tokens[1], tokens[4], b"T0"]
        if word == b"cas":
            tokens.append(b"12")
        if noreply:
            tokens.append(b"noreply")
        return draw(line(tokens)) + data + b"\r\n", (UNSUPPORTED, word, noreply)
    word = draw(st.sampled_from([b"delete", b"flush", b"stats", b"dump_stats", b"confirm"]))
    args = draw(st.lists(valid_names, max_size=3))
    return draw(line([draw(cased(word)), *args])), (CMD, word, args)


@settings(max_examples=200, deadline=None)
@given(
    reqs=st.lists(valid_request(), max_size=15),
    cuts=st.lists(st.integers(0, 5000), max_size=8),
)
def test_valid_streams_parse_into_their_requests(both, reqs, cuts):
    stream = b"".join(raw for raw, _ in reqs)
    expected = [req for _, req in reqs]
    bounds = [0, *sorted({c for c in cuts if c <= len(stream)}), len(stream)]
    for mod in both:
        parser = mod.Parser()
        out = []
        for a, b in zip(bounds, bounds[1:], strict=False):
            out += parser.feed(stream[a:b])
        assert repr(out) == repr(expected)
        assert parser.buffered == 0
        assert not parser.closed


# -- large blocks ------------------------------------------------------------------------------

_PATTERN = bytes(range(251)) * 300  # 75,300 bytes; a prime period shows misplaced bytes


@st.composite
def large_set_streams(draw):
    """(max_item_size, stream, chunks, expected): sets with blocks of up to ~70 KiB, so that a
    block spans many chunks, between gets; cut into chunks of random, cycled lengths.
    ``expected`` is None when a trailer was damaged (then only the two parsers are compared)."""
    max_item = draw(st.sampled_from([64 * 1024 * 1024, 65536]))
    parts, expected, damaged = [], [], False
    for _ in range(draw(st.integers(1, 4))):
        size = draw(st.one_of(st.integers(0, 70_000), st.sampled_from([65535, 65536, 65537])))
        start = draw(st.integers(0, 250))
        data = _PATTERN[start : start + size]
        trailer = draw(st.sampled_from([b"\r\n"] * 12 + [b"\r!", b"\n\n"]))
        damaged = damaged or trailer != b"\r\n"
        parts.append(b"set big%d 0 0 %d\r\n" % (start, size) + data + trailer + b"get big\r\n")
        stored = data if size <= max_item else None
        expected += [(SET, b"big%d" % start, 0, 0, stored, False), (GET, (b"big",), False)]
    stream = b"".join(parts)
    lengths = draw(st.lists(st.integers(1, 9000), min_size=1, max_size=12))
    # At most ~2,000 feeds per parser, however small the drawn lengths.
    scale = -(-len(stream) // (2000 * (sum(lengths) // len(lengths))))
    chunks, pos, i = [], 0, 0
    while pos < len(stream):
        step = lengths[i % len(lengths)] * scale
        chunks.append(stream[pos : pos + step])
        pos += step
        i += 1
    return max_item, stream, chunks, None if damaged else expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=large_set_streams())
def test_both_parsers_agree_on_large_blocks_split_over_many_chunks(both, sc):
    max_item, stream, chunks, expected = sc
    py, fast = both
    lim = {"max_line": 65536, "max_item_size": max_item}
    py_trace = run(py, chunks, **lim)
    assert repr(run(fast, chunks, **lim)) == repr(py_trace)
    flat = [req for out, _, _ in py_trace for req in out]
    assert repr(flat) == repr(run(py, [stream], **lim)[0][0])
    if expected is not None:
        assert flat == expected
        assert py_trace[-1][1:] == (0, False)


@st.composite
def two_connections(draw):
    """(limit, feeds): two streams of large sets cut into chunks, and the order in which the
    two connections' chunks are fed, for parsers that share one DataBudget."""
    streams = [draw(large_set_streams()) for _ in range(2)]
    queues = [list(chunks) for _, _, chunks, _ in streams]
    if draw(st.booleans()):  # storage commands a queue refuses: their data is read all the same
        word = draw(st.sampled_from([b"add", b"cas"]))
        queues[1] = [chunk.replace(b"set big", word + b" big") for chunk in queues[1]]
    order = draw(st.lists(st.integers(0, 1), max_size=sum(len(q) for q in queues)))
    feeds = []
    for who in order + [0] * len(queues[0]) + [1] * len(queues[1]):
        if queues[who]:
            feeds.append((who, queues[who].pop(0)))
    limit = draw(st.sampled_from([0, 4096, 20_000, 70_000, 1 << 20]))
    return limit, feeds


def run_shared(mod, limit: int, feeds: list[tuple[int, bytes]]) -> list[tuple]:
    """Per-feed trace of two parsers sharing a budget: what the fed one returned and held,
    and the budget's room held and refusals."""
    budget = mod.DataBudget(limit)
    parsers = [mod.Parser(budget=budget) for _ in range(2)]
    trace = []
    for who, chunk in feeds:
        out = parsers[who].feed(chunk)
        trace.append((who, out, parsers[who].buffered, budget.held, budget.refused))
    for parser in parsers:  # the connections end, mid-block or not: all their room comes back
        parser.discard()
    assert budget.held == 0
    return trace


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=two_connections())
def test_both_parsers_agree_on_room_and_refusals_when_connections_share_a_budget(both, sc):
    limit, feeds = sc
    py, fast = both
    py_trace = run_shared(py, limit, feeds)
    assert repr(run_shared(fast, limit, feeds)) == repr(py_trace)
    assert all(held >= 0 for *_, held, _ in py_trace)
