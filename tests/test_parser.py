"""The request parser: every framing rule, on the Cython build ("c") and its pure twin ("py")."""

from __future__ import annotations

import importlib
import random
import tracemalloc

import pytest

MODULES = {"py": "erq._parser_py", "c": "erq._fast._parser"}

ERR_FORMAT = (5, b"CLIENT_ERROR bad command line format\r\n", True)
ERR_CHUNK = (5, b"CLIENT_ERROR bad data chunk\r\n", True)
ERR_TOO_LONG = (5, b"CLIENT_ERROR line too long\r\n", True)
SET, GET, CMD, UNSUPPORTED, ERROR, BINARY = 1, 2, 3, 4, 5, 6


@pytest.fixture(params=["py", "c"])
def mod(request: pytest.FixtureRequest):
    """The parser module of one implementation; a missing extension fails the "c" case."""
    if request.param == "c" and not request.config.getoption("--c-extensions", default=True):
        pytest.skip("--no-c-extensions")
    name = MODULES[request.param]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"{name} is not built ({exc}); run `python setup.py build_ext --inplace`")


def parse(mod, data: bytes, **limits):
    """Feed ``data`` in one call; return (requests, parser)."""
    parser = mod.Parser(**limits)
    return parser.feed(data), parser


def feed_bytewise(parser, data: bytes) -> list[tuple]:
    out: list[tuple] = []
    for i in range(len(data)):
        out += parser.feed(data[i : i + 1])
    return out


def strict(requests: list[tuple]) -> str:
    """repr tells True from 1 and None from 0, which == does not."""
    return repr(requests)


# -- module surface ----------------------------------------------------------------------------


def test_request_kind_constants_have_the_agreed_values(mod):
    assert (mod.REQ_SET, mod.REQ_GET, mod.REQ_CMD) == (1, 2, 3)
    assert (mod.REQ_UNSUPPORTED, mod.REQ_ERROR, mod.REQ_BINARY) == (4, 5, 6)


def test_selector_exports_the_same_names():
    from erq import parser

    for name in ("REQ_SET", "REQ_GET", "REQ_CMD", "REQ_UNSUPPORTED", "REQ_ERROR", "REQ_BINARY"):
        assert getattr(parser, name) == getattr(importlib.import_module(MODULES["py"]), name)
    assert callable(parser.Parser)


def test_a_list_feed_returned_changes_only_once_its_holder_emptied_it_and_let_go(mod):
    """The compiled parser hands feed's list out again to save making one per read, but only
    once its caller emptied it and holds it no more (the protocol's way): a list kept, full or
    emptied, keeps what it held, and every feed still returns exactly its own requests."""
    parser = mod.Parser()
    kept = parser.feed(b"get a\r\nset b 0 0 1\r\nx\r\n")
    assert kept == [(GET, (b"a",), False), (SET, b"b", 0, 0, b"x", False)]
    assert parser.feed(b"get c\r\n") == [(GET, (b"c",), False)]
    assert kept == [(GET, (b"a",), False), (SET, b"b", 0, 0, b"x", False)]
    emptied = parser.feed(b"get d\r\n")
    assert emptied == [(GET, (b"d",), False)]
    emptied.clear()
    assert parser.feed(b"get e\r\n") == [(GET, (b"e",), False)]
    assert emptied == []
    del kept, emptied
    for name in (b"f", b"g", b"h"):
        requests = parser.feed(b"get " + name + b"\r\n")
        assert requests == [(GET, (name,), False)]
        requests.clear()
        del requests
    assert parser.feed(b"set i 0 0 2\r\n") == []  # waits for its data: an empty list
    assert parser.feed(b"hi\r\n") == [(SET, b"i", 0, 0, b"hi", False)]


@pytest.mark.parametrize("limits", [{"max_line": 0}, {"max_item_size": -1}])
def test_constructor_rejects_impossible_limits(mod, limits):
    with pytest.raises(ValueError):
        mod.Parser(**limits)


@pytest.mark.parametrize("limits", [(0, 10), (10, -1)])
def test_set_limits_rejects_impossible_limits_and_keeps_the_old_ones(mod, limits):
    parser = mod.Parser(max_line=64, max_item_size=4)
    with pytest.raises(ValueError):
        parser.set_limits(*limits)
    assert parser.feed(b"set q 0 0 5\r\n12345\r\n") == [(SET, b"q", 0, 0, None, False)]


def test_set_limits_applies_from_the_next_line_and_not_to_a_block_being_read(mod):
    parser = mod.Parser(max_line=64, max_item_size=4)
    assert parser.feed(b"set q 0 0 4\r\n12") == []
    parser.set_limits(16, 2)
    assert parser.feed(b"34\r\n") == [(SET, b"q", 0, 0, b"1234", False)]  # accepted before
    assert parser.feed(b"set q 0 0 3\r\nabc\r\n") == [(SET, b"q", 0, 0, None, False)]
    parser.set_limits(16, 8)
    assert parser.feed(b"set q 0 0 3\r\nabc\r\n") == [(SET, b"q", 0, 0, b"abc", False)]
    out = parser.feed(b"get q/t=1000000000000\r\n")  # 24 bytes: over the new max_line
    assert out == [ERR_TOO_LONG] and parser.closed


def test_a_lower_max_line_under_a_buffered_line_refuses_it_without_reading_past_the_chunk(
    impl,
):
    """A reload that lowers max_line below a line already buffered: the compiled parser took
    a negative length to memchr, which read on past the chunk until it met a newline
    somewhere in memory (seen with AddressSanitizer, and as a crash where the read reached
    unmapped memory; without them the reply was the same). This pins the reply; in a child
    process, so that a crash fails the test rather than the run."""
    from support import run_script

    script = (
        "import json, sys\n"
        "from erq import parser\n"
        "p = parser.Parser(max_line=65536)\n"
        "first = p.feed(b'get ' + b'k' * 5000)\n"
        "p.set_limits(1024, 1 << 20)\n"
        "out = p.feed(b'x' * (8 << 20))\n"
        "print(json.dumps([len(first), [repr(r) for r in out], p.closed]))\n"
    )
    first, out, closed = run_script(impl, script)
    assert first == 0 and closed, (out, closed)
    assert out == [repr(ERR_TOO_LONG)], out


def test_fresh_parser_holds_nothing_and_is_open(mod):
    parser = mod.Parser()
    assert parser.buffered == 0
    assert parser.closed is False
    assert parser.feed(b"") == []


def test_feed_accepts_bytes_like_objects(mod):
    parser = mod.Parser()
    assert parser.feed(memoryview(b"get a\r\n")) == [(GET, (b"a",), False)]
    assert parser.feed(bytearray(b"get b\r\n")) == [(GET, (b"b",), False)]


# -- set ---------------------------------------------------------------------------------------


def test_set_yields_name_flags_exptime_and_data(mod):
    out, parser = parse(mod, b"set jobs 7 60 5\r\nhello\r\n")
    assert strict(out) == strict([(SET, b"jobs", 7, 60, b"hello", False)])
    assert parser.buffered == 0
    assert not parser.closed


def test_set_noreply_is_the_fifth_argument_exactly(mod):
    out, _ = parse(
        mod,
        b"set q 0 0 1 noreply\r\nx\r\nset q 0 0 1 NOREPLY\r\nx\r\nset q 0 0 1 noreplyx\r\nx\r\n",
    )
    assert strict(out) == strict(
        [
            (SET, b"q", 0, 0, b"x", True),
            (SET, b"q", 0, 0, b"x", False),
            (SET, b"q", 0, 0, b"x", False),
        ]
    )


def test_set_with_more_than_five_arguments_has_no_flags_or_exptime_but_data_is_read(mod):
    # noreply counts only as the last argument: this line is malformed, and answered.
    out, parser = parse(mod, b"set q 1 2 3 noreply extra\r\na\r\n\r\nget q\r\n")
    assert strict(out) == strict([(SET, b"q", None, None, b"a\r\n", False), (GET, (b"q",), False)])
    assert not parser.closed
    out, _ = parse(mod, b"set q 1 2 3 4 5 6\r\nabc\r\n")
    assert strict(out) == strict([(SET, b"q", None, None, b"abc", False)])


@pytest.mark.parametrize(
    ("token", "flags"),
    [
        (b"0", 0),
        (b"4294967295", 2**32 - 1),
        (b"4294967296", None),
        (b"-1", None),
        (b"+1", None),
        (b"1_0", None),
        (b"0x10", None),
        (b"1.0", None),
        (b"00012", 12),
        (b"0" * 5000 + b"7", 7),
        (b"9" * 5000, None),
        (b"9" * 19, None),  # the most digits checked once, at the end: still over the limit
        (b"9" * 20, None),
        (b"0" * 18 + b"4294967295", 2**32 - 1),
        (b"0" * 9 + b"4294967296", None),
        ("\u0663".encode(), None),  # ARABIC-INDIC DIGIT THREE: int() would take it
        ("\uff11".encode(), None),  # FULLWIDTH DIGIT ONE
        (b"\xb2", None),  # latin-1 superscript two
    ],
)
def test_set_flags_are_decimal_digits_up_to_u32_max(mod, token, flags):
    out, _ = parse(mod, b"set q " + token + b" 0 1\r\nx\r\n")
    assert strict(out) == strict([(SET, b"q", flags, 0, b"x", False)])


@pytest.mark.parametrize(
    ("token", "exptime"),
    [
        (b"0", 0),
        (b"-1", -1),
        (b"-0", 0),
        (b"2592000", 2592000),
        (b"9223372036854775807", 2**63 - 1),
        (b"9223372036854775808", None),
        (b"9999999999999999999", None),
        (b"18446744073709551616", None),  # 2**64: twenty digits
        (b"-9223372036854775808", -(2**63)),
        (b"-9223372036854775809", None),
        (b"000000000000000000000000042", 42),
        (b"-" + b"0" * 5000 + b"5", -5),
        (b"-", None),
        (b"--1", None),
        (b"+5", None),
        (b"1-", None),
        (b"1.5", None),
        (b"1_0", None),
        ("-\u0663".encode(), None),
    ],
)
def test_set_exptime_is_an_optionally_negative_int64(mod, token, exptime):
    out, _ = parse(mod, b"set q 0 " + token + b" 1\r\nx\r\n")
    assert strict(out) == strict([(SET, b"q", 0, exptime, b"x", False)])


def test_set_data_is_binary_safe(mod):
    data = b"a\r\nb\nc\rd\x00e\x80f\r\n"
    out, _ = parse(mod, b"set q 0 0 %d\r\n%s\r\nget q\r\n" % (len(data), data))
    assert strict(out) == strict([(SET, b"q", 0, 0, data, False), (GET, (b"q",), False)])


def test_set_of_zero_bytes_yields_empty_data(mod):
    out, _ = parse(mod, b"set q 0 0 0\r\n\r\n")
    assert strict(out) == strict([(SET, b"q", 0, 0, b"", False)])


def test_set_byte_count_with_leading_zeros_is_its_value_however_many_they_are(mod):
    # As flags and exptime are, and as memcached reads it.
    out, _ = parse(mod, b"set q 0 0 %s3\r\nabc\r\nset q 0 0 %s\r\n\r\n" % (b"0" * 40, b"0" * 25))
    assert strict(out) == strict([(SET, b"q", 0, 0, b"abc", False), (SET, b"q", 0, 0, b"", False)])


def test_bare_newline_ends_a_request_line(mod):
    out, _ = parse(mod, b"set q 0 0 3\nabc\r\nget q\nversion\n")
    assert strict(out) == strict(
        [(SET, b"q", 0, 0, b"abc", False), (GET, (b"q",), False), (CMD, b"version", [])]
    )


def test_data_block_waits_for_both_trailer_bytes(mod):
    parser = mod.Parser()
    assert parser.feed(b"set q 0 0 3\r\nabc\r") == []
    assert parser.buffered == 4
    assert parser.feed(b"\n") == [(SET, b"q", 0, 0, b"abc", False)]
    assert parser.buffered == 0


@pytest.mark.parametrize("trailer", [b"X\n", b"\rX", b"\n\n", b"\r\r", b"\n\r", b"ab"])
def test_data_not_followed_by_crlf_is_a_closing_error(mod, trailer):
    out, parser = parse(mod, b"get a\r\nset q 0 0 3\r\nabc" + trailer + b"get b\r\n")
    assert out == [(GET, (b"a",), False), ERR_CHUNK]
    assert parser.closed
    assert parser.buffered == 0


def test_data_longer_than_declared_is_a_closing_error(mod):
    out, parser = parse(mod, b"set q 0 0 3\r\nabcd\r\n")
    assert out == [ERR_CHUNK]
    assert parser.closed


@pytest.mark.parametrize(
    "line",
    [
        b"set",
        b"set q",
        b"set q 0",
        b"set q 0 0",
        b"SET   q  0   0  ",
        b"set q 0 0 abc",
        b"set q 0 0 -1",
        b"set q 0 0 +1",
        b"set q 0 0 1_0",
        b"set q 0 0 0x1",
        b"set q 0 0 1.0",
        b"set q 0 0 12345678901234567890",  # 20 digits
        b"set q 0 0 010000000000000000000",  # 20 digits once its leading zero is gone
        b"set q 0 0 " + "\u0663".encode(),
        b"set q 0 0 5\r",  # only one \r is stripped: the count is b"5\r"
    ],
)
def test_set_without_a_usable_byte_count_is_a_closing_error(mod, line):
    out, parser = parse(mod, b"get a\r\n" + line + b"\r\nhello\r\nget b\r\n")
    assert out == [(GET, (b"a",), False), ERR_FORMAT]
    assert parser.closed
    assert parser.buffered == 0


def test_byte_count_of_nineteen_digits_is_accepted(mod):
    parser = mod.Parser(max_item_size=8)
    assert parser.feed(b"set q 0 0 0000000000000000005\r\nhello\r\n") == [
        (SET, b"q", 0, 0, b"hello", False)
    ]
    # 19 nines: a valid count, far over the limit, so its bytes are being skipped.
    assert parser.feed(b"set q 0 0 9999999999999999999\r\n" + b"x" * 1000) == []
    assert not parser.closed
    assert parser.buffered == 0


# -- item size limit ---------------------------------------------------------------------------


def test_item_of_exactly_max_item_size_is_kept(mod):
    out, _ = parse(mod, b"set q 0 0 8\r\n12345678\r\n", max_item_size=8)
    assert out == [(SET, b"q", 0, 0, b"12345678", False)]


def test_item_over_max_item_size_is_skipped_with_data_none(mod):
    stream = b"set q 3 4 9 noreply\r\n123456789\r\nget q\r\n"
    out, parser = parse(mod, stream, max_item_size=8)
    assert strict(out) == strict([(SET, b"q", 3, 4, None, True), (GET, (b"q",), False)])
    assert not parser.closed


def test_skipped_item_trailer_is_not_checked(mod):
    out, parser = parse(mod, b"set q 0 0 9\r\n123456789XYget q\r\n", max_item_size=8)
    assert strict(out) == strict([(SET, b"q", 0, 0, None, False), (GET, (b"q",), False)])
    assert not parser.closed


def test_zero_max_item_size_allows_only_empty_items(mod):
    out, _ = parse(mod, b"set q 0 0 0\r\n\r\nset q 0 0 1\r\nx\r\n", max_item_size=0)
    assert out == [(SET, b"q", 0, 0, b"", False), (SET, b"q", 0, 0, None, False)]


def test_oversized_item_is_never_buffered(mod):
    """A 1 GiB declared item streamed in 64 KiB chunks: memory never follows the size."""
    chunk = bytes(64 * 1024)
    size = 1 << 30
    parser = mod.Parser()  # default max_item_size: 64 MiB
    assert parser.feed(b"set big 0 0 %d\r\n" % size + chunk[:100]) == []
    assert parser.buffered == 0
    sent = 100
    while sent + len(chunk) <= size:
        assert parser.feed(chunk) == []
        assert parser.buffered == 0
        sent += len(chunk)
    rest = size - sent
    out = parser.feed(chunk[:rest] + b"\r\nget big\r\n")
    assert out == [(SET, b"big", 0, 0, None, False), (GET, (b"big",), False)]
    assert parser.buffered == 0
    assert not parser.closed


def test_large_item_arriving_in_many_chunks_is_reassembled(mod):
    data = bytes(range(256)) * 4096  # 1 MiB
    parser = mod.Parser()
    stream = b"set q 0 0 %d\r\n" % len(data) + data + b"\r\nget q\r\n"
    out = []
    step = 1000
    for i in range(0, len(stream), step):
        out += parser.feed(stream[i : i + step])
        if not out:
            assert parser.buffered == min(i + step, len(stream)) - len(b"set q 0 0 1048576\r\n")
    assert out == [(SET, b"q", 0, 0, data, False), (GET, (b"q",), False)]
    assert parser.buffered == 0


@pytest.mark.parametrize("size", [(1 << 20) + 1, 3 * (1 << 20) + 17, 5 * (1 << 20)])
def test_a_block_larger_than_the_first_reserve_is_reassembled_from_any_chunking(mod, size):
    """Past its first 1 MiB the compiled parser grows the block as bytes arrive; chunks that
    end short of, exactly at and across each growth step must all land where they belong."""
    rng = random.Random(size)
    data = rng.randbytes(size)
    stream = b"set q 0 0 %d\r\n" % size + data + b"\r\nget q\r\n"
    for _ in range(4):
        parser = mod.Parser()
        out, pos = [], 0
        while pos < len(stream):
            step = rng.choice([1, 999, 1 << 16, (1 << 20) - 1, 1 << 20, (1 << 21) + 3])
            out += parser.feed(stream[pos : pos + step])
            pos += step
        assert out == [(SET, b"q", 0, 0, data, False), (GET, (b"q",), False)]
        assert parser.buffered == 0


def test_a_declared_size_is_not_reserved_before_its_bytes_arrive(mod):
    """A client that declares 64 MiB and sends ten bytes costs about a MiB, not 64: declared
    sizes are the client's word, and a hundred such half-sent sets would otherwise hold
    6.4 GB of address space (a MemoryError under an address-space limit)."""
    parser = mod.Parser()
    tracemalloc.start()
    try:
        assert parser.feed(b"set q 0 0 67108864\r\n" + b"x" * 10) == []
        held, _ = tracemalloc.get_traced_memory()
        assert parser.feed(b"y" * (3 << 20)) == []
        held_later, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2 << 20
    assert held_later < 8 << 20
    assert parser.buffered == 10 + (3 << 20)


def test_buffered_counts_a_partial_line_and_a_partial_block(mod):
    parser = mod.Parser()
    assert parser.feed(b"get ab") == []
    assert parser.buffered == 6
    assert parser.feed(b"c\r\nset q 0 0 10\r\n0123") == [(GET, (b"abc",), False)]
    assert parser.buffered == 4
    assert parser.feed(b"456789\r\nget") == [(SET, b"q", 0, 0, b"0123456789", False)]
    assert parser.buffered == 3


# -- line length -------------------------------------------------------------------------------


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
def test_line_of_exactly_max_line_bytes_is_accepted(mod, terminator):
    line = b"get " + b"k" * (32 - 4 - len(terminator)) + terminator
    assert len(line) == 32
    out, parser = parse(mod, line, max_line=32)
    assert out == [(GET, (b"k" * (28 - len(terminator)),), False)]
    assert not parser.closed


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
def test_line_one_byte_over_max_line_is_a_closing_error(mod, terminator):
    line = b"get " + b"k" * (33 - 4 - len(terminator)) + terminator
    assert len(line) == 33
    out, parser = parse(mod, b"get a\r\n" + line + b"get b\r\n", max_line=32)
    assert out == [(GET, (b"a",), False), ERR_TOO_LONG]
    assert parser.closed
    assert parser.buffered == 0


def test_line_too_long_is_detected_before_its_newline_arrives(mod):
    parser = mod.Parser(max_line=32)
    assert parser.feed(b"get " + b"k" * 20) == []
    assert parser.buffered == 24
    assert parser.feed(b"k" * 7) == []  # 31 bytes, the newline could still fit
    assert parser.feed(b"k") == [ERR_TOO_LONG]  # 32 bytes and no newline: cannot fit
    assert parser.closed
    assert parser.buffered == 0


def test_line_too_long_in_one_chunk_is_detected_without_a_newline(mod):
    out, parser = parse(mod, b"x" * 100, max_line=32)
    assert out == [ERR_TOO_LONG]
    assert parser.closed


def test_data_blocks_are_not_subject_to_max_line(mod):
    data = b"d" * 100
    out, parser = parse(mod, b"set q 0 0 100\r\n" + data + b"\r\nget q\r\n", max_line=16)
    assert out == [(SET, b"q", 0, 0, data, False), (GET, (b"q",), False)]
    assert not parser.closed


def test_storage_line_is_subject_to_max_line(mod):
    out, parser = parse(mod, b"set queue 0 0 1 noreply\r\nx\r\n", max_line=16)
    assert out == [ERR_TOO_LONG]
    assert parser.closed


# -- binary protocol ---------------------------------------------------------------------------


def test_binary_protocol_magic_byte_closes(mod):
    out, parser = parse(mod, b"\x80\x01\x00\x05get a\r\n")
    assert out == [(BINARY,)]
    assert parser.closed
    assert parser.buffered == 0


def test_binary_magic_is_recognised_on_its_own_first_byte(mod):
    parser = mod.Parser()
    assert parser.feed(b"get a\r\nset q 0 0 1\r\nx\r\n\x80") == [
        (GET, (b"a",), False),
        (SET, b"q", 0, 0, b"x", False),
        (BINARY,),
    ]
    assert parser.closed


def test_magic_byte_inside_a_request_is_ordinary_data(mod):
    out, parser = parse(mod, b"get \x80\r\n \x80\r\nset q 0 0 1\r\n\x80\r\n")
    assert out == [
        (GET, (b"\x80",), False),
        (CMD, b"\x80", []),
        (SET, b"q", 0, 0, b"\x80", False),
    ]
    assert not parser.closed


# -- tokens ------------------------------------------------------------------------------------


def test_get_and_gets_take_any_number_of_keys(mod):
    out, _ = parse(mod, b"get\r\nget a\r\ngets a b/open c/t=10\r\n")
    assert strict(out) == strict(
        [(GET, (), False), (GET, (b"a",), False), (GET, (b"a", b"b/open", b"c/t=10"), True)]
    )


def test_command_word_is_case_insensitive_and_arguments_keep_their_case(mod):
    out, _ = parse(
        mod,
        b"GeT Ab\r\nGETS x\r\nSeT Q 0 0 1\r\nx\r\nDELETE Q NoReply\r\nFlush_All\r\nAdd q 0 0 0\r\n\r\n",
    )
    assert strict(out) == strict(
        [
            (GET, (b"Ab",), False),
            (GET, (b"x",), True),
            (SET, b"Q", 0, 0, b"x", False),
            (CMD, b"delete", [b"Q", b"NoReply"]),
            (CMD, b"flush_all", []),
            (UNSUPPORTED, b"add", False),
        ]
    )


def test_runs_of_spaces_separate_tokens(mod):
    out, _ = parse(mod, b"  get   a    b  \r\n set  q   1  2  1   noreply  \r\nx\r\n")
    assert strict(out) == strict([(GET, (b"a", b"b"), False), (SET, b"q", 1, 2, b"x", True)])


def test_only_spaces_separate_tokens(mod):
    out, _ = parse(mod, b"get\ta\r\nget a\tb\x0bc\r\nset\tq 0 0 1\r\n")
    assert out == [
        (CMD, b"get\ta", []),
        (GET, (b"a\tb\x0bc",), False),
        (CMD, b"set\tq", [b"0", b"0", b"1"]),
    ]


def test_only_one_carriage_return_is_stripped(mod):
    out, _ = parse(mod, b"get a\r\r\nget b\r\nget \r\n")
    assert out == [(GET, (b"a\r",), False), (GET, (b"b",), False), (GET, (), False)]


@pytest.mark.parametrize("line", [b"\r\n", b"\n", b"   \r\n", b" \n"])
def test_empty_line_is_a_command_with_an_empty_word(mod, line):
    out, parser = parse(mod, line)
    assert out == [(CMD, b"", [])]
    assert not parser.closed


def test_other_commands_are_plain_commands(mod):
    out, _ = parse(
        mod,
        b"delete q noreply\r\nincr q 1\r\ndecr q 1\r\ntouch q 10\r\nstats\r\n"
        b"monitor q 5 10\r\nx\r\n",
    )
    assert out == [
        (CMD, b"delete", [b"q", b"noreply"]),
        (CMD, b"incr", [b"q", b"1"]),
        (CMD, b"decr", [b"q", b"1"]),
        (CMD, b"touch", [b"q", b"10"]),
        (CMD, b"stats", []),
        (CMD, b"monitor", [b"q", b"5", b"10"]),
        (CMD, b"x", []),
    ]


def test_command_word_longer_than_any_known_word_is_lowercased(mod):
    word = b"VeryLongCommandWord" * 100
    out, _ = parse(mod, word + b" A\r\n")
    assert out == [(CMD, word.lower(), [b"A"])]


# -- unsupported storage commands --------------------------------------------------------------


@pytest.mark.parametrize("word", [b"add", b"replace", b"append", b"prepend", b"ADD", b"Prepend"])
def test_storage_words_consume_their_data_and_are_unsupported(mod, word):
    stream = word + b" q 0 0 4\r\n\r\n\r\n\r\n" + word + b" q 0 0 1 noreply\r\nx\r\nget q\r\n"
    out, parser = parse(mod, stream)
    assert strict(out) == strict(
        [
            (UNSUPPORTED, word.lower(), False),
            (UNSUPPORTED, word.lower(), True),
            (GET, (b"q",), False),
        ]
    )
    assert not parser.closed


def test_cas_reads_its_data_and_its_noreply_is_the_sixth_argument(mod):
    out, parser = parse(
        mod,
        b"cas q 0 0 2 77\r\nab\r\n"
        b"cas q 0 0 2 77 noreply\r\nab\r\n"
        b"cas q 0 0 2 noreply\r\nab\r\n"
        b"CAS q 0 0 2\r\nab\r\n",
    )
    assert strict(out) == strict(
        [
            (UNSUPPORTED, b"cas", False),
            (UNSUPPORTED, b"cas", True),
            (UNSUPPORTED, b"cas", False),
            (UNSUPPORTED, b"cas", False),
        ]
    )
    assert not parser.closed


@pytest.mark.parametrize(
    "line", [b"add q 0 0", b"replace q 0 0 x", b"append q", b"prepend", b"cas q 0 0 -2 1"]
)
def test_storage_words_without_a_usable_byte_count_are_a_closing_error(mod, line):
    out, parser = parse(mod, line + b"\r\nab\r\n")
    assert out == [ERR_FORMAT]
    assert parser.closed


def test_meta_set_reads_its_data_block_and_is_unsupported(mod):
    """memcached's ``ms <key> <datalen> <flags>*``: its data is skipped, never run as requests
    (a value reading ``delete q`` deleted the queue); its quiet flag q does not silence the
    error, and without a usable length the stream cannot be followed: a closing error."""
    out, parser = parse(mod, b"ms q 13 T0 q\r\ndelete q\r\nget\r\nMS q 2\r\nab\r\nget q\r\n")
    assert strict(out) == strict(
        [(UNSUPPORTED, b"ms", False), (UNSUPPORTED, b"ms", False), (GET, (b"q",), False)]
    )
    assert not parser.closed
    for line in (b"ms q", b"ms q x", b"ms q -1", b"ms"):
        out, parser = parse(mod, line + b"\r\nab\r\n")
        assert out == [ERR_FORMAT], line
        assert parser.closed
    out, parser = parse(mod, b"ms q 9\r\n123456789\r\nget q\r\n", max_item_size=8)
    assert strict(out) == strict([(UNSUPPORTED, b"ms", False), (GET, (b"q",), False)])
    for word in (b"mg", b"md", b"mn", b"m", b"mss"):  # no data block: other commands
        out, parser = parse(mod, word + b" q 2\r\n")
        assert out == [(CMD, word, [b"q", b"2"])], word


def test_storage_words_check_the_trailer_and_skip_oversized_data(mod):
    out, parser = parse(mod, b"append q 0 0 9 noreply\r\n123456789\r\n", max_item_size=8)
    assert out == [(UNSUPPORTED, b"append", True)]
    out, parser = parse(mod, b"prepend q 0 0 2\r\nabc\r\n")
    assert out == [ERR_CHUNK]
    assert parser.closed


# -- streaming ---------------------------------------------------------------------------------


def test_pipelined_batch_is_parsed_in_one_feed(mod):
    requests = []
    expected = []
    for i in range(100):
        if i % 2:
            requests.append(b"get jobs/t=1000/open\r\n")
            expected.append((GET, (b"jobs/t=1000/open",), False))
        else:
            data = b"%040d" % i
            requests.append(b"set jobs 0 0 40\r\n" + data + b"\r\n")
            expected.append((SET, b"jobs", 0, 0, data, False))
    out, parser = parse(mod, b"".join(requests))
    assert strict(out) == strict(expected)
    assert parser.buffered == 0


MIXED_STREAM = (
    b"set q 1 -1 5 noreply\r\nhe\r\no\r\n"
    b"GET a b c\r\n"
    b"\r\n"
    b"  delete   q  \n"
    b"cas q 0 0 3 9\r\nabc\r\n"
    b"set big 0 0 20\r\n" + b"z" * 20 + b"\r\n"
    b"gets x\r\n"
    b"set q 4294967296 9223372036854775808 0 extra\r\n\r\n"
    b"add q 0 0 1\r\n\n\r\n"
    b"version\n"
)


def test_feeding_byte_by_byte_equals_feeding_the_whole_stream(mod):
    whole, whole_parser = parse(mod, MIXED_STREAM, max_item_size=16)
    parser = mod.Parser(max_item_size=16)
    assert strict(feed_bytewise(parser, MIXED_STREAM)) == strict(whole)
    assert len(whole) == 10
    assert parser.buffered == whole_parser.buffered == 0


def test_any_single_cut_gives_the_same_requests(mod):
    whole, _ = parse(mod, MIXED_STREAM, max_item_size=16)
    for cut in range(len(MIXED_STREAM) + 1):
        parser = mod.Parser(max_item_size=16)
        out = parser.feed(MIXED_STREAM[:cut]) + parser.feed(MIXED_STREAM[cut:])
        assert strict(out) == strict(whole), cut


def test_closing_errors_are_the_same_when_fed_byte_by_byte(mod):
    for stream, limits in [
        (b"get a\r\nset q 0 0 x\r\n", {}),
        (b"set q 0 0 2\r\nabXY", {}),
        (b"get a\r\nget " + b"k" * 40, {"max_line": 16}),
        (b"get a\r\n\x80", {}),
    ]:
        whole, _ = parse(mod, stream, **limits)
        parser = mod.Parser(**limits)
        assert feed_bytewise(parser, stream) == whole
        assert whole[-1][0] in (ERROR, BINARY)
        assert parser.closed


def test_closed_parser_ignores_further_input(mod):
    parser = mod.Parser()
    assert parser.feed(b"set q 0 0 oops\r\nget a\r\n") == [ERR_FORMAT]
    assert parser.closed
    assert parser.feed(b"get a\r\n") == []
    assert parser.feed(b"partial") == []
    assert parser.buffered == 0
    assert parser.closed


def test_get_keys_are_parsed_once_unless_long(impl):
    """A hot key's spec is made once and cached; a key longer than a queue name and its usual
    options is not cached (4,096 keys as long as max_line would hold half a gigabyte)."""
    from conftest import impl_module

    keys = impl_module(impl, "_keys", "_keys_py")
    short = b"jobs/t=1000/open"
    assert keys.parse_key(short) is keys.parse_key(short)
    long = b"jobs/" + b"x" * 600
    first, second = keys.parse_key(long), keys.parse_key(long)
    assert first is not second and first.name == second.name == "jobs"


def test_a_refused_key_keeps_no_trace_of_the_requests_refused_before(impl):
    """Each refusal is a new exception: one object raised again and again grew a traceback
    per raise, which (pure build) held each request's frames, session and transport."""
    from conftest import impl_module

    keys = impl_module(impl, "_keys", "_keys_py")
    for key, reply, close in [
        (b"a.b", b"CLIENT_ERROR bad queue name\r\n", False),
        (b"q/t=x", b"CLIENT_ERROR bad command line format\r\n", False),
        (b"q/open/peek", b"CLIENT_ERROR\r\n", True),
    ]:
        refused = []
        for _ in range(3):
            with pytest.raises(keys.KeyError_) as info:
                keys.parse_key(key)
            refused.append(info.value)
        assert (refused[-1].reply, refused[-1].close) == (reply, close)
        assert refused[0] is not refused[1] is not refused[2]
        depths = []
        for exc in refused:
            depth, tb = 0, exc.__traceback__
            while tb is not None:
                depth, tb = depth + 1, tb.tb_next
            depths.append(depth)
        assert depths[0] == depths[1] == depths[2], depths


def test_a_limited_feed_stops_before_the_next_request_and_keeps_nothing_of_the_rest(mod):
    """feed(data, start, limit): the server parses a large read a turn of requests at a
    time, from where the last turn stopped, without copying the read. What the turns return
    is what one feed returns; a set's data block is never cut by a turn; the bytes after
    ``stopped_at`` are left to the next call, not kept."""
    value = b"v\r\nv" * 5000
    data = b"".join(
        b"get a\r\n" if i % 7 else b"set big 0 0 %d\r\n%s\r\n" % (len(value), value)
        for i in range(1000)
    )
    whole = mod.Parser().feed(data)
    for limit in (1, 2, 7, 256):
        parser = mod.Parser()
        turns, at = [], 0
        while at < len(data):
            got = parser.feed(data, at, limit)
            assert 0 < len(got) <= limit
            assert parser.buffered == 0 or parser.stopped_at == len(data)
            turns.extend(got)
            at = parser.stopped_at
        assert turns == whole
    # From a start, and an unfinished line kept as before (no limit reached).
    parser = mod.Parser()
    assert parser.feed(b"xxget a\r\nget b", 2, 5) == [(mod.REQ_GET, (b"a",), False)]
    assert parser.stopped_at == 14 and parser.buffered == 5
    assert parser.feed(b"\r\n") == [(mod.REQ_GET, (b"b",), False)]
    with pytest.raises(ValueError):
        parser.feed(b"abc", 4)
    with pytest.raises(ValueError):  # (it stopped at once, parsing nothing)
        parser.feed(b"get a\r\n", 0, -1)


def test_a_limited_feed_counts_a_get_one_request_per_key(mod):
    """A turn of a large read is ``limit`` requests, a get counting one per key: a turn of
    256 gets of 8,000 short keys each parsed two million keys, ~19 times their bytes as
    objects, and held them all behind a get waiting for an item (13 MB a client). A get
    longer than the turn is still parsed whole, alone; ``extra_keys`` says how many keys the
    turn's gets had beyond their first."""
    many = b"get " + b" ".join(b"k%d" % i for i in range(300)) + b"\r\n"
    data = b"get a\r\nget a b c\r\n" + many + b"get d\r\n" * 3
    parser = mod.Parser()
    assert [len(r[1]) for r in parser.feed(data, 0, 4)] == [1, 3]  # 1 + 3 keys: 4
    assert parser.extra_keys == 2
    at = parser.stopped_at
    assert [len(r[1]) for r in parser.feed(data, at, 4)] == [300]  # over the turn, alone
    assert parser.extra_keys == 299
    assert [len(r[1]) for r in parser.feed(data, parser.stopped_at, 4)] == [1, 1, 1]
    assert parser.extra_keys == 0 and parser.stopped_at == len(data)
    whole = mod.Parser()
    assert len(whole.feed(data)) == 6 and whole.extra_keys == 2 + 299  # counted unlimited too


def test_a_repeated_one_key_get_is_handed_on_as_the_same_request(mod):
    """Requests are equal whichever build parses them; the compiled parser hands a one-key get
    that repeats the last one-key get's key on as the same tuple (its key, the same object,
    is what the session's spec of it is found by), and any other as a new one."""
    parser = mod.Parser()
    out = parser.feed(
        b"get q\r\nget q\r\nget r\r\nget q\r\ngets q\r\nget q\r\nget q r\r\nget q\r\n"
    )
    assert out == [
        (GET, (b"q",), False),
        (GET, (b"q",), False),
        (GET, (b"r",), False),
        (GET, (b"q",), False),
        (GET, (b"q",), True),
        (GET, (b"q",), False),
        (GET, (b"q", b"r"), False),
        (GET, (b"q",), False),
    ]
    if mod.__name__.endswith("_fast._parser"):
        assert out[1] is out[0] and out[1][1][0] is out[0][1][0]
        assert out[3] is not out[0] and out[3][1] is not out[0][1]  # r came between
        assert out[4][1] is out[3][1] and out[5] is out[3]  # gets q: its own request
        assert out[7] is not out[5]  # r was the last token again
