"""Offline tools: dump, check and pack (both codecs)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from test_journal_support import KiB, all_items, item, record_spans, segment_files, use_codec

from erq import datadir
from erq.journal import QueueJournal, tool


@pytest.fixture
def codec(impl, monkeypatch):
    return use_codec(impl, monkeypatch)


@pytest.fixture
def data_dir(codec, tmp_path):
    """Two queues: 'jobs' with a history worth packing, 'empty' with nothing in it."""
    root = tmp_path / "data"
    jobs, _ = QueueJournal.open(root / "jobs", fsync="never", segment_size=8 * KiB)
    for i in range(1, 101):
        it = item(i, 150)
        jobs.add(it.id, it.flags, it.add_time, it.expiry, it.data)
    for i in range(1, 91):
        jobs.remove(i)
    jobs.open(91)
    jobs.flush()
    jobs.add(101, 5, 7, 9, b"last one")
    jobs.close()
    empty, _ = QueueJournal.open(root / "empty", fsync="never")
    empty.close()
    return root


def test_dump_prints_one_line_per_record(data_dir):
    out = io.StringIO()
    assert tool.dump(data_dir / "jobs", out) == 0
    lines = out.getvalue().splitlines()
    records = [line for line in lines if not line.startswith("#")]
    assert len(records) == 100 + 90 + 1 + 1 + 1
    assert records[0].split()[:3] == ["32", "ADD", "id=1"] and "len=150" in records[0]
    assert records[-1].split()[1:] == [
        "ADD",
        "id=101",
        "flags=5",
        "add_time=7",
        "expiry=9",
        "len=8",
        "data=b'last",
        "one'",
    ]
    assert any(line.split()[1:] == ["FLUSH", "id=0"] for line in records)
    assert any(line.split()[1:] == ["OPEN", "id=91"] for line in records)
    assert lines[0].startswith("# 0000000000000001.seg: segment seq=1")


def test_check_is_clean_on_a_healthy_data_dir(data_dir):
    out = io.StringIO()
    assert tool.check(data_dir, out) == 0
    assert out.getvalue().strip().endswith("clean")


def test_check_reports_each_damaged_record_with_file_and_offset(data_dir):
    first, *_, last = segment_files(data_dir / "jobs")
    raw = bytearray(first.read_bytes())
    (start, _), (second, _) = record_spans(bytes(raw))[3:5]
    raw[start + 30] ^= 0x01
    raw[second + 12] ^= 0x40
    first.write_bytes(raw)
    raw = bytearray(last.read_bytes())
    tail = record_spans(bytes(raw))[-1][0]
    raw[tail + 12 :] = bytes(len(raw) - tail - 12)
    last.write_bytes(raw)
    before = {p: p.read_bytes() for p in segment_files(data_dir / "jobs")}
    out = io.StringIO()
    assert tool.check(data_dir, out) == 1
    report = out.getvalue()
    assert f"{first}: bad CRC at offset {start}, record skipped" in report
    assert f"{first}: bad CRC at offset {second}, record skipped" in report
    assert f"{last}: torn record at offset {tail}" in report
    assert "3 problem(s)" in report
    assert {p: p.read_bytes() for p in segment_files(data_dir / "jobs")} == before  # read only
    assert tool.dump(data_dir / "jobs", io.StringIO()) == 1


def test_check_and_dump_read_the_records_behind_a_bad_header_and_see_its_repair(data_dir):
    first, second, *_ = segment_files(data_dir / "jobs")
    raw = bytearray(second.read_bytes())
    raw[0:4] = b"XXXX"
    second.write_bytes(raw)
    out = io.StringIO()
    assert tool.dump(data_dir / "jobs", out) == 1
    dumped = out.getvalue()
    assert f"{second}: bad segment header (bad magic b'XXXX')" in dumped
    records = [line for line in dumped.splitlines() if not line.startswith(("#", "/"))]
    assert len(records) == 100 + 90 + 1 + 1 + 1  # every record still read
    out = io.StringIO()
    assert tool.check(data_dir, out) == 1
    assert "1 problem(s)" in out.getvalue()
    journal, rec = QueueJournal.open(data_dir / "jobs", fsync="never", segment_size=8 * KiB)
    assert len(rec.warnings) == 1 and [it.id for it in all_items(journal, rec)] == [91, 101]
    journal.close()
    out = io.StringIO()
    assert tool.check(data_dir, out) == 1  # the kept header says damage happened
    assert (
        f"{second}.header.damaged: a damaged header, replaced by recovery and kept here"
        in out.getvalue()
    )
    (data_dir / "jobs" / f"{second.name}.header.damaged").unlink()
    assert tool.check(data_dir, io.StringIO()) == 0


def test_pack_compacts_every_queue_and_keeps_their_items(data_dir):
    journal, rec = QueueJournal.open(data_dir / "jobs", fsync="never", segment_size=8 * KiB)
    before_items = all_items(journal, rec)
    journal.close()
    before = sum(p.stat().st_size for p in segment_files(data_dir / "jobs"))
    out = io.StringIO()
    assert tool.pack(data_dir, out) == 0
    after = sum(p.stat().st_size for p in segment_files(data_dir / "jobs"))
    assert after < before
    line = next(x for x in out.getvalue().splitlines() if x.startswith("jobs: 2 item(s)"))
    records = re.search(r"records ([\d,]+) -> ([\d,]+) bytes", line)
    assert records, line
    records_before, records_after = (int(g.replace(",", "")) for g in records.groups())
    assert 0 < records_after < records_before  # what the pack saved, preallocation aside
    assert f"files {before:,} -> {after:,} bytes" in line
    journal, rec = QueueJournal.open(data_dir / "jobs", fsync="never", segment_size=8 * KiB)
    assert all_items(journal, rec) == before_items
    assert [it.id for it in before_items] == [91, 101]  # the open read is back at the head
    journal.close()
    assert tool.check(data_dir, io.StringIO()) == 0


def test_tools_refuse_a_missing_directory_or_a_file_on_their_error_stream(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    for run in (tool.check, tool.dump, tool.pack):
        out, err = io.StringIO(), io.StringIO()
        assert run(tmp_path / "nope", out, err) == 2
        assert run(tmp_path / "file", out, err) == 2
        assert out.getvalue() == ""
        assert err.getvalue() == (
            f"{tmp_path / 'nope'}: no such directory\n{tmp_path / 'file'}: not a directory\n"
        )


def test_pack_of_one_queues_directory_takes_its_data_directorys_lock(data_dir):
    held = datadir.lock(data_dir, who="erq serve")  # as a running server does
    out, err = io.StringIO(), io.StringIO()
    assert tool.pack(data_dir / "jobs", out, err) == 2
    assert f"{data_dir} is in use by erq serve" in err.getvalue() and out.getvalue() == ""
    held.release()
    assert tool.pack(data_dir / "jobs", out, err) == 0
    assert out.getvalue().startswith("jobs: 2 item(s)")  # that queue alone
    assert not (data_dir / "jobs" / datadir.LOCK_FILE).exists()


def test_pack_of_a_queue_whose_segments_are_all_lost_takes_its_data_directorys_lock(data_dir):
    """Its range file is left: still a queue's directory, not a data directory to lock."""
    for segment in segment_files(data_dir / "jobs"):
        segment.unlink()
    held = datadir.lock(data_dir, who="erq serve")  # as a running server does
    out, err = io.StringIO(), io.StringIO()
    assert tool.pack(data_dir / "jobs", out, err) == 2
    assert f"{data_dir} is in use by erq serve" in err.getvalue() and out.getvalue() == ""
    held.release()
    assert tool.pack(data_dir / "jobs", out, err) == 1  # the loss is reported
    assert "missing and no segment of this journal is left" in out.getvalue()
    assert not (data_dir / "jobs" / datadir.LOCK_FILE).exists()


@pytest.mark.parametrize("loss", ["set aside", "deleted"])
def test_pack_of_a_queue_with_no_segment_left_leaves_a_drained_queue_s_header(data_dir, loss):
    """Every segment of a queue set aside (a damaged header) or lost: pack reports it, and
    leaves what it leaves for a drained queue, a 32-byte header that the range file names.
    It left no segment at all, the range still naming the files that were gone, and
    ``dump`` said the journal held them."""
    queue = data_dir / "jobs"
    for segment in segment_files(queue):
        if loss == "deleted":
            segment.unlink()
        else:
            segment.write_bytes(os.urandom(10))  # shorter than a header
    out = io.StringIO()
    assert tool.pack(queue, out) == 1  # the loss is reported
    assert "jobs: 0 item(s)" in out.getvalue(), out.getvalue()
    (left,) = segment_files(queue)
    assert left.stat().st_size == 32
    ranges = [p.name for p in queue.iterdir() if p.name.endswith(".range")]
    assert ranges == [f"{left.stem}-{left.stem}.range"], ranges
    out = io.StringIO()
    assert tool.dump(queue, out) == 0
    assert f"segments {left.name} to {left.name}" in out.getvalue(), out.getvalue()
    journal, recovery = QueueJournal.open(queue, fsync="never")
    assert recovery.items == [] and recovery.warnings == []  # a start finds nothing amiss
    journal.add(1, 0, 0, 0, b"after the loss")
    journal.close()
    journal, recovery = QueueJournal.open(queue, fsync="never")
    assert [it.data for it in all_items(journal, recovery)] == [b"after the loss"]
    assert recovery.warnings == []
    journal.close()


@pytest.mark.parametrize("run", ["check", "dump"])
def test_check_and_dump_on_a_live_directory_list_again_a_segment_released_meanwhile(
    data_dir, monkeypatch, run
):
    """A running server deletes a segment its queue's head has passed (and renames the range
    file) between the tool's listing and its open of that segment: the tool looks again, as
    it does for a listing that changes, instead of failing with exit 2."""
    jobs = data_dir / "jobs"
    first, second, *_ = segment_files(jobs)
    (range_file,) = jobs.glob("*.range")
    real_open = tool.Segment.open

    def released_meanwhile(path, **kwargs):
        if path == first and first.exists():  # the server gives the first segment back now
            first.unlink()
            last = range_file.name.split("-")[1]
            range_file.rename(jobs / f"{second.name.removesuffix('.seg')}-{last}")
        return real_open(path, **kwargs)

    monkeypatch.setattr(tool.Segment, "open", released_meanwhile)
    target = data_dir if run == "check" else jobs
    out, err = io.StringIO(), io.StringIO()
    status = getattr(tool, run)(target, out, err)
    assert err.getvalue() == "" and status == 0
    again = io.StringIO()
    assert getattr(tool, run)(target, again) == 0
    assert out.getvalue() == again.getvalue()  # what the directory holds now, said once


def test_check_on_a_live_directory_leaves_out_a_queue_deleted_meanwhile(data_dir, monkeypatch):
    """A running server deletes a queue (renames its directory deleting.<random>, removes its
    files) while check reads it: the queue is left out, as stats leaves it out, instead of the
    whole check failing with exit 2."""
    import shutil

    shutil.copytree(data_dir / "jobs", data_dir / "other")
    real = tool._list_and_open

    def deleted_meanwhile(directory, out):
        if directory.name == "jobs":
            gone = directory.with_name(datadir.DELETING_PREFIX + "x")
            directory.rename(gone)
            shutil.rmtree(gone)
        return real(directory, out)

    monkeypatch.setattr(tool, "_list_and_open", deleted_meanwhile)
    out, err = io.StringIO(), io.StringIO()
    assert tool.check(data_dir, out, err) == 0
    assert err.getvalue() == ""
    assert re.fullmatch(r"checked \d+ segment\(s\) of 1 queue\(s\): clean\n", out.getvalue())


def test_check_of_a_live_directory_waits_out_a_record_being_written_at_the_end(
    data_dir, monkeypatch
):
    """A running server appends at the end of a queue's last segment: a check that reads the
    record it is writing must not report a torn record (exit 1 on a healthy server); it looks
    again until the record is whole. Offline the same bytes are a torn tail, said at once."""
    last = segment_files(data_dir / "jobs")[-1]
    raw = last.read_bytes()
    start, end = record_spans(raw)[-1]  # the ADD of item 101, the journal's last record
    with open(last, "r+b") as f:
        f.seek(start + 10)
        f.write(bytes(end - start - 10))  # its first bytes are there, the rest not yet
    waits = []

    def server_writes_on(seconds):
        waits.append(seconds)
        with open(last, "r+b") as f:
            f.seek(start)
            f.write(raw[start:end])

    monkeypatch.setattr(tool.time, "sleep", server_writes_on)
    out = io.StringIO()
    assert tool.check(data_dir, out) == 1  # no server: a torn tail, said without a wait
    assert f"{last}: torn record at offset {start}" in out.getvalue() and waits == []
    with open(last, "r+b") as f:
        f.seek(start + 10)
        f.write(bytes(end - start - 10))
    held = datadir.lock(data_dir, who="erq serve")  # a server runs
    try:
        out = io.StringIO()
        assert tool.check(data_dir, out) == 0
        assert out.getvalue().endswith(": clean\n") and len(waits) == 1
        with open(last, "r+b") as f:  # torn for good (the server's write failed): said
            f.seek(start + 10)
            f.write(bytes(end - start - 10))
        monkeypatch.setattr(tool.time, "sleep", waits.append)
        out = io.StringIO()
        assert tool.check(data_dir, out) == 1
        assert f"{last}: torn record at offset {start}" in out.getvalue()
        assert len(waits) == 1 + tool._SETTLE_TRIES
    finally:
        held.release()


def test_dump_of_a_live_queue_waits_out_a_record_being_written_at_the_end(data_dir, monkeypatch):
    """As check: dump lists the record being written once it is whole, exit 0."""
    jobs = data_dir / "jobs"
    whole = io.StringIO()
    assert tool.dump(jobs, whole) == 0
    last = segment_files(jobs)[-1]
    raw = last.read_bytes()
    start, end = record_spans(raw)[-1]  # the ADD of item 101, the journal's last record
    with open(last, "r+b") as f:
        f.seek(start + 10)
        f.write(bytes(end - start - 10))  # its first bytes are there, the rest not yet

    def server_writes_on(seconds):
        with open(last, "r+b") as f:
            f.seek(start)
            f.write(raw[start:end])

    monkeypatch.setattr(tool.time, "sleep", server_writes_on)
    held = datadir.lock(data_dir, who="erq serve")  # a server runs
    try:
        out = io.StringIO()
        assert tool.dump(jobs, out) == 0
    finally:
        held.release()
    assert out.getvalue() == whole.getvalue()


def test_check_reports_a_segment_too_short_for_a_record_once_as_recovery_does(data_dir):
    """Recovery sets such a file aside (one warning) and counts it as no missing segment:
    check said 'bad segment header' and also 'segment ... missing between ...' (2 problems
    for one file, which is there)."""
    segments = segment_files(data_dir / "jobs")
    short = segments[len(segments) // 2]
    os.truncate(short, 0)
    out = io.StringIO()
    assert tool.check(data_dir, out) == 1
    report = out.getvalue().splitlines()
    assert report[-1].endswith(": 1 problem(s)") and "missing" not in out.getvalue()
    assert report[0] == (
        f"{short}: bad segment header (0 bytes, shorter than a header; 0 bytes, no room for a "
        f"record): recovery sets the file aside as {short.name}.damaged, what it held is lost"
    )
    out = io.StringIO()
    assert tool.dump(data_dir / "jobs", out) == 1 and "missing" not in out.getvalue()
    journal, recovery = QueueJournal.open(data_dir / "jobs", fsync="never")
    journal.close()
    assert len(recovery.warnings) == 1 and "set aside" in recovery.warnings[0]


def test_pack_names_the_queue_when_given_its_directory_as_dot(data_dir, monkeypatch):
    """``cd DATA/jobs && erq journal pack .`` said ': 2 item(s), ...' (the name of '.')."""
    monkeypatch.chdir(data_dir / "jobs")
    out = io.StringIO()
    assert tool.pack(".", out) == 0
    assert out.getvalue().startswith("jobs: 2 item(s)")
    monkeypatch.chdir(data_dir / "jobs" / "..")
    out = io.StringIO()
    assert tool.pack(Path("jobs") / ".." / "jobs", out) == 0
    assert out.getvalue().startswith("jobs: 2 item(s)")


def test_tools_say_so_when_pointed_at_a_directory_without_journals(data_dir, tmp_path):
    out = io.StringIO()
    assert tool.dump(data_dir, out) == 2  # the data directory, not a queue's
    assert "no journal segments here" in out.getvalue()
    empty = tmp_path / "empty"
    empty.mkdir()
    out = io.StringIO()
    assert tool.check(empty, out) == 0
    assert "no queue journals here" in out.getvalue()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a directory nobody can write")
def test_pack_refuses_a_directory_it_cannot_lock():
    out = io.StringIO()
    assert tool.pack("/proc/self", out) == 2
    assert "/proc/self: cannot lock it: " in out.getvalue()


def test_check_and_dump_report_a_misplaced_segment_as_recovery_will_treat_it(data_dir):
    """A copy of segment 1 under another segment's name: recovery sets it aside unread (its
    records would replay twice), so check must not call it clean, nor dump list it again."""
    first, *rest = segment_files(data_dir / "jobs")
    stray = first.with_name("%016x.seg" % (int(rest[-1].name.split(".")[0], 16) + 5))
    stray.write_bytes(first.read_bytes())
    out = io.StringIO()
    assert tool.check(data_dir, out) == 1
    assert f"{stray}: bad segment header (header names segment 1): a misplaced file" in (
        out.getvalue()
    )
    out = io.StringIO()
    assert tool.dump(data_dir / "jobs", out) == 1
    records = [line for line in out.getvalue().splitlines() if not line.startswith(("#", "/"))]
    assert len(records) == 100 + 90 + 1 + 1 + 1  # as without the copy
    journal, rec = QueueJournal.open(data_dir / "jobs", fsync="never")
    journal.close()
    assert [it.id for it in rec.items] == [91, 101]  # the server's view agrees


def test_a_journal_tool_that_cannot_read_its_files_exits_2_with_one_line(
    data_dir, monkeypatch, capsys
):
    """A permission problem is no verdict on the journal: exit 2 (could not do its work) and
    one line naming the file, not a traceback and the 1 that means damage."""
    from erq import cli

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(data_dir / "jobs"))

    monkeypatch.setattr(tool, "check", denied)
    assert cli.main(["journal", "check", str(data_dir)]) == 2
    assert capsys.readouterr().err == (
        f"erq journal check: {data_dir / 'jobs'}: Permission denied\n"
    )


def test_pack_repairs_damage_as_a_start_does_and_exits_1_to_say_it_found_some(data_dir):
    first, *_ = segment_files(data_dir / "jobs")
    raw = bytearray(first.read_bytes())
    start, end = record_spans(raw)[3]  # a record in the middle of the first segment
    raw[start + 12] ^= 0xFF
    first.write_bytes(bytes(raw))
    out = io.StringIO()
    assert tool.pack(data_dir, out) == 1
    assert f"{first}" in out.getvalue() and "jobs: 2 item(s)" in out.getvalue()
    out = io.StringIO()
    assert tool.check(data_dir, out) == 0  # repaired: only pack's status tells of it
    assert tool.pack(data_dir, io.StringIO()) == 0
