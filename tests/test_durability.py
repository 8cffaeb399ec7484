"""Server-level durability: the real server process is killed, damaged and restarted.

Everything here goes through a socket and a subprocess (both implementations, via
``erq_factory``): SIGKILL under load, torn and damaged journal files, reads open at a crash,
a full disk, read-behind, compaction, what survives a restart, and the offline tools
(PROTOCOL.md §5-§6, DESIGN.md §4). The journal's own unit tests are tests/test_journal_*.py.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pytest
from test_journal_support import delete_journal

import erq.journal.codec as journal_codec
from erq.datadir import DELETING_PREFIX
from erq.journal.format import (
    FORMAT_VERSION,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    OP_ADD,
    RECORD_HEADER_SIZE,
)

from conftest import ROOT, ErqProcess, RawClient
from durability_load import CONFIRMED, DRAINED, UNCERTAIN, Ledger, make_value, read_values
from support import poll

KiB = 1 << 10
MiB = 1 << 20
SEGMENT_MAX = 64 * MiB  # QueueJournal's default segment size, which the server uses


# ---- helpers ---------------------------------------------------------------------------------
def wait_for(predicate, what: str, timeout: float = 20.0, interval: float = 0.02):
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def queue_stats(client: RawClient, queue: str) -> dict[str, int]:
    prefix = f"queue_{queue}_"
    out = {}
    for key, value in client.stats().items():
        if key.startswith(prefix) and value.lstrip("-").isdigit():
            out[key[len(prefix) :]] = int(value)
    return out


def drain(client: RawClient, queue: str, batch: int = 64) -> list[bytes]:
    """Every item of ``queue`` by plain gets (pipelined), in the order they came."""
    out: list[bytes] = []
    while True:
        client.send(f"get {queue}\r\n".encode() * batch)
        replies = [read_values(client) for _ in range(batch)]
        for values in replies:
            out.extend(values)
        if any(not values for values in replies):
            return out


def set_many(
    client: RawClient, queue: str, values: list[bytes], batch: int = 64, refusable: bool = False
) -> None:
    """``set`` every value (pipelined); each must be STORED (or, if ``refusable``, refused
    with SERVER_ERROR: not durable, but kept by the queue)."""
    for start in range(0, len(values), batch):
        chunk = values[start : start + batch]
        client.send(
            b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (queue.encode(), len(v), v) for v in chunk)
        )
        for value in chunk:
            reply = client.line()
            ok = reply == b"STORED\r\n" or refusable and reply.startswith(b"SERVER_ERROR ")
            assert ok, (value[:20], reply)


def get_many(client: RawClient, queue: str, n: int) -> list[bytes]:
    """``n`` plain gets (pipelined); each must return an item."""
    client.send(f"get {queue}\r\n".encode() * n)
    out = []
    for _ in range(n):
        values = read_values(client)
        assert len(values) == 1, f"queue {queue} ran dry after {len(out)} of {n} gets"
        out.append(values[0])
    return out


def read_reply(client: RawClient) -> bytes:
    """One whole reply: a get's VALUE blocks up to END, or any other single line."""
    line = client.line()
    out = line
    while line.startswith(b"VALUE "):
        out += client.read_exact(int(line.split()[3]) + 2)
        line = client.line()
        out += line
    return out


def segment_files(queue_dir: Path) -> list[Path]:
    return sorted(p for p in queue_dir.iterdir() if p.name.endswith(".seg"))


def record_spans(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, size, opcode) of each record of a segment's bytes (format.py), up to the end
    of the data (a zero length or the end of the file)."""
    spans = []
    pos = HEADER_SIZE
    while pos + RECORD_HEADER_SIZE <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "little")
        if length == 0:
            break
        size = RECORD_HEADER_SIZE + length
        assert pos + size <= len(data), f"record at {pos} runs past the end"
        spans.append((pos, size, data[pos + RECORD_HEADER_SIZE]))
        pos += size
    return spans


def erq_tool(impl: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -m erq journal ...`` with the implementation under test."""
    env = dict(os.environ)
    env.pop("ERQ_NO_EXTENSIONS", None)
    if impl == "py":
        env["ERQ_NO_EXTENSIONS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "erq", "journal", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def start_logged(server: ErqProcess) -> str:
    """Start ``server`` and return what it logged up to and including its ready line (the
    port accepts connections a moment before that line is written)."""
    mark = len(server.read_log())
    server.start()

    def ready() -> str | None:
        log = server.read_log()[mark:]
        return log if " ready on " in log else None

    return wait_for(ready, "the ready line in the server log")


def ready_counts(log: str) -> list[tuple[int, int]]:
    """(items, bytes) of every ready line in ``log``."""
    return [
        (int(m[1]), int(m[2]))
        for m in re.finditer(r"ready on .*; recovered (\d+) items, (\d+) bytes", log)
    ]


def warnings_naming(log: str, name: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line and name in line]


def offsets_in(lines: list[str]) -> list[int]:
    """The ``offset N`` each line names (the journal's problem reports)."""
    return [int(m[1]) if (m := re.search(r"\boffset (\d+)\b", line)) else -1 for line in lines]


# ---- 1. crash cycles under load ----------------------------------------------------------------
CRASH_CYCLES = 50
PRODUCERS = 20
CONSUMERS = 20


def test_sigkill_under_load_loses_no_acknowledged_item_and_redelivers_only_open_reads(
    erq_factory,
):
    server = erq_factory()
    ledger = Ledger()
    rng = random.Random(20240611)
    for cycle in range(CRASH_CYCLES):
        if cycle:
            server.start()
        ledger.run_cycle(
            server.client,
            server.kill,
            queue="q",
            producers=PRODUCERS,
            consumers=CONSUMERS,
            load_seconds=rng.uniform(0.05, 0.2),
        )
    server.start()
    client = server.client()
    assert queue_stats(client, "q")["open_transactions"] == 0
    ledger.drained(drain(client, "q"))
    after = queue_stats(client, "q")
    verdict = ledger.verdict()
    assert after["items"] == 0 and after["open_transactions"] == 0, (after, verdict)
    assert (
        verdict["lost"],
        verdict["corrupt"],
        verdict["unknown"],
        verdict["bad_duplicates"],
        verdict["protocol_errors"],
        verdict["overruns"],
    ) == (0, 0, 0, 0, 0, 0), (verdict, ledger.protocol_errors[:5])
    # The run really exercised what it claims to.
    assert verdict["cycles"] == CRASH_CYCLES
    assert verdict["acked"] >= 10 * CRASH_CYCLES and verdict["confirmed"] >= 5 * CRASH_CYCLES, (
        verdict
    )
    assert verdict["uncertain"] > 0 and verdict["maybe"] > 0, verdict


def test_crash_ledger_counts_losses_corruption_and_duplicates_it_must_not_allow():
    """The crash-cycle judge itself (no server): each kind of failure is counted."""
    ledger = Ledger()
    redelivered, confirmed_twice, corrupted, lost, same_cycle = (make_value(1, i) for i in range(5))
    ledger.acked.update({redelivered, confirmed_twice, corrupted, lost, same_cycle})
    ledger.deliveries = {
        redelivered: [(0, UNCERTAIN), (1, DRAINED)],  # open at a crash, handed out again: fine
        confirmed_twice: [(0, CONFIRMED), (1, DRAINED)],  # back after a certain confirm
        corrupted[:-1] + b"!": [(0, CONFIRMED)],  # not the bytes that were sent
        same_cycle: [(2, UNCERTAIN), (2, CONFIRMED)],  # twice without a crash in between
        make_value(7, 7): [(1, CONFIRMED)],  # never sent
    }
    verdict = ledger.verdict()
    assert (
        verdict["lost"],
        verdict["corrupt"],
        verdict["unknown"],
        verdict["bad_duplicates"],
        verdict["redelivered"],
    ) == (2, 1, 1, 2, 1), verdict


# ---- 2. torn tail ---------------------------------------------------------------------------------
def torn_tail_values() -> list[bytes]:
    # Sizes chosen so the last records have multi-byte length fields and odd sizes.
    return [make_value(90, i) + b"\x00\r\n" * (i * 50) for i in range(12)]


CUT_INSIDE = {  # where in a record a cut falls, as an offset from its start given its size
    "length": lambda size: 1,
    "crc": lambda size: 5,
    "body": lambda size: size // 2,
    "last byte": lambda size: size - 1,
}


def cut_offsets(spans: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """(index of the record cut, offset of the cut): two cuts inside each of the last three
    records, in each part of a record."""
    last = len(spans) - 1
    picks = [
        (last - 2, "length"),
        (last - 2, "last byte"),
        (last - 1, "crc"),
        (last - 1, "body"),
        (last, "length"),
        (last, "last byte"),
    ]
    return [(index, spans[index][0] + CUT_INSIDE[part](spans[index][1])) for index, part in picks]


@pytest.mark.parametrize("how", ["zeroed", "truncated"])
def test_torn_tail_recovers_exactly_the_complete_records_and_logs_file_and_offset(erq_factory, how):
    server = erq_factory()
    values = torn_tail_values()
    client = server.client()
    set_many(client, "q", values)
    client.close()
    server.kill()
    queue_dir = server.data_dir / "q"
    [segment] = segment_files(queue_dir)
    original = segment.read_bytes()
    spans = record_spans(original)
    assert [op for _, _, op in spans] == [OP_ADD] * len(values)
    data_end = spans[-1][0] + spans[-1][1]
    cases = cut_offsets(spans)
    for case, (index, offset) in enumerate(cases):
        shutil.rmtree(queue_dir)  # every case starts from the journal as the crash left it
        queue_dir.mkdir()
        if how == "zeroed":  # the preallocated file keeps its size; the data stops early
            segment.write_bytes(original[:offset] + bytes(data_end - offset) + original[data_end:])
        else:
            segment.write_bytes(original[:offset])
        log = start_logged(server)
        client = server.client()
        stats = queue_stats(client, "q")
        where = f"cut at {offset} inside record {index} ({how})"
        assert stats["items"] == index, (where, stats)
        warned = warnings_naming(log, segment.name)
        assert len(warned) == 1 and str(segment) in warned[0], (where, log)
        assert offsets_in(warned) == [spans[index][0]], (where, warned)
        assert ready_counts(log) == [(index, sum(map(len, values[:index])))], (where, log)
        if case == len(cases) - 1:
            # Appends go on after the good records: a new item survives another crash.
            assert client.set("q", b"after the tear") == b"STORED\r\n"
            client.close()
            server.kill()
            log = start_logged(server)
            client = server.client()
            assert drain(client, "q") == [*values[:index], b"after the tear"], where
            assert warnings_naming(log, segment.name) == [], log
        else:
            assert drain(client, "q") == values[:index], where
        client.close()
        server.kill()


# ---- 3. damage in the middle --------------------------------------------------------------------
def damage(data: bytearray, start: int, size: int, field: str) -> None:
    """Flip bits in one part of the record at ``start``."""
    if field == "body":
        data[start + size // 2] ^= 0x5A
    elif field == "crc":
        data[start + 4] ^= 0x01
    else:  # length: the record now claims to run megabytes past the next ones
        data[start + 2] ^= 0x40


def test_damaged_middle_records_are_reported_skipped_and_every_later_record_recovered(
    erq_factory, impl
):
    server = erq_factory()
    values = [make_value(91, i) * 3 for i in range(16)]
    client = server.client()
    set_many(client, "q", values)
    client.close()
    server.kill()
    clean = erq_tool(impl, "check", str(server.data_dir))
    assert clean.returncode == 0 and "clean" in clean.stdout, clean
    [segment] = segment_files(server.data_dir / "q")
    data = bytearray(segment.read_bytes())
    spans = record_spans(bytes(data))
    damaged = {4: "body", 8: "crc", 12: "length"}  # record index -> damaged part
    for index, field in damaged.items():
        damage(data, spans[index][0], spans[index][1], field)
    segment.write_bytes(data)
    offsets = [spans[index][0] for index in damaged]

    check = erq_tool(impl, "check", str(server.data_dir))
    assert check.returncode != 0, check
    reported = [line for line in check.stdout.splitlines() if str(segment) in line]
    assert offsets_in(reported) == offsets, check.stdout

    log = start_logged(server)
    assert offsets_in(warnings_naming(log, str(segment))) == offsets, log
    expected = [value for i, value in enumerate(values) if i not in damaged]
    assert ready_counts(log) == [(len(expected), sum(map(len, expected)))], log
    client = server.client()
    assert get_many(client, "q", 3) == expected[:3]
    # The damaged journal is rewritten in the background: the damage is not met again.
    wait_for(lambda: queue_stats(client, "q")["journal_rewrites"] >= 1, "a journal rewrite")
    client.close()
    server.kill()
    log = start_logged(server)
    assert warnings_naming(log, ".seg") == [], log
    client = server.client()
    assert drain(client, "q") == expected[3:]
    client.close()
    server.kill()
    check = erq_tool(impl, "check", str(server.data_dir))
    assert check.returncode == 0 and "clean" in check.stdout, check


def test_a_damaged_segment_header_costs_no_item_and_is_written_again(erq_factory, impl):
    server = erq_factory()
    values = [make_value(92, i) for i in range(20)]
    client = server.client()
    set_many(client, "q", values)
    client.close()
    server.kill()
    [segment] = segment_files(server.data_dir / "q")
    data = bytearray(segment.read_bytes())
    header = bytes(data[:HEADER_SIZE])
    data[20] ^= 0x01  # the id floor: the header's CRC no longer matches
    segment.write_bytes(data)
    check = erq_tool(impl, "check", str(server.data_dir))
    assert check.returncode == 1 and f"{segment}: bad segment header (bad header CRC)" in (
        check.stdout
    ), check

    log = start_logged(server)
    [warning] = warnings_naming(log, str(segment))
    assert "bad segment header (bad header CRC)" in warning, log
    assert ready_counts(log) == [(len(values), sum(map(len, values)))], log
    assert segment.read_bytes()[:HEADER_SIZE] == header  # written again as it was
    client = server.client()
    assert get_many(client, "q", 3) == values[:3]
    set_many(client, "q", [b"after"])
    client.close()
    server.kill()
    log = start_logged(server)
    assert warnings_naming(log, ".seg") == [], log
    client = server.client()
    assert drain(client, "q") == [*values[3:], b"after"]
    client.close()
    server.kill()


def killed_after_several_segments(erq_factory):
    """A server killed after 3,000 items of 1 KiB went into queue q (several segments)."""
    server = erq_factory()
    values = [kib_value(n) for n in range(3000)]
    client = server.client()
    set_many(client, "q", values)
    client.close()
    server.kill()
    return server, values


def test_a_segment_deleted_between_two_others_is_reported_not_silently_skipped(erq_factory, impl):
    server, values = killed_after_several_segments(erq_factory)
    first, middle, after, *_ = segment_files(server.data_dir / "q")
    middle.unlink()
    check = erq_tool(impl, "check", str(server.data_dir))
    gap = (
        f"segment {middle.name} missing between {first.name} and {after.name}: what it held is lost"
    )
    assert check.returncode == 1 and gap in check.stdout, check

    log = start_logged(server)
    [warning] = warnings_naming(log, middle.name)
    assert gap in warning, log
    [(count, _)] = ready_counts(log)
    client = server.client()
    kept = drain(client, "q")
    assert 0 < count == len(kept) < len(values)
    # The first segment's items, then the last one's: in order, and only the middle is gone.
    head = next(i for i, value in enumerate(kept) if value != values[i])
    assert kept == values[:head] + values[len(values) - (len(kept) - head) :]
    client.close()
    server.kill()


@pytest.mark.parametrize("lost", ["first", "last"])
def test_a_lost_first_or_last_segment_is_reported_and_the_rest_served(erq_factory, impl, lost):
    # Nothing after the last segment or before the first vouches for it: the journal's range
    # file does (erq/journal/segrange.py).
    server, values = killed_after_several_segments(erq_factory)
    files = segment_files(server.data_dir / "q")
    assert len(files) >= 3
    gone, neighbour, where = (
        (files[0], files[1], "before") if lost == "first" else (files[-1], files[-2], "after")
    )
    gone.unlink()
    report = f"segment {gone.name} missing {where} {neighbour.name}, the {lost} one left"
    check = erq_tool(impl, "check", str(server.data_dir))
    assert check.returncode == 1 and report in check.stdout, check
    dump = erq_tool(impl, "dump", str(server.data_dir / "q"))
    assert dump.returncode == 1 and report in dump.stdout, dump.stderr

    log = start_logged(server)
    [warning] = warnings_naming(log, gone.name)
    assert f"{server.data_dir / 'q'}: {report}: what it held is lost" in warning, log
    [(count, _)] = ready_counts(log)
    client = server.client()
    kept = drain(client, "q")
    assert 0 < count == len(kept) < len(values)
    assert kept == (values[-len(kept) :] if lost == "first" else values[: len(kept)])
    client.close()
    server.kill()


def clean_but_a_torn_tail(check: subprocess.CompletedProcess, queue_dir: Path) -> bool:
    """``erq journal check`` found nothing wrong, or only the record a SIGKILL cut short: a
    record's length is written last, so a kill that lands while one is half written (a page
    fault on the next page of the mapping makes that window wide) leaves it at the end of the
    newest segment, where recovery truncates it. Anything else is a false alarm."""
    if check.returncode == 0:
        return True
    *problems, summary = check.stdout.strip().splitlines()
    newest = segment_files(queue_dir)[-1]
    return (
        check.returncode == 1
        and summary.endswith(": 1 problem(s)")
        and len(problems) == 1
        and re.fullmatch(
            rf"{re.escape(str(newest))}: torn record at offset \d+ \(recovery truncates it\)",
            problems[0],
        )
        is not None
    )


def test_sigkill_while_segments_rotate_and_compact_raises_no_false_alarm(erq_factory, impl):
    # Segments of 64 KiB (a quarter of max_journal_size), rotated and compacted (released,
    # drained, rewritten) all the time under the load: wherever the kill lands, the next start
    # reports nothing missing and check finds the journal clean, and nothing acked is lost.
    server = erq_factory('[queues.default]\nmax_journal_size = "256KiB"\n')
    ledger = Ledger()
    rng = random.Random(20261130)
    for cycle in range(10):
        log = start_logged(server) if cycle else server.read_log()
        assert warnings_naming(log, "missing") == [], log
        assert warnings_naming(log, ".range") == [], log
        ledger.run_cycle(
            server.client,
            server.kill,
            queue="q",
            producers=8,
            consumers=8,
            load_seconds=rng.uniform(0.1, 0.4),
        )
        check = erq_tool(impl, "check", str(server.data_dir))
        assert clean_but_a_torn_tail(check, server.data_dir / "q"), (cycle, check.stdout)
    log = start_logged(server)
    assert warnings_naming(log, "missing") == [], log
    client = server.client()
    ledger.drained(drain(client, "q"))
    client.close()
    server.kill()
    verdict = ledger.verdict()
    assert (verdict["lost"], verdict["corrupt"], verdict["bad_duplicates"]) == (0, 0, 0), verdict
    # The run really rotated and gave segments back: the range moved far on both ends.
    [stated] = (server.data_dir / "q").glob("*.range")
    first, last = (int(n, 16) for n in stated.stem.split("-"))
    assert 10 < first <= last, (stated.name, verdict)


def test_a_journal_of_another_format_version_stops_the_start_in_one_line(erq_factory, impl):
    server = erq_factory()
    client = server.client()
    set_many(client, "q", [b"kept"])
    client.close()
    server.kill()
    [segment] = segment_files(server.data_dir / "q")
    data = bytearray(segment.read_bytes())
    head = HEADER_STRUCT.pack(MAGIC, FORMAT_VERSION + 1, 0, 1, 0)  # sound, but not ours
    data[:HEADER_SIZE] = head + struct.pack("<II", journal_codec.crc32c(head), 0)
    segment.write_bytes(data)
    server.start(wait=False)
    assert server.proc.wait(30) == 1
    log = server.read_log()
    assert "Traceback" not in log, log
    [error] = [line for line in log.splitlines() if " ERROR " in line]
    assert f"cannot recover the journals: {segment}: format version {FORMAT_VERSION + 1}" in error
    assert segment.read_bytes() == bytes(data)  # untouched: the erq that wrote it reads it
    server.stop()


# ---- 4. reads open at a crash -------------------------------------------------------------------
def test_reads_open_at_a_crash_return_to_the_head_in_their_original_order(erq_factory):
    server = erq_factory()
    values = [b"item-%d" % i for i in range(8)]
    client = server.client()
    set_many(client, "q", values[:5])
    for i in range(3):  # three open reads on one connection
        assert client.get("q/open") == b"VALUE q/open 0 6\r\n%s\r\nEND\r\n" % values[i]
    set_many(client, "q", values[5:])  # later items, set while the reads are open
    other = server.client()
    assert other.get("q/open") == b"VALUE q/open 0 6\r\n%s\r\nEND\r\n" % values[3]
    stats = queue_stats(client, "q")
    assert (stats["items"], stats["open_transactions"]) == (4, 4)
    server.kill()  # the connections are still open: nothing was aborted by a disconnect

    log = start_logged(server)
    assert ready_counts(log) == [(8, sum(map(len, values)))], log
    client = server.client()
    stats = queue_stats(client, "q")
    assert (stats["items"], stats["open_transactions"]) == (8, 0)
    # Open the head again and crash again: the order holds across a second restart too.
    assert client.get("q/open") == b"VALUE q/open 0 6\r\n%s\r\nEND\r\n" % values[0]
    server.kill()
    server.start()
    client = server.client()
    assert drain(client, "q") == values


def test_reads_open_on_several_connections_at_a_graceful_stop_return_in_the_order_opened(
    erq_factory,
):
    """SIGTERM aborts the open reads before the journals close: they must land as recovery
    would put them after a crash, oldest first across every connection, not one
    connection's reads after another's."""
    server = erq_factory()
    values = [b"item-%02d" % i for i in range(12)]
    set_many(server.client(), "q", values)
    clients = [server.client() for _ in range(3)]
    for i in range(9):  # interleaved: connection k holds items k, k + 3, k + 6
        reply = clients[i % 3].get("q/open")
        assert reply == b"VALUE q/open 0 7\r\n%s\r\nEND\r\n" % values[i]
    assert server.stop() == 0  # the connections are still open
    server.start()
    assert drain(server.client(), "q") == values


@pytest.mark.parametrize("still_sending", [False, True], ids=["all-read", "still-sending"])
def test_a_graceful_stop_sends_the_replies_it_made_before_it_exits(erq_factory, still_sending):
    """A client that pipelined gets of large items and reads slowly: at SIGTERM the server
    holds replies it has not sent yet (up to 1 MiB, its transport's buffer, the kernel's).
    They reach the client before the server's end of stream, so every item taken does. They
    were dropped at the exit, and with them the items their gets had taken (110 of 2,000
    10 KB items); and a client still sending requests the server had not read was reset at
    the close, which destroyed the replies still in the kernel's buffers (~300 items)."""
    server = erq_factory()
    values = [b"%06d" % i + bytes(10 * KiB - 6) for i in range(2000)]
    set_many(server.client(), "q", values)
    reader = server.client(timeout=20.0)
    gets = b"get q\r\n" * len(values)
    if still_sending:  # more than the server reads ahead (4,096 requests): some stay unread
        gets += b"version\r\n" * 100_000
    sender = threading.Thread(target=_send_until_closed, args=(reader, gets))
    sender.start()
    watcher = server.client()
    left = poll(lambda: _stable_stat(watcher, "queue_q_items"), "the gets to stop on back-pressure")
    assert left > 0, "every get ran: nothing was held back behind unread replies"
    server.proc.send_signal(signal.SIGTERM)
    received = []
    while True:  # slowly: a client busy with each item it takes
        chunk = reader.sock.recv(64 * KiB)
        if not chunk:
            break
        reader.buf += chunk
        time.sleep(0.01)
    reader.sock.shutdown(socket.SHUT_WR)  # the client's end: the server's close follows
    sender.join(10)
    while reader.buf.startswith(b"VALUE "):
        received.extend(read_values(reader))
    assert server.stop() == 0
    server.start()
    rest = drain(server.client(), "q")
    assert received + rest == values


def _send_until_closed(client: RawClient, data: bytes) -> None:
    try:
        client.send(data)
    except OSError:  # the server closed (the test looks at what it received)
        pass


def _stable_stat(client: RawClient, name: str) -> int | None:
    """The stat's value once it is the same twice 0.3 s apart, else None."""
    before = client.stats()[name]
    time.sleep(0.3)
    after = client.stats()[name]
    return int(after) if after == before else None


# ---- 5. full disk -----------------------------------------------------------------------------------
TMPFS_SIZE = "8m"
FILL_ITEM = 16 * KiB


@pytest.fixture
def full_disk_server(erq_factory, tmp_path):
    """A server whose data dir is an 8 MiB tmpfs, with a 'ballast' queue holding 3 MiB of
    it (segments of 1 and 2 MiB), so queue 'q' can take 1 and 2 MiB but not its 4 MiB
    third segment until the ballast is deleted. The log stays outside the tmpfs."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "erq-durability", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a {TMPFS_SIZE} tmpfs here (needs root or CAP_SYS_ADMIN; mount said "
            f"{done.stderr.strip()!r}); a server subprocess cannot be fault-injected otherwise. "
            "tests/test_journal_diskfull.py covers ENOSPC in-process."
        )
    server = erq_factory(start=False)
    server.data_dir = mount / "data"
    server.data_dir.mkdir()
    try:
        server.start()
        client = server.client()
        set_many(client, "ballast", [b"%05d" % i + bytes(FILL_ITEM) for i in range(150)])
        client.close()
        yield server
    finally:
        server.kill()
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_until_refused(client: RawClient) -> tuple[list[bytes], bytes, bytes]:
    """``set q`` 16 KiB items until one is refused: (stored values, refused value, reply)."""
    stored = []
    for i in range(1000):
        value = b"q%05d:" % i + random.Random(i).randbytes(FILL_ITEM)
        reply = client.set("q", value)
        if reply != b"STORED\r\n":
            return stored, value, reply
        stored.append(value)
    raise AssertionError("1000 sets of 16 KiB fit in an 8 MiB tmpfs")


def files_removed(server: ErqProcess) -> None:
    """A deleted queue's directory is renamed before the answer and its files removed on a
    worker thread after it: wait for that, which is when its space comes back."""
    poll(
        lambda: not any(p.name.startswith(DELETING_PREFIX) for p in server.data_dir.iterdir()),
        "the deleted queue's files to go",
    )


def test_full_disk_refuses_sets_with_server_error_and_stores_again_once_space_returns(
    full_disk_server,
):
    server = full_disk_server
    client = server.client()
    stored, refused, reply = fill_until_refused(client)
    assert reply.startswith(b"SERVER_ERROR "), reply
    assert len(stored) > 100
    assert server.proc.poll() is None  # alive: no SIGBUS, no crash
    assert client.set("q", refused).startswith(b"SERVER_ERROR ")  # still full: refused again
    stats = queue_stats(client, "q")
    assert stats["items"] == len(stored), stats  # a refused item is not queued
    assert get_many(client, "q", 1) == stored[:1]  # reads go on (their records are small)

    assert client.call(b"delete ballast\r\n") == b"DELETED\r\n"  # frees 3 MiB
    files_removed(server)
    assert client.set("q", refused) == b"STORED\r\n"
    client.close()
    server.kill()

    log = start_logged(server)
    assert ready_counts(log) == [(len(stored), sum(map(len, stored[1:])) + len(refused))], log
    client = server.client()
    assert drain(client, "q") == [*stored[1:], refused]  # every STORED item, nothing else
    assert "queue_ballast_items" not in client.stats()
    client.close()
    assert server.stop() == 0


def test_full_disk_reliable_read_that_cannot_be_journaled_leaves_the_item_at_the_head(
    full_disk_server,
):
    server = full_disk_server
    client = server.client()
    stored, _, reply = fill_until_refused(client)
    assert reply.startswith(b"SERVER_ERROR "), reply
    # Open and abort the head until not even an OPEN record (17 bytes) fits in the segment.
    opened = b"VALUE q/open 0 %d\r\n%s\r\nEND\r\n" % (len(stored[0]), stored[0])
    pairs = 0
    while True:
        client.send(b"get q/open\r\nget q/abort\r\n" * 50)
        try:
            replies = [read_reply(client) for _ in range(100)]
        except (ConnectionError, OSError) as exc:
            raise AssertionError(
                f"the server dropped the connection after {pairs} open/abort pairs on a full "
                f"disk ({exc}) instead of answering SERVER_ERROR"
            ) from exc
        good = 0
        while good < 100 and replies[good] == (opened, b"END\r\n")[good % 2]:
            good += 1
        pairs += good // 2
        if good < 100:
            break
        assert pairs < 5000, "16 KiB of open/abort records never filled the segment"
    # The first get that could not be journaled is refused; nothing was handed out.
    assert replies[good].startswith(b"SERVER_ERROR "), replies[good : good + 2]
    stats = queue_stats(client, "q")
    assert (stats["items"], stats["open_transactions"]) == (len(stored), 0), stats
    assert server.proc.poll() is None

    assert client.call(b"delete ballast\r\n") == b"DELETED\r\n"
    files_removed(server)
    assert client.get("q/open") == b"VALUE q/open 0 %d\r\n%s\r\nEND\r\n" % (
        len(stored[0]),
        stored[0],
    )
    assert client.get("q/close") == b"END\r\n"
    client.close()
    server.kill()
    server.start()
    client = server.client()
    assert drain(client, "q") == stored[1:]


def test_full_disk_confirm_that_cannot_be_journaled_is_refused_and_the_read_stays_open(
    full_disk_server,
):
    """A ``/close`` (or ``confirm``) whose CONFIRM record cannot be written was answered END
    while the journal still called the read open: a restart handed the item out again though
    its client had been told it was confirmed. Now it is refused, as a get whose removal
    cannot be journaled is: SERVER_ERROR, the read still open (and the oldest), nothing
    fetched by a close/open; once there is room the same close confirms it for good."""
    server = full_disk_server
    reader = server.client()
    stored, _, reply = fill_until_refused(reader)
    assert reply.startswith(b"SERVER_ERROR "), reply
    head = b"VALUE q/open 0 %d\r\n%s\r\nEND\r\n" % (len(stored[0]), stored[0])
    assert reader.get("q/open") == head
    # Another connection opens and aborts the next item until not even an OPEN fits.
    other = server.client()
    for _ in range(5000):
        other.send(b"get q/open\r\n")
        reply = read_reply(other)
        if reply.startswith(b"SERVER_ERROR "):
            break
        assert reply.startswith(b"VALUE q/open "), reply
        assert other.get("q/abort") == b"END\r\n"
    else:
        raise AssertionError("open/abort records never filled the segment")
    for request in (b"get q/close\r\n", b"get q/close/open\r\n", b"confirm q 1\r\n"):
        reply = reader.call(request)
        assert reply.startswith(b"SERVER_ERROR ") and b"disk full" in reply, (request, reply)
    stats = queue_stats(reader, "q")
    assert (stats["items"], stats["open_transactions"]) == (len(stored) - 1, 1), stats
    assert server.proc.poll() is None

    assert reader.call(b"delete ballast\r\n") == b"DELETED\r\n"
    files_removed(server)
    assert reader.get("q/close") == b"END\r\n"  # the same read, confirmed now
    assert queue_stats(reader, "q")["open_transactions"] == 0
    reader.close()
    other.close()
    server.kill()
    server.start()
    assert drain(server.client(), "q") == stored[1:]  # the confirmed item stays gone


# ---- 6. read-behind ------------------------------------------------------------------------------
READ_BEHIND_CONFIG = '[queues.default]\nmax_memory_size = "64KiB"\n'
MEMORY_CAP = 64 * KiB


def kib_value(n: int) -> bytes:
    return (b"%07d|" % n).ljust(KiB, b"%c" % (65 + n % 26))


def test_read_behind_keeps_memory_bounded_and_order_strict_across_a_restart(erq_factory):
    server = erq_factory(READ_BEHIND_CONFIG)
    client = server.client()
    model: deque[bytes] = deque()
    produced = 0

    def produce(n: int) -> None:
        nonlocal produced
        values = [kib_value(produced + i) for i in range(n)]
        set_many(client, "q", values)
        model.extend(values)
        produced += n

    def check_bounded() -> None:
        stats = queue_stats(client, "q")
        assert stats["items"] == len(model), stats
        assert stats["mem_bytes"] <= MEMORY_CAP, stats
        assert stats["bytes"] == sum(map(len, model)), stats

    produce(2000)
    check_bounded()
    assert queue_stats(client, "q")["mem_items"] < 100
    # Take in FIFO order while more arrives, crossing the memory/disk boundary again and again.
    rounds = 0
    while model:
        take = min(len(model), 150 + 37 * rounds % 200)
        assert get_many(client, "q", take) == [model.popleft() for _ in range(take)], rounds
        if rounds < 12:
            produce(90)
        check_bounded()
        rounds += 1
        if rounds == 6:  # a crash in the middle: the journal holds the disk part
            client.close()
            server.kill()
            log = start_logged(server)
            assert ready_counts(log) == [(len(model), sum(map(len, model)))], log
            client = server.client()
            check_bounded()
    assert drain(client, "q") == []
    assert produced == 2000 + 12 * 90


def test_a_reload_lowering_max_memory_size_sends_the_items_past_it_to_disk_at_once(erq_factory):
    """A reload to a lower max_memory_size only applied to new items: 600 KiB of items stayed
    in memory under a 64 KiB limit until they were read. Now they go back to read-behind at
    the reload (nothing written), in order, in fanout children too, and a crash finds the same
    queues."""
    server = erq_factory('[queues.default]\nmax_memory_size = "1MiB"\n')
    client = server.client()
    assert client.get("q+copy") == b"END\r\n"  # a fanout child: it gets a copy of each set
    values = [kib_value(i) for i in range(600)]
    set_many(client, "q", values)
    reader = server.client()
    reader.send(b"get q/open\r\n")
    assert read_values(reader) == values[:1]
    assert queue_stats(client, "q")["mem_bytes"] == 599 * KiB
    server.write_config(READ_BEHIND_CONFIG)
    assert client.call(b"reload\r\n") == b"Reloaded config.\r\n"
    stats = queue_stats(client, "q")
    assert 0 < stats["mem_bytes"] <= MEMORY_CAP and stats["items"] == 599, stats
    child = queue_stats(client, "q+copy")
    assert 0 < child["mem_bytes"] <= MEMORY_CAP and child["items"] == 600, child
    assert reader.call(b"get q/abort\r\n", b"END\r\n") == b"END\r\n"  # back at the head
    set_many(client, "q", [kib_value(600)])
    assert get_many(client, "q", 300) == values[:300]
    assert queue_stats(client, "q")["mem_bytes"] <= MEMORY_CAP
    client.close()
    reader.close()
    server.kill()
    server.start()
    client = server.client()
    assert drain(client, "q") == values[300:] + [kib_value(600)]
    assert drain(client, "q+copy") == values + [kib_value(600)]


# ---- 7. compaction -------------------------------------------------------------------------------
def big_value(n: int) -> bytes:
    return (b"%06d:" % n) * (32 * KiB // 7)


def test_compaction_bounds_the_journal_by_live_data_and_a_crash_after_draining_loses_nothing(
    erq_factory,
):
    # Segments grow from 64 KiB to 64 MiB (preallocated), and DESIGN §4 bounds the journal by
    # 2 x live bytes + 2 segments: write about 130 MiB of 32 KiB items (twelve files, 192 MiB
    # on disk, over that bound), then drain all but the last few.
    server = erq_factory()
    client = server.client(timeout=30)
    total, keep = 4200, 8
    values = [big_value(n) for n in range(total)]
    set_many(client, "q", values)
    grown = queue_stats(client, "q")["logsize"]
    live = values[-keep:]
    live_bytes = sum(map(len, live))
    bound = 2 * live_bytes + 2 * SEGMENT_MAX
    assert grown > bound
    for start in range(0, total - keep, 100):
        n = min(100, total - keep - start)
        assert get_many(client, "q", n) == values[start : start + n], start
    client.close()
    server.kill()  # right after the heavy draining, before or while compaction runs

    log = start_logged(server)
    assert ready_counts(log) == [(keep, live_bytes)], log
    client = server.client()
    shrunk = wait_for(
        lambda: (stats := queue_stats(client, "q"))["logsize"] <= bound and stats,
        "the journal to be compacted",
    )
    assert shrunk["items"] == keep, shrunk
    assert len(segment_files(server.data_dir / "q")) <= 2  # a snapshot and the current one
    client.close()
    server.kill()  # right after the compaction: the items now live in the snapshot

    server.start()
    client = server.client()
    assert get_many(client, "q", keep) == live
    # A queue that drains empty releases its old segments at once.
    wait_for(lambda: len(segment_files(server.data_dir / "q")) == 1, "the old segments to go")
    assert queue_stats(client, "q")["logsize"] <= SEGMENT_MAX
    client.close()
    server.kill()
    server.start()
    assert drain(server.client(), "q") == []
    server.kill()
    shutil.rmtree(server.data_dir)  # over 64 MiB of preallocated segments


def test_a_long_queue_gives_back_the_segments_its_head_passed_without_a_rewrite(erq_factory):
    # Segments grow from 64 KiB, doubling: 512 items of 32 KiB fill the first eight (64 KiB
    # to 8 MiB, holding 1, 3, 7, ... 255 items: 502 in all) and start the ninth. Taking 250
    # moves the head into the eighth (items 248 to 502): the first seven hold only history
    # and are deleted (no snapshot: the live data, ~8 MiB, is over half of the rest).
    server = erq_factory()
    client = server.client(timeout=30)
    values = [big_value(n) for n in range(512)]
    set_many(client, "q", values)
    files = segment_files(server.data_dir / "q")
    assert len(files) == 9
    assert get_many(client, "q", 250) == values[:250]
    wait_for(
        lambda: segment_files(server.data_dir / "q") == files[7:],
        "the passed segments to be deleted",
    )
    stats = queue_stats(client, "q")
    assert stats["journal_rewrites"] == 0, stats  # deleted, not rewritten into a snapshot
    # logsize: the segments left and the next one's file allocated ahead (a spare)
    held = sum(p.stat().st_size for p in (server.data_dir / "q").iterdir())
    assert stats["logsize"] == held, stats
    client.close()
    server.kill()

    log = start_logged(server)
    live = values[250:]
    assert ready_counts(log) == [(len(live), sum(map(len, live)))], log
    client = server.client(timeout=30)
    assert get_many(client, "q", len(live)) == live
    client.close()
    server.kill()
    shutil.rmtree(server.data_dir)


# ---- 8. what a restart brings back ---------------------------------------------------------------
def test_ready_line_reports_the_recovered_items_and_bytes_of_every_queue(erq_factory):
    server = erq_factory()
    client = server.client()
    a = [b"alpha-%d" % i * (i + 1) for i in range(7)]
    b = [b"beta-%d" % i for i in range(4)]
    set_many(client, "a", a)
    set_many(client, "b", b)
    assert get_many(client, "b", 1) == b[:1]  # gone for good
    assert client.get("a/open").startswith(b"VALUE a/open ")  # open at the crash: comes back
    client.call(b"set empty 0 0 1\r\nx\r\n")
    assert get_many(client, "empty", 1) == [b"x"]
    server.kill()
    log = start_logged(server)
    recovered = a + b[1:]
    assert ready_counts(log) == [(len(recovered), sum(map(len, recovered)))], log
    assert re.search(r"recovered \d+ items, \d+ bytes in 3 queues", log), log


def test_status_survives_a_crash(erq_factory):
    server = erq_factory()
    client = server.client()
    assert client.set("q", b"kept") == b"STORED\r\n"
    assert client.call(b"status READONLY\r\n") == b"END\r\n"
    server.kill()
    log = start_logged(server)
    assert "status=READONLY" in log, log
    client = server.client()
    assert client.call(b"status\r\n") == b"READONLY\r\n"
    assert client.set("q", b"refused") == b"SERVER_ERROR read only\r\n"
    assert client.get("q") == b"VALUE q 0 4\r\nkept\r\nEND\r\n"
    assert client.call(b"status UP\r\n") == b"END\r\n"
    server.kill()
    server.start()
    client = server.client()
    assert client.call(b"status\r\n") == b"UP\r\n"
    assert client.set("q", b"accepted") == b"STORED\r\n"


def test_a_damaged_status_file_starts_the_server_up_and_says_so(erq_factory):
    server = erq_factory()
    client = server.client()
    assert client.call(b"status QUIESCENT\r\n") == b"END\r\n"
    server.kill()
    status = server.data_dir / "erq.status"
    assert status.read_text() == "QUIESCENT\n"
    status.write_bytes(b"QUIESC\x00\x00")  # damaged outside erq
    log = start_logged(server)
    [warning] = warnings_naming(log, str(status))
    assert "holds no status (b'QUIESC\\x00\\x00'): starting UP" in warning, log
    assert "status=UP" in log, log
    server.stop()


def test_fanout_child_survives_a_crash_and_still_receives_copies(erq_factory):
    server = erq_factory()
    client = server.client()
    assert client.get("q+c") == b"END\r\n"  # the child exists from here on
    assert client.set("q", b"one") == b"STORED\r\n"
    server.kill()
    server.start()
    client = server.client()
    assert client.stats()["queue_q_children"] == "q+c"
    assert client.set("q", b"two") == b"STORED\r\n"
    assert drain(client, "q+c") == [b"one", b"two"]
    assert drain(client, "q") == [b"one", b"two"]
    server.kill()
    server.start()  # a child that is empty at the crash is still registered
    client = server.client()
    assert client.set("q", b"three") == b"STORED\r\n"
    assert drain(client, "q+c") == [b"three"]


# ---- 9. journal files deleted under a running server ----------------------------------------------
def errors_naming(log: str, *names: str) -> list[str]:
    return [
        line for line in log.splitlines() if " ERROR " in line and all(n in line for n in names)
    ]


def wait_healed(server: ErqProcess, client: RawClient, queue: str, rewrites: int) -> None:
    """The deletion was reported (in one line) and the live state written again."""
    queue_dir = server.data_dir / queue
    wait_for(lambda: errors_naming(server.read_log(), queue, str(queue_dir)), "the report", 5)
    wait_for(lambda: queue_stats(client, queue)["journal_rewrites"] > rewrites, "the rewrite", 5)


@pytest.mark.parametrize("what", ["directory", "segments"])
@pytest.mark.parametrize("fsync", ["100ms", "always", "never"])
def test_a_deleted_journal_is_written_again_so_a_crash_loses_nothing(erq_factory, what, fsync):
    server = erq_factory(f'[queues.default]\nfsync = "{fsync}"\n')
    client = server.client()
    before = [b"before-%d" % i * (i % 7 + 1) for i in range(300)]
    set_many(client, "q", before)
    assert client.get("q/open") == b"VALUE q/open 0 %d\r\n%s\r\nEND\r\n" % (8, before[0])
    delete_journal(server.data_dir / "q", what)
    unnoticed = [b"unnoticed-%d" % i for i in range(50)]  # set before the server can know
    # With fsync = "always" the sync finds the file gone: SERVER_ERROR, not STORED (see below).
    set_many(client, "q", unnoticed, refusable=fsync == "always")
    wait_healed(server, client, "q", 0)
    after = [b"after-%d" % i for i in range(100)]
    set_many(client, "q", after)
    assert len(errors_naming(server.read_log(), str(server.data_dir / "q"))) == 1, server.read_log()
    client.close()
    # The close puts the open read back, journaled: killed while it wrote that record, the
    # server left a torn tail (warned about at the start; nothing lost). Kill after it.
    watcher = server.client()
    wait_for(lambda: queue_stats(watcher, "q")["open_transactions"] == 0, "the read back", 5)
    server.kill()

    log = start_logged(server)
    assert ready_counts(log) == [(450, sum(map(len, before + unnoticed + after)))], log
    assert warnings_naming(log, str(server.data_dir / "q")) == [], log
    assert drain(server.client(), "q") == before + unnoticed + after  # the open read first


def test_with_fsync_always_a_write_into_a_deleted_journal_is_refused_not_stored(erq_factory):
    """fsync = "always": STORED means that a restart finds the item. After a deletion, until
    the new journal is in place, writes can only reach files no restart can find: the sync
    says so and they are refused, which also starts the new journal at once. The first STORED
    after the deletion is there after a SIGKILL. (The items from before are back if the
    rewrite of the live state landed before the kill, else gone: all or none.)"""
    server = erq_factory('[queues.default]\nfsync = "always"\n')
    client = server.client()
    set_many(client, "q", [b"before-%d" % i for i in range(10)])
    delete_journal(server.data_dir / "q", "directory")
    for n in range(2000):
        reply = client.set("q", b"after-%d" % n)
        if reply == b"STORED\r\n":
            break
        assert reply.startswith(b"SERVER_ERROR "), reply
    else:
        pytest.fail("no write was stored again after the deletion")
    client.close()
    server.kill()
    server.start()
    items = drain(server.client(), "q")
    assert b"after-%d" % n in items, (n, items[-5:])
    before = [b"before-%d" % i for i in range(10)]
    assert items[:10] == before or not set(before) & set(items), items[:12]


def test_a_deleted_journal_of_a_queue_deeper_than_memory_keeps_its_disk_only_items(erq_factory):
    server = erq_factory(READ_BEHIND_CONFIG)
    client = server.client()
    before = [kib_value(n) for n in range(400)]  # all but ~60 only on disk
    set_many(client, "q", before)
    assert get_many(client, "q", 30) == before[:30]
    stats = queue_stats(client, "q")
    assert stats["mem_items"] < 100 < stats["items"], stats
    delete_journal(server.data_dir / "q", "directory")
    # A rotation before the heal cannot make its segment in the deleted directory: such a
    # write is refused (SERVER_ERROR) and not queued; every write STORED must come back.
    unnoticed = []
    for value in (kib_value(n) for n in range(400, 450)):
        reply = client.set("q", value)
        assert reply == b"STORED\r\n" or reply.startswith(b"SERVER_ERROR "), reply
        if reply == b"STORED\r\n":
            unnoticed.append(value)
    wait_healed(server, client, "q", stats["journal_rewrites"])
    after = [kib_value(n) for n in range(450, 600)]
    set_many(client, "q", after)
    assert get_many(client, "q", 20) == before[30:50]
    client.close()
    server.kill()

    server.start()
    assert drain(server.client(), "q") == before[50:] + unnoticed + after


def test_a_journal_that_cannot_be_written_again_refuses_writes_until_it_can(erq_factory):
    server = erq_factory()
    client = server.client()
    assert client.set("q", b"expires", exptime=1) == b"STORED\r\n"  # gone while refusing
    stored = [b"before-%d" % i for i in range(100)]
    set_many(client, "q", stored)

    def set_one(n: int) -> bytes:
        reply = client.set("q", b"set-%d" % n)
        if reply == b"STORED\r\n":
            stored.append(b"set-%d" % n)  # before the deletion is noticed, or once healed
        return reply

    shutil.rmtree(server.data_dir)  # the parent too: the queue's directory cannot be made again
    wait_for(lambda: errors_naming(server.read_log(), "q"), "the report", 5)
    refused = wait_for(lambda: set_one(len(stored)).startswith(b"SERVER_ERROR"), "a refusal", 5)
    assert refused and set_one(len(stored) + 1).startswith(b"SERVER_ERROR")
    time.sleep(1.5)  # the head expires: a sweep that cannot journal that must go on
    server.data_dir.mkdir()
    wait_for(lambda: set_one(len(stored)) == b"STORED\r\n", "a set to be stored again", 5)
    wait_for(lambda: queue_stats(client, "q")["journal_rewrites"] > 0, "the rewrite", 5)
    set_one(len(stored))
    client.close()
    server.kill()

    server.start()
    assert drain(server.client(), "q") == stored


def test_a_graceful_stop_writes_a_deleted_journal_again_or_exits_1_naming_the_queue(
    erq_factory,
):
    """A stop gives a journal whose files were deleted a last try at writing its live state
    again, as the sweep would have; if it cannot (the data directory is gone), the queue's
    items are lost with the process: the log says so and the exit status is 1. It exited 0,
    its last line "stopped", and a restore of the directory just before the stop was lost."""
    server = erq_factory()

    def delete_all_under(client: RawClient) -> None:
        failed = len(errors_naming(server.read_log(), "cannot write its deleted journal"))
        shutil.rmtree(server.data_dir)
        wait_for(
            lambda: len(errors_naming(server.read_log(), "cannot write its deleted")) > failed,
            "a failed rewrite",
            5,
        )
        client.close()

    client = server.client()
    set_many(client, "q", [b"kept"])
    delete_all_under(client)
    assert server.stop() == 1
    log = server.read_log()
    [lost] = errors_naming(log, "queue q: its journal was deleted and could not be written")
    assert "what it held is lost" in lost, log
    assert errors_naming(log, "stopped, but the last writes of 1 queue(s)", "see above): q"), log

    server.data_dir.mkdir()
    server.start()
    client = server.client()
    set_many(client, "q", [b"again"])
    delete_all_under(client)
    server.data_dir.mkdir()  # restored: the stop writes the live state there
    assert server.stop() == 0
    server.start()
    assert drain(server.client(), "q") == [b"again"]


# ---- 10. offline tools on a real data dir ----------------------------------------------------------
def test_journal_dump_prints_every_record_the_server_wrote(erq_factory, impl):
    server = erq_factory()
    client = server.client()
    set_many(client, "q", [b"first", b"second\r\nline", b"third"])
    assert client.get("q/open") == b"VALUE q/open 0 5\r\nfirst\r\nEND\r\n"
    assert client.get("q/close") == b"END\r\n"
    assert client.get("q") == b"VALUE q 0 12\r\nsecond\r\nline\r\nEND\r\n"
    server.kill()
    done = erq_tool(impl, "dump", str(server.data_dir / "q"))
    assert done.returncode == 0, done
    records = [line.split() for line in done.stdout.splitlines() if not line.startswith("#")]
    assert [r[1:3] for r in records] == [
        ["ADD", "id=1"],
        ["ADD", "id=2"],
        ["ADD", "id=3"],
        ["OPEN", "id=1"],
        ["CONFIRM", "id=1"],
        ["REMOVE", "id=2"],
    ], done.stdout
    assert int(records[0][0]) == HEADER_SIZE
    assert "data=b'first'" in done.stdout and "data=b'second\\r\\nline'" in done.stdout
    assert done.stdout.startswith("# 0000000000000001.seg")


def test_journal_pack_shrinks_a_stopped_servers_data_dir_and_the_server_recovers_everything(
    erq_factory, impl
):
    server = erq_factory()
    client = server.client()
    values = [kib_value(n) for n in range(3000)]  # 3 MiB: segments of 1, 2 and 4 MiB
    set_many(client, "q", values)
    set_many(client, "other", values[:10])
    assert get_many(client, "q", 2950) == values[:2950]
    assert client.get("q/open") == b"VALUE q/open 0 %d\r\n%s\r\nEND\r\n" % (KiB, values[2950])
    client.close()
    assert server.stop() == 0

    queue_dir = server.data_dir / "q"
    sizes = [p.stat().st_size for p in segment_files(queue_dir)]
    done = erq_tool(impl, "pack", str(server.data_dir))
    assert done.returncode == 0, done
    after = sum(p.stat().st_size for p in segment_files(queue_dir))
    # History is gone: what is left is one file, the live data and nothing else.
    assert len(segment_files(queue_dir)) == 1 and after < sum(sizes), (sizes, after)
    assert f"files {sum(sizes):,} -> {after:,} bytes\n" in done.stdout, done.stdout
    records = re.search(r"^q: 50 item\(s\), records ([\d,]+) -> ([\d,]+) bytes", done.stdout, re.M)
    assert records, done.stdout
    records_before, records_after = (int(g.replace(",", "")) for g in records.groups())
    assert 50 * KiB < records_after < records_before / 10, done.stdout  # the 50 items, no history
    assert records_after == after  # no room beside them either
    checked = erq_tool(impl, "check", str(server.data_dir))
    assert checked.returncode == 0, checked

    log = start_logged(server)
    assert ready_counts(log) == [(60, 60 * KiB)], log
    client = server.client()
    assert drain(client, "q") == values[2950:]
    assert drain(client, "other") == values[:10]
