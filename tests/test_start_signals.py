"""Signals that reach ``erq serve`` while it starts, before its event loop handles them: a stop
stops it the orderly way, a reload is applied once the server runs, and none of them kills the
process or prints a traceback. Both implementations.

The start is held at a known point by a configuration file that is a named pipe: the server
blocks reading it until the test writes the configuration, after the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import ErqProcess
from support import poll, queue_config

SIGHUP_BIT = 1 << (signal.SIGHUP - 1)


def _caught_signals(pid: int) -> int:
    """The process's caught-signal mask (``SigCgt`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigCgt line")


def _write_to_pipe(path: Path, text: str) -> None:
    """Open blocks until the server opens the pipe to read, then the configuration goes in."""
    with open(path, "w") as pipe:
        pipe.write(text)


@pytest.fixture
def starting(impl: str, tmp_path: Path):
    """An ``erq serve`` held at its configuration file, with its start-up signals held."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to see which signals the process catches")
    pipe = tmp_path / "erq.toml"
    os.mkfifo(pipe)
    (tmp_path / "data").mkdir()
    proc = ErqProcess(impl, tmp_path / "data", args=["--config", str(pipe)])
    proc.pipe = pipe
    proc.start(wait=False)
    try:
        # erq serve records SIGHUP (among others) from its first step: before that, its default
        # action would end the process. The pipe holds the start after that step.
        poll(lambda: _caught_signals(proc.proc.pid) & SIGHUP_BIT, "SIGHUP to be caught")
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            threading.Thread(target=_write_to_pipe, args=(pipe, ""), daemon=True).start()
        proc.stop(signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_starting_stops_the_server_the_orderly_way(starting, sig):
    starting.proc.send_signal(sig)
    _write_to_pipe(starting.pipe, "")
    try:
        code = starting.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {sig.name} while starting:\n{starting.read_log()}")
    log = starting.read_log()
    assert code == 0, log
    assert f"{sig.name} while starting" in log and f"shutting down ({sig.name})" in log, log
    assert "ready on" not in log and "Traceback" not in log, log


def test_a_reload_while_starting_is_applied_once_the_server_runs(starting):
    starting.proc.send_signal(signal.SIGHUP)
    _write_to_pipe(starting.pipe, "[queues.default]\nmax_items = 5\n")
    # The reload reads the file again, from the pipe: the new file says 7. (A second writer
    # must wait until the first read is over, or both would feed it.)
    poll(lambda: "data directory" in starting.read_log(), "the configuration to be read")
    threading.Thread(
        target=_write_to_pipe,
        args=(starting.pipe, "[queues.default]\nmax_items = 7\n"),
        daemon=True,
    ).start()
    starting.wait_ready()
    poll(lambda: "configuration reloaded from" in starting.read_log(), "the held reload")
    c = starting.client()
    try:
        assert c.set("q", b"x") == b"STORED\r\n"
        assert queue_config(c, "q")["max_items"] == "7"
    finally:
        c.close()
    log = starting.read_log()
    assert "SIGHUP while starting" in log and "Traceback" not in log, log
    assert starting.proc.poll() is None


def test_stop_signals_repeated_until_the_process_ends_still_end_it_with_status_zero(erq_factory):
    # A second Ctrl-C, or a supervisor signalling the process group and the pid: one landing
    # after the event loop closed used to end the process by that signal (status 143 or 130).
    server = erq_factory()
    c = server.client()
    assert c.set("q", b"kept") == b"STORED\r\n"
    c.close()
    proc = server.proc
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
        time.sleep(0.001)
    assert proc.wait(5) == 0, server.read_log()
    log = server.read_log()
    assert "stopped" in log and "Traceback" not in log, log
    server.start()
    c = server.client()
    assert c.get("q") == b"VALUE q 0 4\r\nkept\r\nEND\r\n"
    c.close()


def test_only_the_main_thread_takes_the_stop_and_reload_signals(erq_factory):
    """Every worker thread (recovery, syncs, spare segments, compaction) blocks SIGTERM,
    SIGINT and SIGHUP: blocked in the main thread they are then held for the whole process,
    which the server's last step relies on to swap their handlers with no instant at which
    one would kill it (a default action ends the process whichever thread it lands on)."""
    held = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGHUP - 1))
    server = erq_factory('[queues.default]\nmax_journal_size = "1MiB"\n')
    c = server.client()
    for n in range(300):  # a few journal rotations and compactions, a spare segment or two
        assert c.set("q", b"%04d" % n + b"x" * 8192) == b"STORED\r\n"
        assert c.get("q") == b"VALUE q 0 8196\r\n%04d" % n + b"x" * 8192 + b"\r\nEND\r\n"
    pid = server.proc.pid
    masks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        masks[int(tid)] = int(status.split("SigBlk:")[1].split()[0], 16)
    workers = {tid: mask for tid, mask in masks.items() if tid != pid}
    assert workers, masks  # recovery ran on a worker thread, at least
    assert all(mask & held == held for mask in workers.values()), masks
    assert masks[pid] & held == 0, masks
    c.close()
