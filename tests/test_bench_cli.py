"""``erq bench`` over real sockets: its counts agree with the server's own ``stats`` (both builds),
it cleans up the queue, a server it starts itself is stopped and its directory removed, and it
fails (exit 1, a message) when the target answers a wrong value, an error, garbage, or nothing.

The misbehaving targets are a tiny queue server in a thread of this process (``FakeQueue``);
those tests exercise the bench's client, which has no Cython twin, so they run once.
Runs are short (``--seconds 0.3``); nothing here asserts a speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pytest

from erq.loadgen import BenchError, ReplyReader, Values

from conftest import ROOT, ErqProcess, free_port
from support import queue_names

SHORT = ("--seconds", "0.3")
IMPLEMENTATION = {"c": "cython", "py": "python"}


def run_bench(*args: str, impl: str = "c", env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m erq bench ARGS`` as a user would run it (the build chosen by ``impl``)."""
    full_env = dict(os.environ)
    full_env.pop("ERQ_NO_EXTENSIONS", None)
    if impl == "py":
        full_env["ERQ_NO_EXTENSIONS"] = "1"
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "erq", "bench", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=180,
    )


def report(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    out = json.loads(proc.stdout)
    assert out["ok"] is True
    return out


def scenario(out: dict, name: str) -> dict:
    (found,) = [s for s in out["scenarios"] if s["scenario"] == name]
    return found


def delta(before: dict[str, str], after: dict[str, str], name: str) -> int:
    return int(after[name]) - int(before[name])


# ---- against a running erq, both builds ---------------------------------------------------------
def test_set_count_agrees_with_server_stats(server: ErqProcess) -> None:
    c = server.client()
    before = c.stats()
    out = report(
        run_bench("--port", str(server.port), "--scenario", "set", "--json", *SHORT,
                  "--conns", "3", "--pipeline", "16", "--queue", "bq")
    )  # fmt: skip
    after = c.stats()
    s = scenario(out, "set")
    assert [x["scenario"] for x in out["scenarios"]] == ["set"]
    assert s["ops"] > 0
    assert delta(before, after, "cmd_set") == s["ops"]
    assert delta(before, after, "total_items") == s["ops"]
    assert s["latency_per"] == "batch of 16"
    assert out["target"]["self_started"] is False and out["target"]["pid"] is None
    assert s["server_cpu_s"] is None and s["server_rss_mib"] is None
    assert "bq" not in queue_names(c), "the bench leaves its queue behind"
    assert not any(k.startswith("queue_bq_") for k in after)
    c.close()


def test_get_drains_what_it_prefilled_and_counts_only_hits(server: ErqProcess) -> None:
    # 2-byte values have ten distinct tags ("0:" .. "9:"): the bench pre-fills exactly ten items,
    # so the run drains the queue whatever the speed.
    c = server.client()
    before = c.stats()
    out = report(
        run_bench("--port", str(server.port), "--scenario", "get", "--json", *SHORT,
                  "--size", "2", "--conns", "3", "--pipeline", "4", "--queue", "gq")
    )  # fmt: skip
    after = c.stats()
    s = scenario(out, "get")
    assert s["details"]["prefilled"] == 10
    assert s["details"]["drained"] is True
    assert s["ops"] == 10
    assert s["details"]["empty"] >= 1
    assert delta(before, after, "cmd_set") == 10
    assert delta(before, after, "get_hits") == 10
    assert delta(before, after, "cmd_get") == 10 + s["details"]["empty"]
    assert "gq" not in queue_names(c)
    c.close()


def test_get_stopped_by_time_counts_what_it_took(server: ErqProcess) -> None:
    c = server.client()
    before = c.stats()
    out = report(
        run_bench("--port", str(server.port), "--scenario", "get", "--json", *SHORT,
                  "--conns", "2", "--pipeline", "8", "--queue", "gt")
    )  # fmt: skip
    after = c.stats()
    s = scenario(out, "get")
    d = s["details"]
    assert 0 < s["ops"] <= d["prefilled"]
    assert d["drained"] == (d["empty"] > 0)
    assert delta(before, after, "cmd_set") == d["prefilled"]
    assert delta(before, after, "get_hits") == s["ops"]
    assert delta(before, after, "get_misses") == d["empty"]
    assert "gt" not in queue_names(c)
    c.close()


def test_pingpong_sets_and_gets_one_at_a_time(server: ErqProcess) -> None:
    c = server.client()
    before = c.stats()
    out = report(
        run_bench("--port", str(server.port), "--scenario", "pingpong", "--json", *SHORT,
                  "--conns", "5", "--queue", "pq")
    )  # fmt: skip
    after = c.stats()
    s = scenario(out, "pingpong")
    sets, gets = s["details"]["sets"], s["details"]["gets"]
    assert sets == gets > 0
    assert s["ops"] == sets + gets
    assert (s["conns"], s["pipeline"], s["latency_per"]) == (1, 1, "request")
    assert delta(before, after, "cmd_set") == sets
    assert delta(before, after, "get_hits") == gets
    assert delta(before, after, "get_misses") == 0
    assert "pq" not in queue_names(c)
    c.close()


def test_table_lists_every_scenario_by_default(server: ErqProcess) -> None:
    proc = run_bench("--port", str(server.port), "--seconds", "0.2", "--queue", "tq")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert {"set", "get", "pingpong"} <= set(rows)
    assert "batch of 64" in rows["set"] and "request" in rows["pingpong"]
    assert "server CPU s" not in proc.stdout  # not our process: nothing to read
    assert "benchmarks/run_e2e.py" in proc.stdout  # pipelined figures are a floor
    c = server.client()
    assert "tq" not in queue_names(c)
    c.close()


# ---- a server of its own -----------------------------------------------------------------------
def test_without_target_starts_and_stops_its_own_server(impl: str, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # ERQ_CONFIG names no file: were it passed on, the server would not start (embedded defaults).
    env = {"TMPDIR": str(scratch), "ERQ_CONFIG": str(tmp_path / "missing.toml")}
    out = report(run_bench("--json", "--seconds", "0.2", "--pipeline", "8", impl=impl, env=env))
    target = out["target"]
    assert target["self_started"] is True
    assert target["implementation"] == IMPLEMENTATION[impl]
    assert [s["scenario"] for s in out["scenarios"]] == ["set", "get", "pingpong"]
    for s in out["scenarios"]:
        assert s["ops"] > 0
        assert s["server_rss_mib"] > 0
        assert s["server_cpu_s"] is not None and s["server_cpu_s"] >= 0
    assert not Path(f"/proc/{target['pid']}").exists(), "the bench left its server running"
    with pytest.raises(ProcessLookupError):
        os.kill(target["pid"], 0)
    assert list(scratch.iterdir()) == [], "the bench left its temporary directory"


@contextlib.contextmanager
def long_bench(scratch: Path, stderr=subprocess.PIPE):
    """A bench of its own server, 60 s of round trips, started in ``scratch`` as TMPDIR:
    yields (process, the server's port) once the server answers; killed on the way out."""
    env = dict(os.environ, TMPDIR=str(scratch))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "erq", "bench", "--seconds", "60", "--scenario", "pingpong"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    try:
        heading = proc.stdout.readline()  # printed once its server answers
        assert "started by the bench on 127.0.0.1:" in heading, heading + (
            proc.stderr.read() if proc.stderr else ""  # evaluated only on failure
        )
        yield proc, int(heading.split("127.0.0.1:")[1].split(",")[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_to_the_bench_still_stops_its_server(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with long_bench(scratch) as (proc, port):
        assert list(scratch.iterdir()) != []
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "interrupted" in err
    assert list(scratch.iterdir()) == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _exited(pid: int) -> bool:
    """Gone, or a zombie waiting for its (new) parent to reap it."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text(errors="replace")
    except FileNotFoundError:
        return True


def kill_and_see_its_server_stop(bench: subprocess.Popen) -> None:
    """SIGKILL the bench, then wait for the one server it started to exit (the parent-death
    signal's SIGTERM)."""
    children = Path(f"/proc/{bench.pid}/task/{bench.pid}/children").read_text().split()
    assert len(children) == 1, children
    server = int(children[0])
    bench.kill()
    bench.wait(timeout=10)
    deadline = time.monotonic() + 20
    while not _exited(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _exited(server), "the server outlived the killed bench"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_a_killed_bench_does_not_leave_its_server_running(tmp_path: Path) -> None:
    """SIGKILL gives the bench no chance to stop its server: the kernel sends it SIGTERM."""
    with long_bench(tmp_path, stderr=subprocess.DEVNULL) as (proc, port):
        kill_and_see_its_server_stop(proc)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_the_next_bench_removes_what_a_killed_bench_left_and_nothing_else(tmp_path: Path) -> None:
    """SIGKILL gives the bench no chance to remove its temporary directory (its server's data,
    journal segments included): each killed bench left one behind for good."""
    with long_bench(tmp_path, stderr=subprocess.DEVNULL) as (proc, _port):
        [killed] = list(tmp_path.iterdir())
        kill_and_see_its_server_stop(proc)
    not_a_bench = tmp_path / "erq-bench-by-hand"  # no lock file: not known to be a bench's
    not_a_bench.mkdir()
    with long_bench(tmp_path, stderr=subprocess.DEVNULL):
        [running] = set(tmp_path.iterdir()) - {killed, not_a_bench}
        proc = run_bench(
            "--seconds", "0.2", "--scenario", "pingpong", env={"TMPDIR": str(tmp_path)}
        )
        assert proc.returncode == 0, proc.stderr
        assert set(tmp_path.iterdir()) == {running, not_a_bench}
        assert (running / "data").is_dir()


# ---- a target that misbehaves ------------------------------------------------------------------
class FakeQueue:
    """A small memcache queue server in threads that can be told to go wrong in one way."""

    def __init__(self, fault: str = "") -> None:
        self.fault = fault
        self.items: deque[bytes] = deque()
        self.sets = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                out: list[bytes] = []
                while (eol := buf.find(b"\r\n")) >= 0:
                    words = buf[:eol].split()
                    if words[0] == b"set":
                        end = eol + 2 + int(words[4]) + 2
                        if len(buf) < end:
                            break
                        reply = self._set(buf[eol + 2 : end - 2])
                        buf = buf[end:]
                    else:
                        buf = buf[eol + 2 :]
                        reply = self._other(words)
                    if reply is None:  # hang up
                        conn.sendall(b"".join(out))
                        return
                    out.append(reply)
                if out:
                    conn.sendall(b"".join(out))

    def _set(self, data: bytes) -> bytes | None:
        with self.lock:
            self.sets += 1
            n = self.sets
            if self.fault == "hang_up" and n > 100:
                return None
            if self.fault == "server_error":
                return b"SERVER_ERROR journal write failed\r\n"
            if self.fault == "garbage":
                return b"HELLO\r\n"
            if self.fault == "not_a_queue":
                self.items = deque([data])  # memcached: a key holds its last value
            elif not (self.fault == "loses_item" and n == 4):
                self.items.append(data)
            return b"STORED\r\n"

    def _other(self, words: list[bytes]) -> bytes | None:
        cmd = words[0]
        if cmd == b"version":
            return b"VERSION fake\r\n"
        if cmd == b"delete":
            with self.lock:
                self.items.clear()
            return b"DELETED\r\n"
        if cmd != b"get":
            return b"ERROR\r\n"
        key = words[1]
        with self.lock:
            if not self.items:
                return b"END\r\n"
            if self.fault == "silent":
                return b""
            if self.fault == "not_a_queue":
                data = self.items[0]
            elif self.fault == "lifo":
                data = self.items.pop()
            else:
                data = self.items.popleft()
        if self.fault == "wrong_value":
            data = b"#" * len(data)
        if self.fault == "wrong_key":
            key = b"other"
        if self.fault == "bad_block":
            return b"VALUE %s 0 %d\r\n%sXXEND\r\n" % (key, len(data), data)
        return b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(data), data)


@pytest.fixture
def fake():
    made: list[FakeQueue] = []

    def make(fault: str = "") -> FakeQueue:
        made.append(FakeQueue(fault))
        return made[-1]

    yield make
    for f in made:
        f.close()


def bench_fake(target: FakeQueue, *args: str) -> subprocess.CompletedProcess:
    return run_bench("--port", str(target.port), *SHORT, "--timeout", "2", *args)


@pytest.mark.parametrize("name", ["set", "get", "pingpong"])
def test_an_honest_queue_passes(fake, name: str) -> None:
    """The fake is a correct queue when told no fault: the failures below are the faults'."""
    proc = bench_fake(fake(), "--scenario", name, "--size", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize(
    ("fault", "args", "message"),
    [
        ("wrong_value", ("--scenario", "get"), "wrong value"),
        ("wrong_value", ("--scenario", "pingpong"), "wrong value"),
        ("wrong_key", ("--scenario", "get"), "wrong reply to get"),
        ("lifo", ("--scenario", "get", "--size", "2"), "out of order"),
        ("loses_item", ("--scenario", "get", "--size", "2"), "lost items"),
        ("loses_item", ("--scenario", "pingpong"), "lost item"),
        ("not_a_queue", ("--scenario", "get"), "returned twice"),
        ("server_error", ("--scenario", "set"), "error reply to set: b'SERVER_ERROR"),
        ("garbage", ("--scenario", "set"), "unexpected reply to set: b'HELLO'"),
        ("bad_block", ("--scenario", "get"), "not followed by CRLF"),
        ("hang_up", ("--scenario", "set"), "closed the connection"),
        ("silent", ("--scenario", "get"), "no reply"),
    ],
)
def test_a_wrong_reply_fails_the_run(fake, fault: str, args: tuple[str, ...], message: str) -> None:
    proc = bench_fake(fake(fault), *args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "erq bench: FAILED:" in proc.stderr
    assert message in proc.stderr


def test_a_failure_in_json_mode_is_still_one_json_object(fake) -> None:
    proc = bench_fake(fake("wrong_value"), "--scenario", "set", "--scenario", "get", "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["ok"] is False
    assert "wrong value" in out["error"]
    assert [s["scenario"] for s in out["scenarios"]] == ["set"]  # what finished before


def test_no_server_listening_fails_with_a_message() -> None:
    proc = run_bench("--port", str(free_port()), *SHORT)
    assert proc.returncode == 1
    assert "cannot connect" in proc.stderr


@pytest.mark.parametrize("args", [("--seconds", "0"), ("--conns", "-1"), ("--scenario", "x")])
def test_bad_arguments_exit_2(args: tuple[str, ...]) -> None:
    assert run_bench("--port", "1", *args).returncode == 2


# ---- the reply reader --------------------------------------------------------------------------
STREAM = (
    b"STORED\r\nVALUE q 0 6\r\nab\r\ncd\r\nEND\r\nEND\r\n"
    b"VALUE q 7 0\r\n\r\nEND\r\nSERVER_ERROR disk full\r\n"
)
REPLIES = [
    (b"STORED", []),
    (b"END", [(b"q", 0, b"ab\r\ncd")]),
    (b"END", []),
    (b"END", [(b"q", 7, b"")]),
    (b"SERVER_ERROR disk full", []),
]


def test_reply_reader_same_replies_however_chunked() -> None:
    assert ReplyReader().feed(STREAM) == REPLIES
    reader = ReplyReader()
    one_by_one = [r for i in range(len(STREAM)) for r in reader.feed(STREAM[i : i + 1])]
    assert one_by_one == REPLIES
    assert not reader.partial


def test_reply_reader_rejects_a_value_without_crlf() -> None:
    with pytest.raises(BenchError, match="not followed by CRLF"):
        ReplyReader().feed(b"VALUE q 0 2\r\nabcEND\r\n")
    with pytest.raises(BenchError, match="bad VALUE line"):
        ReplyReader().feed(b"VALUE q 0 -1\r\n")


def test_values_name_their_counter() -> None:
    v = Values(10)
    assert v.make(42) == b"42:......."
    assert v.counter(v.make(123456)) == 123456
    with pytest.raises(BenchError, match="wrong value"):
        v.counter(b"42:......x")
    assert Values(2).capacity == 10


def test_the_server_command_line_does_not_load_the_bench():
    # The server process must not carry the load generator's modules (its RSS is a bar).
    code = (
        "import sys; from erq import cli; cli.build_parser().parse_args(['serve']); "
        "print(sorted(m for m in sys.modules if m in ('erq.bench', 'erq.loadgen')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    listed = subprocess.run(
        [sys.executable, "-m", "erq", "--help"], capture_output=True, text=True, check=True
    )
    assert "bench" in listed.stdout
