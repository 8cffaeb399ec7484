"""Stock, unmodified memcache clients against a real erq server (PROTOCOL.md: "today's memcache
clients work unmodified"), and the graceful shutdown a client sees.

- pymemcache's base ``Client``, with its defaults (``set``/``delete``/``flush_all`` send
  ``noreply``; replies to a get are matched to the requested keys).
- Debian's libmemcached-tools (``memccp``, ``memccat``, ``memcstat``), text protocol only: they
  send ``set <file> <flags> <exptime> <n>``, ``get <key>``, ``version`` then ``stats``, and
  ``quit``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from pymemcache.client.base import Client

import erq

from conftest import ErqProcess
from support import END, STORED, wait_for_stat


def pymemcache_client(server: ErqProcess) -> Client:
    return Client(("127.0.0.1", server.port), connect_timeout=5, timeout=30)


# ---- pymemcache ------------------------------------------------------------------------------------
def test_pymemcache_client_sets_gets_with_options_and_administers_queues(server):
    raw = server.client()
    mc = pymemcache_client(server)
    assert mc.set("jobs", b"one") is True  # default noreply
    assert mc.set("jobs", b"two") is True
    assert mc.set("jobs", b"three") is True
    assert mc.get("jobs/t=1000") == b"one"
    assert mc.get("jobs/open") == b"two"
    assert raw.stats()["queue_jobs_open_transactions"] == "1"
    assert mc.get("jobs/close") is None
    assert mc.get("jobs/close/open") == b"three"
    assert mc.get("jobs/abort") is None
    assert mc.get("jobs/peek") == b"three"
    assert mc.get("jobs/t=10/open") == b"three"
    assert mc.get("jobs/close") is None
    stats = raw.stats()
    assert (stats["queue_jobs_items"], stats["queue_jobs_open_transactions"]) == ("0", "0")
    assert mc.get("jobs/t=1") is None

    for name, data in (("a", b"1"), ("c", b"3"), ("c", b"33")):
        assert mc.set(name, data) is True
    assert mc.get_many(["a", "b", "c", "c/peek"]) == {"a": b"1", "c": b"3", "c/peek": b"33"}

    assert mc.set("d", b"x") is True
    assert mc.delete("d") is True
    assert mc.delete("d", noreply=False) is True  # DELETED, also for a missing queue
    assert mc.get("d/peek") is None

    assert mc.set("e", b"x") is True
    assert mc.flush_all() is True
    assert mc.get("e/peek") is None
    assert mc.set("e", b"y") is True
    assert mc.flush_all(noreply=False) is True  # checks for OK
    assert mc.get("e") is None

    stats = mc.stats()
    assert stats[b"pid"] == server.proc.pid
    assert stats[b"version"] == erq.__version__.encode()
    assert stats[b"queue_jobs_transactions"] == 3
    assert stats[b"queue_c_total_flushes"] == 2
    assert mc.version() == erq.__version__.encode()
    mc.close()


def test_pymemcache_blocking_get_is_woken_by_a_set(server):
    raw = server.client()
    mc = pymemcache_client(server)
    results: list[object] = []
    reader = threading.Thread(target=lambda: results.append(mc.get("work/t=30000/open")))
    reader.start()
    try:
        wait_for_stat(raw, "queue_work_waiters", 1)
        assert raw.set("work", b"job-1") == STORED
    finally:
        reader.join(30)
    assert results == [b"job-1"]
    assert mc.get("work/close") is None
    assert raw.stats()["queue_work_open_transactions"] == "0"
    mc.close()


def test_pymemcache_with_noreply_false_learns_a_full_queue_refused_the_item(erq_factory):
    # The README's worker sets with noreply=False: the default reads no answer at all.
    server = erq_factory(config="[queues.default]\nmax_items = 1\n")
    mc = pymemcache_client(server)
    assert mc.set("jobs", b"resize photo 17", noreply=False) is True  # STORED: journaled
    assert mc.set("jobs", b"one too many", noreply=False) is False  # NOT_STORED: full
    assert mc.set("jobs", b"unseen refusal") is True  # noreply: True whatever happened
    assert mc.get("jobs/t=1000/close/open") == b"resize photo 17"
    assert mc.get("jobs/t=100/close/open") is None
    mc.close()


# ---- libmemcached-tools ----------------------------------------------------------------------------------
def memc_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install Debian's libmemcached-tools")
    return path


def run_tool(name: str, server: ErqProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [memc_tool(name), f"--servers=127.0.0.1:{server.port}", *args],
        capture_output=True,
        timeout=30,
    )


def test_memccp_stores_files_as_items_named_after_them_and_memccat_prints_them(server, tmp_path):
    raw = server.client()
    files = tmp_path / "files"
    (files / "sub").mkdir(parents=True)
    content = b"hello\r\nworld\x00\nEND\r\n\x80tail"
    (files / "jobfile").write_bytes(content)
    (files / "sub" / "other").write_bytes(b"second")

    assert run_tool("memccp", server, str(files / "jobfile")).returncode == 0
    assert run_tool("memccp", server, "--flags=5", str(files / "jobfile")).returncode == 0
    assert run_tool("memccp", server, str(files / "sub" / "other")).returncode == 0  # basename
    stats = raw.stats()
    assert (stats["queue_jobfile_items"], stats["queue_other_items"]) == ("2", "1")
    assert raw.get("jobfile/peek") == b"VALUE jobfile/peek 0 %d\r\n%s\r\nEND\r\n" % (
        len(content),
        content,
    )

    first = run_tool("memccat", server, "jobfile")
    assert (first.returncode, first.stdout) == (0, content + b"\n")  # memccat adds a newline
    second = run_tool("memccat", server, "--flags", "jobfile")
    assert (second.returncode, second.stdout) == (0, b"5\n" + content + b"\n")
    assert run_tool("memccat", server, "other").stdout == b"second\n"
    missing = run_tool("memccat", server, "jobfile")  # a queue hands an item out once
    assert (missing.returncode, missing.stdout) == (1, b"")

    # A negative expiry means already expired.
    assert run_tool("memccp", server, "--expire=-1", str(files / "jobfile")).returncode == 0
    assert run_tool("memccat", server, "jobfile").returncode == 1
    stats = raw.stats()
    assert (stats["queue_jobfile_items"], stats["queue_jobfile_expired_items"]) == ("0", "1")
    assert (stats["queue_jobfile_total_items"], stats["cmd_set"]) == ("3", "4")


def test_memcstat_prints_the_server_stats(server):
    # memcstat asks for the version first and gives up on a major version of 0 (libmemcached
    # treats strtol() == 0 as unparsable), so this also pins a VERSION it accepts.
    raw = server.client()
    assert raw.set("jobs", b"x") == STORED
    result = run_tool("memcstat", server)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    lines = result.stdout.decode().splitlines()
    assert lines[0] == f"Server: 127.0.0.1 ({server.port})"
    printed = dict(line.strip().split(": ", 1) for line in lines[1:])
    assert printed["pid"] == str(server.proc.pid)
    assert printed["version"] == erq.__version__
    assert printed["queue_jobs_items"] == "1"
    assert printed["cmd_set"] == "1"


# ---- graceful shutdown ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_answers_a_blocked_get_with_end_and_the_server_exits_zero(server, sig):
    watcher = server.client()
    blocked = server.client()
    blocked.send(b"get q/t=10000\r\n")
    wait_for_stat(watcher, "queue_q_waiters", 1)
    server.proc.send_signal(sig)
    assert blocked.until() == END
    assert blocked.is_closed()
    assert server.proc.wait(20) == 0
    assert watcher.is_closed()


def test_start_up_log_names_version_implementation_loop_and_address(server):
    implementation = "cython" if server.impl == "c" else "python"
    # The compiled build serves its clients from erq's own epoll set (Linux).
    layer = "epoll" if server.impl == "c" and sys.platform.startswith("linux") else "loop"
    wanted = (
        f"erq {erq.__version__} ready on 127.0.0.1:{server.port} "
        f"(implementation={implementation}, loop=uvloop, connections={layer}"
    )
    deadline = time.monotonic() + 10
    while wanted not in server.read_log():
        assert time.monotonic() < deadline, server.read_log()
        time.sleep(0.02)
