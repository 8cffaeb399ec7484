"""Recovery from damage: torn tails at every offset, bit flips, holes, bad headers (both codecs)."""

from __future__ import annotations

import copy
import io
import struct

import pytest
from test_journal_support import (
    KiB,
    Model,
    added_ids,
    all_items,
    item,
    record_spans,
    segment_files,
    use_codec,
    write_ops,
)

import erq.journal.codec as journal_codec
from erq.journal import QueueJournal, tool
from erq.journal.format import (
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    OP_ADD,
    OP_CONFIRM,
    OP_OPEN,
    OP_REMOVE,
    OP_UNREMOVE,
)
from erq.journal_api import JournalError

SEGMENT = 4 * KiB  # the whole history fits in one small segment

OPS = [
    (OP_ADD, item(1, 5)),
    (OP_ADD, item(2, 40)),
    (OP_ADD, item(3, 12)),
    (OP_OPEN, 1),
    (OP_ADD, item(4, 20)),
    (OP_REMOVE, 2),
    (OP_OPEN, 3),
    (OP_UNREMOVE, 3),
    (OP_ADD, item(5, 31)),
    (OP_CONFIRM, 1),
    (OP_ADD, item(6, 25)),
    (OP_OPEN, 4),
    (OP_ADD, item(7, 33)),
]


@pytest.fixture
def codec(impl, monkeypatch):
    return use_codec(impl, monkeypatch)


def models(ops) -> list[Model]:
    """The model after 0, 1, ... len(ops) operations."""
    model, out = Model(), [Model()]
    for op, arg in ops:
        if op == OP_ADD:
            model.apply(op, arg)
        else:
            model.apply(op, id=arg)
        out.append(copy.deepcopy(model))
    return out


@pytest.fixture
def history(codec, tmp_path):
    """A closed journal holding OPS, one record each: (segment image, file name)."""
    journal, _ = QueueJournal.open(tmp_path / "orig", fsync="never", segment_size=SEGMENT)
    write_ops(journal, Model(), OPS)
    journal.close()
    (path,) = segment_files(tmp_path / "orig")
    return path.read_bytes(), path.name


def recover(directory):
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    items = all_items(journal, rec)
    journal.close()
    return items, rec


def expected_after_restart(model: Model) -> list:
    m = copy.deepcopy(model)
    m.restarted()
    return m.expected()


@pytest.mark.parametrize("variant", ["zeroed", "truncated"])
def test_torn_tail_at_every_byte_of_the_last_three_records(history, tmp_path, variant):
    image, name = history
    spans = record_spans(image)
    assert len(spans) == len(OPS)
    states = models(OPS)
    for cut in range(spans[-3][0], spans[-1][1] + 1):
        # "zeroed": the pages after the cut never reached the disk; "truncated": the file ends.
        damaged = image[:cut] + bytes(len(image) - cut) if variant == "zeroed" else image[:cut]
        directory = tmp_path / f"{variant}-{cut}"
        directory.mkdir()
        (directory / name).write_bytes(damaged)
        intact = 0
        while (
            intact < len(spans)
            and damaged[spans[intact][0] : spans[intact][1]]
            == image[spans[intact][0] : spans[intact][1]]
        ):
            intact += 1
        torn = intact < len(spans) and any(damaged[spans[intact][0] : spans[intact][1]])
        items, rec = recover(directory)
        expected = expected_after_restart(states[intact])
        assert items == expected, cut
        if torn:
            assert rec.warnings == [
                f"{directory / name}: torn record at offset {spans[intact][0]}, truncated"
            ], cut
        else:
            assert rec.warnings == [], cut
        # Truncation is for good: the next start is clean and sees the same queue.
        items, rec = recover(directory)
        assert rec.warnings == [] and items == expected, cut


@pytest.mark.parametrize("victim", [4, 6], ids=["add", "open"])
def test_bit_flip_in_a_middle_record_skips_it_and_recovers_the_rest(history, tmp_path, victim):
    image, name = history
    spans = record_spans(image)
    start, end = spans[victim]
    expected = expected_after_restart(models(OPS[:victim] + OPS[victim + 1 :])[-1])
    for at in range(start, end):
        for bit in range(8):
            damaged = bytearray(image)
            damaged[at] ^= 1 << bit
            directory = tmp_path / f"flip-{at}-{bit}"
            directory.mkdir()
            (directory / name).write_bytes(damaged)
            items, rec = recover(directory)
            assert items == expected, (at, bit)
            assert len(rec.warnings) == 1, (at, bit, rec.warnings)
            warning = rec.warnings[0]
            assert warning.startswith(f"{directory / name}: ") and f"at offset {start}," in warning
            assert "skipped" in warning


def test_bad_crc_warning_names_the_record(history, tmp_path):
    image, name = history
    start, end = record_spans(image)[4]
    damaged = bytearray(image)
    damaged[end - 1] ^= 0xFF  # last data byte of the record
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / name).write_bytes(damaged)
    _, rec = recover(tmp_path / "d")
    assert rec.warnings == [
        f"{tmp_path / 'd' / name}: bad CRC at offset {start}, record skipped ({end - start} bytes)"
    ]


def test_zeroed_hole_in_the_middle_is_reported_and_skipped(history, tmp_path):
    image, name = history
    spans = record_spans(image)
    start, end = spans[5]
    damaged = image[:start] + bytes(end - start) + image[end:]  # a page that never made it
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / name).write_bytes(damaged)
    items, rec = recover(tmp_path / "h")
    assert items == expected_after_restart(models(OPS[:5] + OPS[6:])[-1])
    assert rec.warnings == [
        f"{tmp_path / 'h' / name}: damaged data at offset {start}, {end - start} bytes skipped"
    ]


def test_damage_makes_the_journal_ask_for_compaction_which_removes_it(history, tmp_path):
    image, name = history
    start, _ = record_spans(image)[4]
    damaged = bytearray(image)
    damaged[start + 20] ^= 0x10
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / name).write_bytes(damaged)
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert rec.warnings and journal.wants_compaction
    journal.compact([], rec.items, wait=True)
    assert not journal.wants_compaction
    journal.close()
    items, rec = recover(directory)
    assert rec.warnings == [] and items == expected_after_restart(models(OPS[:4] + OPS[5:])[-1])


def _journal_of_segments(directory, n_items: int = 79, fill: bytes = b"r") -> list:
    journal, _ = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    for i in range(1, n_items + 1):
        journal.add(i, 0, 0, 0, fill * 100)
    journal.close()
    files = segment_files(directory)
    assert len(files) >= 3
    return files


def _damage(path, offset: int, value: bytes) -> bytes:
    """Overwrite bytes of ``path``; the header as it was."""
    raw = bytearray(path.read_bytes())
    header = bytes(raw[:HEADER_SIZE])
    raw[offset : offset + len(value)] = value
    path.write_bytes(raw)
    return header


def test_a_bad_segment_header_costs_no_record(codec, tmp_path):
    # 32 bytes of a segment must not cost its records, which carry their own CRCs.
    directory = tmp_path / "q"
    files = _journal_of_segments(directory)
    victim = files[1]
    header = _damage(victim, 0, b"XXXX")
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert len(rec.warnings) == 1
    assert rec.warnings[0].startswith(f"{victim}: bad segment header (bad magic")
    assert f"kept in {victim.name}.header.damaged" in rec.warnings[0]
    assert [it.id for it in all_items(journal, rec)] == list(range(1, 80))
    assert journal.wants_compaction  # damage found: the journal is rewritten soon
    journal.add(1000, 0, 0, 0, b"new")
    journal.close()
    assert victim.read_bytes()[:HEADER_SIZE] == header  # written again, as it was
    assert (directory / (victim.name + ".header.damaged")).read_bytes()[:4] == b"XXXX"
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert rec.warnings == []  # repaired once, not reported again
    assert [it.id for it in all_items(journal, rec)] == [*range(1, 80), 1000]
    journal.close()


def test_a_bad_header_on_the_last_segment_costs_no_record_and_appends_go_on(codec, tmp_path):
    directory = tmp_path / "q"
    *_, last = _journal_of_segments(directory, fill=b"l")
    raw = last.read_bytes()
    _damage(last, 8, bytes([raw[8] ^ 0xFF]))  # the sequence number: the CRC no longer matches
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert len(rec.warnings) == 1 and "(bad header CRC)" in rec.warnings[0]
    assert [it.id for it in all_items(journal, rec)] == list(range(1, 80))
    journal.add(500, 0, 0, 0, b"after")
    journal.close()
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert rec.warnings == [] and [it.id for it in all_items(journal, rec)] == [*range(1, 80), 500]
    journal.close()


def test_a_lost_id_floor_is_rebuilt_below_the_next_segments_ids(codec, tmp_path):
    # release_head frees a prefix of segments once the next floor is at most the lowest
    # live id; a floor rebuilt too high would free live items, too low would only wait.
    directory = tmp_path / "q"
    files = _journal_of_segments(directory)
    floors = []
    for path in files:
        floors.append(int.from_bytes(path.read_bytes()[16:24], "little"))
    _damage(files[1], 16, (10**9).to_bytes(8, "little"))  # the floor itself
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert len(rec.warnings) == 1
    journal.close()
    rebuilt = int.from_bytes(files[1].read_bytes()[16:24], "little")
    assert rebuilt == floors[1]  # the first id it holds: one above every id before it


def test_a_header_of_another_format_version_stops_recovery_and_changes_nothing(codec, tmp_path):
    directory = tmp_path / "q"
    files = _journal_of_segments(directory)
    victim = files[1]
    head = HEADER_STRUCT.pack(MAGIC, 2, 0, 2, 0)  # version 2, with a good CRC
    _damage(victim, 0, head + struct.pack("<II", journal_codec.crc32c(head), 0))
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(JournalError, match="format version 2, this erq reads 1"):
        QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_a_segment_too_short_for_a_record_or_named_for_another_is_set_aside(codec, tmp_path):
    directory = tmp_path / "q"
    files = _journal_of_segments(directory)
    files[1].write_bytes(b"ERQJ\x01")  # shorter than a header
    header = files[0].read_bytes()[:HEADER_SIZE]  # a sound header naming segment 1
    _damage(files[2], 0, header)
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert rec.warnings == [
        f"{files[1]}: bad segment header (5 bytes, shorter than a header; 5 bytes, no room "
        f"for a record), file set aside as {files[1].name}.damaged",
        f"{files[2]}: bad segment header (header names segment 1), file set aside as "
        f"{files[2].name}.damaged",
    ]
    ids = [it.id for it in all_items(journal, rec)]
    assert ids and ids[0] == 1 and len(ids) < 79
    journal.close()


def test_segments_missing_between_others_are_reported_and_the_rest_recovered(codec, tmp_path):
    # Deleted by hand or by another program: what they held is lost, and that is said.
    directory = tmp_path / "q"
    files = _journal_of_segments(directory, n_items=300)
    assert len(files) >= 6
    lost = added_ids(files[1]) | added_ids(files[3]) | added_ids(files[4])
    for path in (files[1], files[3], files[4]):
        path.unlink()
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    why = "what it held is lost (the items it added; the items it removed come back)"
    assert rec.warnings == [
        f"{directory}: segment {files[1].name} missing between {files[0].name} and "
        f"{files[2].name}: {why}",
        f"{directory}: segment {files[3].name} to {files[4].name} missing between "
        f"{files[2].name} and {files[5].name}: {why}",
    ]
    items = all_items(journal, rec)
    assert lost and [it.id for it in items] == [i for i in range(1, 301) if i not in lost]
    assert journal.wants_compaction  # rewritten soon, which ends the report
    journal.close()
    out = io.StringIO()
    assert tool.check(directory, out) == 1
    assert rec.warnings[0] in out.getvalue() and rec.warnings[1] in out.getvalue()
    assert "2 problem(s)" in out.getvalue()
    out = io.StringIO()
    assert tool.dump(directory, out) == 1
    assert f"# {rec.warnings[1]}" in out.getvalue()
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert len(rec.warnings) == 2  # until compaction rewrites the journal
    journal.compact([], all_items(journal, rec), wait=True)
    journal.close()
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert rec.warnings == [] and all_items(journal, rec) == items
    journal.close()
    assert tool.check(directory, io.StringIO()) == 0


def test_files_named_almost_like_segments_are_not_read(codec, tmp_path):
    # int(x, 16) takes these too: each would be read as a second copy of segment 1.
    directory = tmp_path / "q"
    journal, _ = QueueJournal.open(directory, fsync="never")
    journal.add(1, 0, 0, 0, b"a")
    journal.close()
    [segment] = segment_files(directory)
    for name in ("0x00000000000001", "00000000_0000001", " 000000000000001", "000000000000000A"):
        (directory / f"{name}.seg").write_bytes(segment.read_bytes())
    journal, rec = QueueJournal.open(directory, fsync="never")
    journal.close()
    assert rec.warnings == [] and [it.id for it in rec.items] == [1]


def test_leftovers_of_interrupted_creation_and_compaction_are_removed(codec, tmp_path):
    directory = tmp_path / "q"
    journal, _ = QueueJournal.open(directory, fsync="never")
    journal.add(1, 0, 0, 0, b"a")
    journal.close()
    (directory / "0000000000000009.seg.new").write_bytes(b"\0" * 100)
    (directory / "0000000000000008.seg.tmp").write_bytes(b"ERQJ partial")
    journal, rec = QueueJournal.open(directory, fsync="never")
    journal.close()
    assert rec.warnings == [] and [it.id for it in rec.items] == [1]
    assert sorted(p.name for p in directory.iterdir()) == [
        "0000000000000001-0000000000000001.range",
        "0000000000000001.seg",
    ]


def test_appends_after_a_torn_tail_go_where_the_tail_was(history, tmp_path):
    image, name = history
    spans = record_spans(image)
    cut = spans[-1][0] + 10
    directory = tmp_path / "t"
    directory.mkdir()
    (directory / name).write_bytes(image[:cut] + bytes(len(image) - cut))
    journal, rec = QueueJournal.open(directory, fsync="never", segment_size=SEGMENT)
    assert len(rec.warnings) == 1
    journal.add(50, 0, 0, 0, b"after the tear")
    journal.close()
    items, rec = recover(directory)
    assert rec.warnings == []
    assert items[-1].id == 50 and 7 not in [it.id for it in items]
    assert len(segment_files(directory)) == 1


def test_a_good_record_between_two_damaged_ones_is_kept(history, tmp_path):
    image, name = history
    spans = record_spans(image)
    damaged = bytearray(image)
    for victim in (4, 6):  # ADD 4 and OPEN 3; the REMOVE 2 between them is intact
        damaged[spans[victim][1] - 1] ^= 0x01
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / name).write_bytes(damaged)
    items, rec = recover(tmp_path / "g")
    assert items == expected_after_restart(models(OPS[:4] + OPS[5:6] + OPS[7:])[-1])
    path = tmp_path / "g" / name
    assert rec.warnings == [
        f"{path}: bad CRC at offset {spans[4][0]}, record skipped ({spans[4][1] - spans[4][0]} bytes)",
        f"{path}: bad CRC at offset {spans[6][0]}, record skipped ({spans[6][1] - spans[6][0]} bytes)",
    ]
