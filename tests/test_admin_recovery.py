"""The admin port during start-up recovery: the journals are replayed on a worker thread, so the
loop answers /healthz (200) and the other endpoints (503 ``starting``) while it runs, and the
memcache port opens only after it.

The server is a real subprocess of each build, started by a launcher that holds recovery after
the real replay of each journal until the test lets it go (a line on stdin, or its end): every
probe below is made while recovery is known to be unfinished, with no timing to hope on.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_admin import Reply, _exchange, _run, http, parse_metrics, value

from erq.config import load_config
from erq.journal import GroupCommit, QueueJournal
from erq.ring import ITEM_OVERHEAD

from conftest import ErqProcess, free_port, impl_module
from support import END, NOT_STORED, STORED, one, poll, queue_config

# ``erq serve`` whose recovery waits, after replaying each journal, for a line on stdin (EOF
# lets every later one through). QueueJournal.open looks ``replay`` up when it is called.
GATED_SERVE = """
import sys
import erq.journal.journal as journal
from erq.cli import main

replay = journal.replay

def gated_replay(*args, **kwargs):
    result = replay(*args, **kwargs)
    print("erq-test: replay held at the gate", file=sys.stderr, flush=True)
    sys.stdin.buffer.readline()
    return result

journal.replay = gated_replay
sys.exit(main())
"""


class GatedErq(ErqProcess):
    """An erq server, with an admin port, whose recovery holds until :meth:`release`."""

    launcher = ("-c", GATED_SERVE)
    stdin = subprocess.PIPE

    def __init__(self, impl: str, data_dir: Path, config: str | None = None) -> None:
        self.admin_port = free_port()
        super().__init__(impl, data_dir, config, args=["--admin-port", str(self.admin_port)])
        self.log_path = data_dir.parent / "gated.log"  # its own: only this server's lines

    def start(self, wait: bool = False) -> GatedErq:
        super().start(wait)
        return self

    def release(self) -> None:
        """Let recovery finish (every journal still to replay goes through too)."""
        self.proc.stdin.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is not None:
            self.proc.stdin.close()
        return super().stop(sig, timeout)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5.0).close()
    except OSError:
        return False
    return True


def test_probes_are_answered_while_the_journals_are_replayed(erq_factory, impl):
    first = erq_factory()
    c = first.client()
    assert c.get("jobs+audit") == END  # a fanout child: its registration is recovered too
    for data in (b"one", b"two", b"three"):
        assert c.set("jobs", data) == STORED
    assert c.get("jobs/open") == one("jobs/open", b"one")  # open at the crash: back first
    c.close()
    first.kill()

    proc = GatedErq(impl, first.data_dir).start()
    port = proc.admin_port
    try:
        poll(lambda: proc.proc.poll() is not None or accepts(port), "the admin port")
        assert proc.proc.poll() is None, proc.read_log()
        # Recovery holds after the first journal's replay: all of this happens during it.
        reply = http(port, "/healthz")
        assert (reply.status, reply.body) == (200, b"ok")
        for path in ("/readyz", "/stats.json", "/metrics"):
            reply = http(port, path)
            assert (reply.status, reply.body) == (503, b"starting"), path
            assert reply.headers["content-type"] == "text/plain; charset=utf-8", path
        head = http(port, "/readyz", "HEAD")
        assert (head.status, head.body, head.headers["content-length"]) == (503, b"", "8")
        assert http(port, "/nope").status == 404
        assert http(port, "/healthz", "POST").status == 405
        assert not accepts(proc.port)  # the memcache port opens after recovery
        assert " ready on " not in proc.read_log()
        assert proc.proc.poll() is None

        proc.release()
        reply = poll(lambda: (r := http(port, "/readyz")).status == 200 and r, "readiness")
        assert reply.body == b"UP"
        doc = json.loads(http(port, "/stats.json").body)
        assert doc["queues"]["jobs"]["items"] == 3
        assert doc["queues"]["jobs"]["children"] == "jobs+audit"
        assert doc["queues"]["jobs+audit"]["items"] == 3
        assert value(parse_metrics(http(port, "/metrics").text), "erq_ready") == 1
        proc.wait_ready()
        c = proc.client()
        assert c.get("jobs") == one("jobs", b"one")
        assert c.set("jobs", b"four") == STORED  # the journal opened on the thread takes appends
        assert c.get("jobs+audit") == one("jobs+audit", b"one")
        c.close()
        assert proc.stop() == 0
        log = proc.read_log()
        assert "recovered 6 items" in log and "Traceback" not in log, log
    finally:
        proc.stop(signal.SIGKILL)


def _recovering(proc: GatedErq) -> None:
    """Wait until the gated server replays (its admin port answers), its memcache port shut,
    and its replay is held at the gate after the first journal. The admin port opens before
    the replay starts: a signal sent then stopped the replay before any journal, and the
    server was gone before a test could see it held."""
    poll(lambda: proc.proc.poll() is not None or accepts(proc.admin_port), "the admin port")
    poll(
        lambda: proc.proc.poll() is not None or "held at the gate" in proc.read_log(),
        "the replay to reach its gate",
    )
    assert proc.proc.poll() is None, proc.read_log()
    assert not accepts(proc.port)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_during_recovery_ends_it_cleanly_and_the_next_start_recovers_all(
    erq_factory, impl, sig
):
    """SIGTERM killed a recovering server outright (no handler yet) and SIGINT ended it with a
    traceback after the whole replay. Now both stop the replay at its next queue, close what it
    opened, and exit 0 without ever opening the memcache port."""
    first = erq_factory()
    c = first.client()
    for data in (b"one", b"two", b"three"):
        assert c.set("jobs", data) == STORED
    assert c.get("jobs/open") == one("jobs/open", b"one")  # open at the crash
    assert c.set("mail", b"m1") == STORED
    assert c.set("mail", b"m2") == STORED
    c.close()
    first.kill()

    proc = GatedErq(impl, first.data_dir).start()
    try:
        _recovering(proc)  # held after replaying "jobs", the first of two queues
        proc.proc.send_signal(sig)
        poll(lambda: "shutting down" in proc.read_log(), "the signal to be handled")
        assert proc.proc.poll() is None and not accepts(proc.port)
        proc.release()
        assert proc.proc.wait(20) == 0
        log = proc.read_log()
        assert "recovery stopped before it finished" in log, log
        assert " ready on " not in log and "Traceback" not in log, log
    finally:
        proc.stop(signal.SIGKILL)

    again = erq_factory(name=first.data_dir.name)
    c = again.client()
    assert [c.get("jobs") for _ in range(4)] == [
        one("jobs", b"one"),  # the read open at the crash, back at the head
        one("jobs", b"two"),
        one("jobs", b"three"),
        END,
    ]
    assert [c.get("mail") for _ in range(3)] == [one("mail", b"m1"), one("mail", b"m2"), END]
    c.close()
    assert "recovered 5 items" in again.read_log()


def test_a_sighup_during_recovery_reloads_the_configuration_once_it_ends(erq_factory, impl):
    """SIGHUP's default action killed a recovering server. Now the reload waits for the replay
    (whose queues were built from the old settings) and then reaches every queue."""
    first = erq_factory(config='[queues."jobs"]\nmax_items = 5\n')
    c = first.client()
    assert c.set("jobs", b"one") == STORED
    c.close()
    first.kill()

    proc = GatedErq(impl, first.data_dir, config='[queues."jobs"]\nmax_items = 5\n').start()
    try:
        _recovering(proc)
        proc.write_config('[queues."jobs"]\nmax_items = 2\n')
        proc.proc.send_signal(signal.SIGHUP)
        poll(lambda: "reloaded when it ends" in proc.read_log(), "the SIGHUP to be handled")
        assert proc.proc.poll() is None
        proc.release()
        proc.wait_ready()
        c = proc.client()
        assert queue_config(c, "jobs")["max_items"] == "2"
        assert c.set("jobs", b"two") == STORED
        assert c.set("jobs", b"three") == NOT_STORED  # the new limit holds
        assert c.get("jobs") == one("jobs", b"one")
        c.close()
        assert proc.stop() == 0
        assert "Traceback" not in proc.read_log()
    finally:
        proc.stop(signal.SIGKILL)


# ``erq serve`` whose opening of the memcache port, after recovery, waits for a line on stdin.
GATED_LISTEN = """
import asyncio
import sys
import erq.server as server
from erq.cli import main

listen = server.listen

async def gated_listen(*args, **kwargs):
    print("memcache port held", flush=True)
    await asyncio.to_thread(sys.stdin.buffer.readline)
    return await listen(*args, **kwargs)

server.listen = gated_listen
sys.exit(main())
"""


class GatedListenErq(GatedErq):
    """An erq server, with an admin port, whose memcache port opens at :meth:`release`."""

    launcher = ("-c", GATED_LISTEN)


def test_readiness_waits_for_the_memcache_port_to_open(tmp_path, impl):
    """/readyz said 200 UP, and /stats.json answered, before the memcache port was open (the
    server was made ready, then opened it): 8 starts in 10 of the pure-Python build had a
    client that connected on the first 200 refused. A SIGHUP meanwhile still reloads."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    proc = GatedListenErq(impl, data_dir, config='[queues."jobs"]\nmax_items = 5\n').start()
    port = proc.admin_port
    try:
        poll(
            lambda: proc.proc.poll() is not None or "memcache port held" in proc.read_log(),
            "the memcache port to be held",
        )
        assert proc.proc.poll() is None, proc.read_log()
        for path in ("/readyz", "/stats.json", "/metrics"):
            reply = http(port, path)
            assert (reply.status, reply.body) == (503, b"starting"), path
        assert http(port, "/healthz").status == 200
        proc.write_config('[queues."jobs"]\nmax_items = 2\n')
        proc.proc.send_signal(signal.SIGHUP)
        poll(lambda: "reloaded when it ends" in proc.read_log(), "the SIGHUP to be handled")
        assert not accepts(proc.port)
        proc.release()
        reply = poll(lambda: (r := http(port, "/readyz")).status == 200 and r, "readiness")
        assert reply.body == b"UP" and accepts(proc.port)
        c = proc.client()
        assert [c.set("jobs", data) for data in (b"a", b"b", b"c")] == [STORED] * 2 + [NOT_STORED]
        assert queue_config(c, "jobs")["max_items"] == "2"
        c.close()
        assert proc.stop() == 0
        assert "Traceback" not in proc.read_log()
    finally:
        proc.stop(signal.SIGKILL)


def test_a_taken_memcache_port_fails_the_start_before_the_journals_are_replayed(erq_factory, impl):
    first = erq_factory()
    assert first.client().set("jobs", b"one") == STORED
    first.kill()
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    proc = GatedErq(impl, first.data_dir)
    proc.port = taken.getsockname()[1]
    try:
        proc.start()  # its recovery would wait for release(), which never comes
        assert proc.proc.wait(30) == 1
        log = proc.read_log()
        assert f"cannot open the memcache port 127.0.0.1:{proc.port}" in log, log
        assert "Traceback" not in log
    finally:
        proc.stop(signal.SIGKILL)
        taken.close()


# ---- the collection's two halves of recovery ---------------------------------------------------
def _open_journal(directory: Path, qcfg, commit=None):
    """The server's journal factory, in short."""
    return QueueJournal.open(
        directory,
        fsync=qcfg.fsync,
        max_memory_size=qcfg.max_memory_size,
        commit=commit,
        item_overhead=ITEM_OVERHEAD,
    )


def _collection(impl: str, data_dir: Path, commit=None, journal_factory=None):
    queues_mod = impl_module(impl, "_queues", "_queues_py")
    factory = journal_factory or (lambda directory, qcfg: _open_journal(directory, qcfg, commit))
    return queues_mod.QueueCollection(load_config(None, cli={}), data_dir, journal_factory=factory)


def _write_journal(directory: Path, count: int, opened: int = 0) -> list[bytes]:
    journal, _ = QueueJournal.open(directory, fsync="never")
    now = int(time.time() * 1000)
    datas = [b"%d" % i for i in range(1, count + 1)]
    for id, data in enumerate(datas, 1):
        journal.add(id, 0, now, 0, data)
    for id in range(1, opened + 1):
        journal.open(id)
    journal.close()
    return datas


def test_open_existing_touches_no_loop_and_changes_nothing_until_adopt(impl, tmp_path):
    """As the server runs it: on a worker thread, journals with the server's GroupCommit (and
    its default fsync period, whose timers are the loop's), a read open at the crash to journal
    back. The loop is in debug mode, where a loop method called from another thread raises."""
    data_dir = tmp_path / "data"
    _write_journal(data_dir / "jobs", 3, opened=1)
    (data_dir / "jobs+audit").mkdir()
    (data_dir / "not a queue").mkdir()

    async def scenario() -> None:
        commit = GroupCommit(asyncio.get_running_loop())
        queues = _collection(impl, data_dir, commit)
        try:
            opened = await asyncio.to_thread(queues.open_existing)
            # What the worker thread made is seen by no one yet.
            assert len(queues) == 0 and queues.names() == [] and not queues.by_raw_name
            assert queues.get("jobs") is None and queues.children("jobs") == []
            assert (queues.recovered_items, queues.recovered_bytes) == (0, 0)
            assert [(q.name, q.items) for q, _ in opened] == [("jobs", 3), ("jobs+audit", 0)]
            queues.adopt(opened)
            assert queues.names() == ["jobs", "jobs+audit"]
            assert queues.children("jobs") == ["jobs+audit"]
            assert queues.by_raw_name[b"jobs"] is queues.get("jobs")
            assert (queues.recovered_items, queues.recovered_bytes) == (3, 3)
            assert queues.open_existing() == []  # every directory has its queue now
            queues.add("jobs", b"4", 0, 0)  # on the loop: arms the journal's fsync timer
            taken = [queues.get("jobs").take(False).data for _ in range(4)]
            assert taken == [b"1", b"2", b"3", b"4"]
            assert queues.get("jobs+audit").items == 1
            await commit.drain()
        finally:
            queues.close()
            commit.close()

    asyncio.run(scenario(), debug=True)


def test_recovery_restores_a_long_queue_in_order_across_its_slices(impl, tmp_path):
    data_dir = tmp_path / "data"
    queues = _collection(impl, data_dir)
    slice_size = impl_module(impl, "_queues", "_queues_py")._RESTORE_SLICE
    datas = _write_journal(data_dir / "jobs", slice_size * 2 + 5, opened=2)
    queues.load_existing()
    queue = queues.get("jobs")
    assert queue.items == queues.recovered_items == len(datas)
    taken = [queue.take(False).data for _ in range(len(datas))]
    assert taken == datas  # the two reads open at the crash first, as they were
    assert queue.items == 0
    queues.close()


def test_open_existing_stops_between_queues_and_slices_and_closes_what_it_opened(impl, tmp_path):
    data_dir = tmp_path / "data"
    queues_mod = impl_module(impl, "_queues", "_queues_py")
    slice_size = queues_mod._RESTORE_SLICE
    _write_journal(data_dir / "a", 3)
    _write_journal(data_dir / "b", slice_size + 1)  # two slices
    _write_journal(data_dir / "c", 1)
    queues = _collection(impl, data_dir)
    stop = threading.Event()
    stop.set()
    with pytest.raises(queues_mod.RecoveryStopped):
        queues.open_existing(stop)  # before the first queue

    # Set once "b" is replayed: its restore stops after its first slice, and "a" is closed.
    journals = []

    def open_and_stop(directory: Path, qcfg):
        journal, recovery = _open_journal(directory, qcfg)
        journals.append(journal)
        if directory.name == "b":
            stop.set()
        return journal, recovery

    stop.clear()
    queues = _collection(impl, data_dir, journal_factory=open_and_stop)
    with pytest.raises(queues_mod.RecoveryStopped):
        queues.open_existing(stop)
    assert [j.directory.name for j in journals] == ["a", "b"]  # "c" never opened
    assert all(j.closed for j in journals)
    assert len(queues) == 0

    # Nothing was lost: a recovery to its end finds every item.
    queues = _collection(impl, data_dir)
    queues.load_existing()
    assert [queues.get(n).items for n in ("a", "b", "c")] == [3, slice_size + 1, 1]
    queues.close()


# ---- in-process: the endpoints before recovery has finished ------------------------------------
def test_only_healthz_answers_ok_before_recovery_has_finished():
    """Nothing but ``ready`` and ``status`` is read: the state has no queues or counters."""
    from erq.admin import AdminServer

    state = SimpleNamespace(ready=False, status="UP")

    async def scenario() -> None:
        admin = AdminServer(state)
        port = await admin.start("127.0.0.1", 0)
        try:
            for path, expected in (
                ("/healthz", (200, b"ok")),
                ("/readyz", (503, b"starting")),
                ("/stats.json", (503, b"starting")),
                ("/metrics", (503, b"starting")),
            ):
                reply = Reply(await _exchange(port, f"GET {path} HTTP/1.1\r\n\r\n".encode()))
                assert (reply.status, reply.body) == expected, path
                reply = Reply(await _exchange(port, f"HEAD {path} HTTP/1.1\r\n\r\n".encode()))
                assert (reply.status, reply.body) == (expected[0], b""), path
        finally:
            admin.close()

    _run(scenario)
