"""The server with a configuration file (PROTOCOL.md section 7): the file's [server] and
[queues.*] tables, ``ERQ_*`` variables and command-line flags over it, start-up refusal of a bad
file, ``reload`` and SIGHUP, and the shipped ``erq/example.toml``, for both implementations.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erq.open_files import DESCRIPTORS_PER_SEGMENT

from conftest import ROOT, ErqProcess, RawClient, free_port
from support import (
    DEFAULT_CONFIG,
    DELETED,
    END,
    ERROR,
    NOT_STORED,
    OK,
    RELOADED,
    STORED,
    TOO_LARGE,
    TOO_LONG,
    config,
    one,
    poll,
    queue_config,
    queue_names,
)


# ---- helpers ---------------------------------------------------------------------------------
def toml_str(path: Path) -> str:
    return json.dumps(str(path))


def answers(port: int) -> bool:
    """True when an erq server answers ``version`` on ``port``."""
    try:
        c = RawClient(port, timeout=5.0)
    except OSError:
        return False
    try:
        return c.call(b"version\r\n").startswith(b"VERSION ")
    finally:
        c.close()


def distinct_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


class BareErq(ErqProcess):
    """``erq serve`` with exactly ``args``: no --port/--data-dir/--admin-port of the fixture's,
    so the file and the environment decide. ``port`` is where the test expects it to answer.
    With ``config_flag`` False the file is named by ``ERQ_CONFIG`` only (set it in ``env``)."""

    config_flag = True

    def start(self, wait: bool = True) -> BareErq:
        env = dict(os.environ)
        for name in [k for k in env if k.startswith("ERQ_")]:
            del env[name]
        if self.impl == "py":
            env["ERQ_NO_EXTENSIONS"] = "1"
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "erq", "serve"]
        if self.config_path is not None and self.config_flag:
            cmd += ["--config", str(self.config_path)]
        cmd += self.args
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - stop() closes it
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir.parent
        )
        if wait:
            self.wait_ready()
        return self


@pytest.fixture
def bare(impl: str, tmp_path: Path):
    """Start :class:`BareErq` servers; all are killed at teardown."""
    started: list[BareErq] = []

    def make(name: str, config: str, port: int, config_flag: bool = True, **kw) -> BareErq:
        (tmp_path / name).mkdir(exist_ok=True)
        proc = BareErq(impl, tmp_path / name, config, **kw)
        proc.port = port
        proc.config_flag = config_flag
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.stop(signal.SIGKILL)


def server_file(port: int, data_dir: Path, extra: str = "") -> str:
    return f"[server]\nport = {port}\nadmin_port = 0\ndata_dir = {toml_str(data_dir)}\n{extra}\n"


# ---- the file ----------------------------------------------------------------------------------
def test_config_file_server_and_queue_tables_both_apply(erq_factory):
    config = """
[server]
max_item_size = "2KiB"
max_open_reads = 2
compat = "kestrel"

[queues.default]
max_size = 8

[queues."jobs"]
max_items = 2
max_size = "none"
"""
    proc = erq_factory(config=config)
    c = proc.client()
    assert c.set("jobs", b"j" * 2048) == STORED  # within the server's 2 KiB; jobs: no max_size
    assert c.set("jobs", b"j" * 2049) == TOO_LARGE
    assert c.set("jobs", b"second") == STORED
    assert c.set("jobs", b"third") == NOT_STORED  # max_items = 2
    assert c.set("other", b"12345678") == STORED  # the default table: max_size 8
    assert c.set("other", b"9") == NOT_STORED
    assert queue_config(c, "other") == dict(DEFAULT_CONFIG, max_size="8")
    assert queue_config(c, "jobs") == dict(DEFAULT_CONFIG, max_items="2")
    assert c.call(b"flush_all\r\n") == b"Flushed all queues.\r\n"  # compat = "kestrel"
    for data in (b"a", b"b", b"c"):
        assert c.set("w", data) == STORED
    assert c.get("w/open") == b"VALUE w 0 1\r\na\r\nEND\r\n"
    assert c.get("w/open") == b"VALUE w 0 1\r\nb\r\nEND\r\n"
    assert c.call(b"get w/open\r\n") == ERROR  # max_open_reads = 2
    assert c.is_closed()


def test_env_overrides_the_file_and_flags_override_both(bare, tmp_path):
    file_port, env_port, flag_port = distinct_ports(3)
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    text = server_file(file_port, dirs[0], 'compat = "kestrel"')

    def check(proc: BareErq, data_dir: Path, kestrel: bool, silent: list[int]) -> None:
        c = proc.client()
        assert c.set("q", b"x") == STORED
        assert (data_dir / "q").is_dir()
        reply = b"Flushed all queues.\r\n" if kestrel else OK
        assert c.call(b"flush_all\r\n") == reply
        assert not any(answers(port) for port in silent)
        assert proc.stop() == 0

    # The file alone.
    check(bare("f", text, file_port), dirs[0], kestrel=True, silent=[env_port, flag_port])
    # ERQ_* over the file (the file itself named by ERQ_CONFIG).
    env = {
        "ERQ_PORT": str(env_port),
        "ERQ_DATA_DIR": str(dirs[1]),
        "ERQ_COMPAT": "erq",
        "ERQ_CONFIG": str(tmp_path / "e.toml"),
    }
    proc = bare("e", text, env_port, config_flag=False, env=env)
    check(proc, dirs[1], kestrel=False, silent=[file_port, flag_port])
    # Flags over both.
    args = ["--port", str(flag_port), "--data-dir", str(dirs[2]), "--compat", "kestrel"]
    proc = bare("a", text, flag_port, env=env, args=args)
    check(proc, dirs[2], kestrel=True, silent=[file_port, env_port])


BAD_FILES = {
    "unknown server key": ("[server]\nadmin_port = 0\nmax_lines = 70000\n", "max_lines", 3),
    "wrong type": ('[queues."jobs"]\nmax_items = "lots"\n', "max_items", 2),
    "negative size": ("[queues.default]\nmax_items = 5\n\nmax_size = -1\n", "max_size", 4),
    "unknown queue option": (
        '# jobs\n[queues."jobs"]\nmax_items = 5\nretries = 3\n',
        "retries",
        4,
    ),
    "boolean as a duration": ("[server]\nexpiry_sweep = true\n", "expiry_sweep", 2),
    "bad fsync": ('[queues."jobs"]\n\n\nfsync = "sometimes"\n', "fsync", 4),
    # A server that holds this much of an unfinished line for every connection: 1TiB was taken.
    "max_line too large": ('[server]\nmax_line = "1TiB"\n', "max_line", 2),
    # The address was cut at the NUL: the server listened on 127.0.0.1 and said nothing.
    "NUL in host": ('[server]\nhost = "127.0.0.1\\u0000.example"\n', "host", 2),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_config_file_stops_the_server_at_start_with_one_line_naming_key_and_line(
    erq_factory, case
):
    text, key, line = BAD_FILES[case]
    proc = erq_factory(config=text, start=False)
    proc.start(wait=False)
    code = proc.proc.wait(30)
    proc.stop()
    assert code != 0
    out = proc.read_log().strip()
    assert len(out.splitlines()) == 1, out  # one message, no traceback
    assert key in out and f"line {line}" in out and str(proc.config_path) in out, out
    assert not answers(proc.port)


def test_an_admin_port_equal_to_the_memcache_port_is_refused_before_anything_starts(erq_factory):
    """It opened the admin listener, replayed the journals, and only then failed to listen."""
    proc = erq_factory(start=False)
    proc.args = ["--admin-port", str(proc.port)]  # after the fixture's --admin-port 0: it wins
    proc.start(wait=False)
    code = proc.proc.wait(30)
    proc.stop()
    assert code == 2
    out = proc.read_log().strip()
    assert len(out.splitlines()) == 1 and "admin_port" in out and str(proc.port) in out, out
    assert not (proc.data_dir / "erq.lock").exists()


def test_bad_environment_value_stops_the_server_naming_the_variable(erq_factory):
    proc = erq_factory(env={"ERQ_MAX_OPEN_READS": "many"}, start=False)
    proc.start(wait=False)
    code = proc.proc.wait(30)
    proc.stop()
    assert code != 0
    out = proc.read_log().strip()
    assert len(out.splitlines()) == 1 and "ERQ_MAX_OPEN_READS" in out, out


def _open_files_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files line")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/PID/limits")
def test_the_open_file_limit_is_raised_to_the_hard_limit_and_a_shortfall_logged(
    erq_factory,
):
    """To the hard limit, not to what max_connections and max_queues want: a deep queue's
    journal holds descriptors per segment, which those settings do not bound."""
    import resource

    from erq import open_files

    def limits() -> None:  # in the child, before erq starts
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 4096))

    enough = erq_factory(
        config=config(server="max_connections = 1000\nmax_queues = 500"), preexec_fn=limits
    )
    assert _open_files_limit(enough.proc.pid) == 4096
    assert "open files" not in enough.read_log()
    wanted = 3000 + open_files.PER_QUEUE * 4096 + open_files.RESERVE
    # max_connections and max_queues apply on a reload: so does the check of what they want.
    enough.write_config(config(server="max_connections = 3000"))
    assert enough.client().call(b"reload\r\n") == RELOADED
    assert _open_files_limit(enough.proc.pid) == 4096
    assert (
        f"max_connections = 3000 and max_queues = 4096 want {wanted} open files, and the limit "
        "is 4096" in enough.read_log()
    )
    short = erq_factory(
        config=config(server="max_connections = 3000"), preexec_fn=limits, name="short"
    )
    assert _open_files_limit(short.proc.pid) == 4096
    assert (
        f"max_connections = 3000 and max_queues = 4096 want {wanted} open files, and the limit "
        "is 4096" in short.read_log()
    )


def test_a_queue_deeper_than_the_soft_open_file_limit_is_served_and_replayed(erq_factory):
    """A queue whose journal holds more segments than the soft limit has descriptors for
    (two each before Python 3.13): under a soft limit of 256 it stopped taking sets, then answered every get
    SERVER_ERROR (a removal needs a segment too), and no restart could replay it. The hard
    limit is what the server runs with; where even that is short, the start says so."""
    import resource

    def limits() -> None:  # in the child, before erq starts
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    # 64 KiB segments, 8 items of 8 KiB each: ~500 descriptors' worth of them. The settings
    # want about 200 files.
    queues = '[queues.default]\nmax_journal_size = "256KiB"\n'
    settings = "max_connections = 50\nmax_queues = 10"
    server = erq_factory(config=config(server=settings, queues=queues), preexec_fn=limits)
    c = server.client()
    items = [b"%05d" % i + b"x" * 8187 for i in range(8 * 500 // DESCRIPTORS_PER_SEGMENT)]
    for item in items:
        assert c.set("deep", item) == STORED
    segments = len(list((server.data_dir / "deep").glob("*.seg")))
    assert segments * DESCRIPTORS_PER_SEGMENT > 400, segments
    server.stop(signal.SIGKILL)
    assert "Too many open files" not in server.read_log()
    # A hard limit short of the segments stops the start, and the log says which limit.
    server.preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    server.start(wait=False)
    assert server.proc.wait(60) == 1
    assert "raise the hard limit, ulimit -Hn" in server.read_log()
    server.stop()
    server.preexec_fn = limits
    server.start()
    c = server.client()
    for item in items:
        assert c.get("deep") == b"VALUE deep 0 8192\r\n" + item + b"\r\nEND\r\n"
    assert c.get("deep") == b"END\r\n"


@pytest.mark.parametrize("fsync", ["always", "100ms"])
def test_connections_may_not_take_the_descriptors_the_queues_journals_need(erq_factory, fsync):
    """Under an open-file limit of 512 with 50 queues, 480 clients: those whose descriptor
    falls within RESERVE of the limit (erq.open_files) are refused as past max_connections,
    and every write is still made durable (they took the descriptors the syncs needed: with
    fsync = "always" half the sets were answered SERVER_ERROR)."""
    import resource

    from erq import open_files

    def limits() -> None:  # in the child, before erq starts
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    memory_only = "".join(f'[queues."m{i}"]\njournal = false\n' for i in range(300))
    queues = f'[queues.default]\nfsync = "{fsync}"\n{memory_only}'
    server = erq_factory(config=config(queues=queues), preexec_fn=limits)
    writer = server.client()
    names = [f"q{i}" for i in range(50)]
    for name in names:
        assert writer.set(name, b"first") == STORED
    for i in range(300):  # memory-only queues hold no descriptor: they take no connection's
        assert writer.set(f"m{i}", b"kept in memory") == STORED
    clients, refused = [], 0
    for _ in range(480):
        c = server.client()
        c.send(b"version\r\n")
        line = c.line()
        if line == b"SERVER_ERROR too many open connections\r\n":
            refused += 1
            c.close()
        else:
            assert line.startswith(b"VERSION "), line
            clients.append(c)
    # Those served: the descriptors below the reserve that the queues left.
    assert 100 < len(clients) < 512 - open_files.RESERVE - 50
    assert refused == 480 - len(clients)
    for _ in range(5):
        for name in names:
            assert writer.set(name, b"more") == STORED
    time.sleep(0.3)  # a periodic sync or more
    assert "failed" not in server.read_log(), server.read_log()
    # The count is the refused client's descriptor number and more (every one below it is
    # in use), at or past the reserve: not the limit less the reserve (it said 0 under 128).
    counts = re.findall(r"at least (\d+) of the 512 open files allowed", server.read_log())
    assert counts and all(int(n) > 512 - open_files.RESERVE for n in counts), counts
    for c in clients:
        c.close()


def test_a_few_clients_are_let_in_when_the_journals_hold_the_reserve(erq_factory):
    """The first MIN_CONNECTIONS clients are let in even when the queues' journals hold
    descriptors into the reserve: a server with many queues can still be reached, to
    delete some."""
    import resource

    from erq import open_files

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))

    server = erq_factory(preexec_fn=limits)
    writer = server.client()
    for i in range(180 // DESCRIPTORS_PER_SEGMENT):  # a segment each: past 300 - RESERVE
        assert writer.set(f"q{i}", b"x") == STORED
    clients = [server.client() for _ in range(open_files.MIN_CONNECTIONS - 1)]
    for c in clients:
        assert c.call(b"version\r\n").startswith(b"VERSION ")
    # Past them, one is refused as soon as its descriptor falls in the reserve: at once, or
    # after a few that take numbers below it which the journals' passing descriptors (a
    # sync's copies, a new queue's directory opened to be synced) left free.
    for _ in range(100):
        late = server.client()
        reply = late.call(b"version\r\n")
        if not reply.startswith(b"VERSION "):
            break
        clients.append(late)
    assert reply == b"SERVER_ERROR too many open connections\r\n"
    assert clients[0].call(b"delete q0\r\n") == DELETED
    for c in [writer, *clients]:
        c.close()


def test_a_queue_at_the_open_file_limit_refuses_items_and_still_drains(erq_factory):
    """Under a hard limit of 256, a queue's segments fill the descriptors: its sets are
    refused SERVER_ERROR short of the limit, and its gets, whose removals need segments too,
    go on into what that leaves, so the queue drains (it answered every get SERVER_ERROR, and
    only a delete, which drops its items, emptied it). A restart replays it."""
    import resource

    def limits() -> None:  # in the child, before erq starts
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    queues = '[queues.default]\nmax_journal_size = "256KiB"\n'  # 64 KiB segments
    settings = "max_connections = 50\nmax_queues = 10"
    server = erq_factory(config=config(server=settings, queues=queues), preexec_fn=limits)
    c = server.client()
    items = []
    while len(items) < 5000:
        item = b"%05d" % len(items) + b"x" * 8187
        reply = c.set("deep", item)
        if reply != STORED:
            break
        items.append(item)
    assert reply.startswith(b"SERVER_ERROR "), reply
    assert len(items) > 500, len(items)
    assert c.set("deep", b"z" * 8192) == reply  # and again: nothing was stored
    third = len(items) // 3
    for item in items[:third]:  # gets go on, live
        assert c.get("deep") == b"VALUE deep 0 8192\r\n" + item + b"\r\nEND\r\n"
    server.stop(signal.SIGKILL)
    server.start()  # replayed under the same limit, and served
    c = server.client()
    for item in items[third:]:
        assert c.get("deep") == b"VALUE deep 0 8192\r\n" + item + b"\r\nEND\r\n"
    assert c.get("deep") == b"END\r\n"
    poll(lambda: c.set("deep", b"after") == STORED, "a set once the queue drained")
    server.stop(signal.SIGKILL)
    server.start()
    assert server.client().get("deep") == b"VALUE deep 0 5\r\nafter\r\nEND\r\n"
    assert "Traceback" not in server.read_log()


def test_new_queues_may_not_take_the_descriptors_the_other_journals_need(erq_factory):
    """Queues made one after another under an open-file limit of 300: past what the limit
    leaves (erq.open_files), a new queue is refused with SERVER_ERROR before its journal
    takes the descriptors the others' syncs need, and every write to those is made durable
    (fsync = "always": each reply waits for its sync). Memory-only queues hold none and are
    still made."""
    import resource

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))

    queues = '[queues.default]\nfsync = "always"\n[queues."volatile"]\njournal = false\n'
    server = erq_factory(config=config(queues=queues), preexec_fn=limits)
    c = server.client()
    made = 0
    while (reply := c.set(f"q{made}", b"x")) == STORED:
        made += 1
    assert reply == b"SERVER_ERROR too many queues for the open-file limit (ulimit -n)\r\n"
    assert 100 < made * DESCRIPTORS_PER_SEGMENT < 300, made  # descriptors: below the limit
    for i in range(made):  # each one's sync still finds its descriptors
        assert c.set(f"q{i}", b"more") == STORED
    assert c.set("volatile", b"kept in memory") == STORED
    assert "failed" not in server.read_log(), server.read_log()
    assert c.call(b"delete q0\r\n") == DELETED
    c.close()


def test_the_log_names_the_data_directory_the_file_and_why_the_server_stopped(erq_factory):
    with_file = erq_factory(config=config(server="max_open_reads = 7"))
    assert with_file.client().call(b"reload\r\n") == RELOADED
    with_file.stop()
    log = with_file.read_log()
    data_dir = with_file.data_dir.resolve()
    assert f"data directory {data_dir}, configuration {with_file.config_path}" in log
    assert f"configuration reloaded from {with_file.config_path}" in log
    assert "shutting down (SIGTERM)" in log
    bare = erq_factory(name="bare")
    assert bare.client().call(b"reload\r\n") == RELOADED
    c = bare.client()
    c.send(b"shutdown\r\n")
    assert bare.proc.wait(30) == 0
    log = bare.read_log()
    assert "configuration embedded defaults (no file)" in log
    assert "configuration reloaded (no file" in log and "from None" not in log
    assert "shutting down (the shutdown command)" in log


# ---- reload ------------------------------------------------------------------------------------
def test_reload_and_sighup_apply_new_queue_settings_live_and_refuse_a_bad_file(erq_factory):
    proc = erq_factory(config='[queues."q"]\nmax_items = 5\n')
    c = proc.client()
    assert c.get("q+c") == END  # a fanout child: it follows its parent's table
    for _ in range(3):
        assert c.set("q", b"x") == STORED
        assert c.set("other", b"y") == STORED
    assert queue_config(c, "q")["max_items"] == "5"
    assert queue_config(c, "q+c")["max_items"] == "5"
    # The reload command: existing queues ("q" own table, "other" the default) and new ones.
    proc.write_config('[queues.default]\nmax_items = 3\n[queues."q"]\nmax_items = 3\n')
    assert c.call(b"reload\r\n") == RELOADED
    assert c.set("q", b"x") == NOT_STORED
    assert c.set("other", b"y") == NOT_STORED
    assert [c.set("new", b"n") for _ in range(4)] == [STORED] * 3 + [NOT_STORED]
    assert [queue_config(c, q)["max_items"] for q in ("q", "other", "new")] == ["3", "3", "3"]
    assert c.set("q+c", b"direct") == NOT_STORED  # 3 copies, and it inherits q's new limit
    # SIGHUP does the same.
    proc.write_config('[queues.default]\nmax_items = 3\n[queues."q"]\nmax_items = 4\n')
    proc.proc.send_signal(signal.SIGHUP)
    poll(lambda: queue_config(c, "q")["max_items"] == "4", "SIGHUP to reload")
    assert c.set("q", b"x") == STORED
    assert c.set("q", b"x") == NOT_STORED
    assert queue_config(c, "q+c")["max_items"] == "4"
    # A bad file is refused with a message naming the key and its line; nothing changes.
    proc.write_config('[queues."q"]\nmax_items = 10\nmax_itemz = 2\n')
    reply = c.call(b"reload\r\n")
    assert re.fullmatch(rb"(ERROR|CLIENT_ERROR|SERVER_ERROR) .*\r\n", reply), reply
    assert b"max_itemz" in reply and b"line 3" in reply, reply
    assert c.call(b"version\r\n").startswith(b"VERSION ")  # the connection stays open
    assert queue_config(c, "q")["max_items"] == "4"
    assert c.set("q", b"x") == NOT_STORED  # still 4, not 10
    assert c.set("other", b"y") == NOT_STORED  # the default is still 3, not unlimited
    log_mentions = proc.read_log().count("max_itemz")
    assert log_mentions >= 1
    # A bad file at SIGHUP: logged, the server keeps running with the same settings.
    proc.proc.send_signal(signal.SIGHUP)
    poll(lambda: proc.read_log().count("max_itemz") > log_mentions, "SIGHUP's refusal in the log")
    assert proc.proc.poll() is None
    assert queue_config(c, "q")["max_items"] == "4" and queue_config(c, "new")["max_items"] == "3"
    # A good file again applies again.
    proc.write_config('[queues."q"]\nmax_items = 10\n')
    assert c.call(b"reload\r\n") == RELOADED
    assert c.set("q", b"x") == STORED and c.set("other", b"y") == STORED


def test_a_reload_of_a_file_with_a_number_past_4300_digits_is_refused_and_answered(erq_factory):
    """int()'s ValueError escaped the reload: the connection was dropped, nothing answered."""
    proc = erq_factory(config='[queues."q"]\nmax_items = 1\n')
    c = proc.client()
    assert c.set("q", b"x") == STORED
    proc.write_config(f'[queues."q"]\nmax_items = 2\nmax_size = "{"9" * 5000}"\n')
    reply = c.call(b"reload\r\n")
    assert reply.startswith(b"SERVER_ERROR reload refused: ") and b"max_size" in reply, reply
    proc.write_config(f'[queues."q"]\nmax_items = {"9" * 5000}\n')
    reply = c.call(b"reload\r\n")
    assert reply.startswith(b"SERVER_ERROR reload refused: ") and b"line 2" in reply, reply
    assert queue_config(c, "q")["max_items"] == "1"
    assert "Traceback" not in proc.read_log()


def test_a_reload_of_a_file_nested_too_deeply_is_refused_and_answered(erq_factory):
    """tomllib's RecursionError escaped the reload: the connection was dropped unanswered."""
    proc = erq_factory(config="")
    c = proc.client()
    proc.write_config("[server]\nhost = " + "[" * 1000 + "]" * 1000 + "\n")
    reply = c.call(b"reload\r\n")
    assert reply.startswith(b"SERVER_ERROR reload refused: ") and b"nested" in reply, reply
    assert c.call(b"version\r\n").startswith(b"VERSION ")
    assert "Traceback" not in proc.read_log()


def test_reloads_sent_by_clients_are_logged_once_per_reason_per_10_seconds(erq_factory):
    """Any client may send reload: a flood of them (a broken file, or one that flips journal
    for every queue) must not write a line per reload, or a line per queue per reload."""
    proc = erq_factory(config="[queues.default]\njournal = false\n")
    c = proc.client()
    for n in range(50):
        assert c.set(f"q{n}", b"x") == STORED
    proc.write_config("[queues.default]\njournal = true\n")
    c.send(b"reload\r\n" * 300)
    for _ in range(300):
        assert c.line() == RELOADED
    log = proc.read_log()
    assert log.count("configuration reloaded from") == 1, log[-2000:]
    assert log.count("journal changed for 50 queue(s)") == 1 and "and 40 more" in log
    proc.write_config("[server]\nmax_itemz = 1\n")
    c.send(b"reload\r\n" * 300)
    for _ in range(300):
        assert c.line().startswith(b"SERVER_ERROR reload refused: ")
    assert proc.read_log().count("reload refused") == 1


def test_a_queue_keeps_its_journal_setting_until_a_restart_and_says_so(erq_factory):
    """``journal`` is fixed when a queue is made: a reload that flips it applies to queues
    made afterwards, and to the others at the next start; dump_config shows what runs."""
    proc = erq_factory(config="[queues.default]\njournal = false\n")
    c = proc.client()
    assert c.set("mem", b"m1") == STORED
    proc.write_config("[queues.default]\njournal = true\n")
    assert c.call(b"reload\r\n") == RELOADED
    assert queue_config(c, "mem")["journal"] == "false"
    assert (
        "journal changed for 1 queue(s); each keeps its setting until the next start: "
        "mem (journal = false)"
    ) in proc.read_log()
    assert c.set("mem", b"m2") == STORED  # still memory only
    assert c.set("new", b"n1") == STORED  # made after the reload: journaled
    assert queue_config(c, "new")["journal"] == "true"
    c.close()
    proc.restart()
    c = proc.client()
    assert c.get("new") == one("new", b"n1")
    assert c.get("mem") == END  # m1 and m2 were memory only
    assert c.set("mem", b"j1") == STORED  # journaled now
    # Turned off at a restart, a journal's items are not read, and the log says so.
    proc.write_config("[queues.default]\njournal = false\n")
    c.close()
    proc.restart()
    c = proc.client()
    assert "queue mem: journal = false, so the journal in" in proc.read_log()
    assert c.get("mem") == END
    proc.write_config("[queues.default]\njournal = true\n")
    c.close()
    proc.restart()
    assert proc.client().get("mem") == one("mem", b"j1")


def test_reload_applies_max_item_size_and_max_line_to_open_connections(erq_factory):
    """A pooled client's connection may live as long as the server: a reload that only reached
    new connections would leave it on the old limits indefinitely."""
    proc = erq_factory(config='[server]\nmax_item_size = "2KiB"\n')
    c, pending = proc.client(), proc.client()
    assert c.set("q", b"x" * 4096) == TOO_LARGE
    # A set whose line was accepted under the old limits finishes under them.
    pending.send(b"set q 0 0 1500\r\n" + b"p" * 100)
    proc.write_config('[server]\nmax_item_size = "8KiB"\nmax_line = 1024\n')
    assert c.call(b"reload\r\n") == RELOADED
    assert c.set("q", b"x" * 4096) == STORED  # the same connection, the new limit
    pending.send(b"p" * 1400 + b"\r\n")
    assert pending.line() == STORED
    proc.write_config("[server]\nmax_item_size = 1000\nmax_line = 1024\n")
    assert c.call(b"reload\r\n") == RELOADED
    assert c.set("q", b"y" * 1001) == TOO_LARGE
    assert pending.set("q", b"y" * 1000) == STORED
    # max_line: a longer request line now closes, as at start-up.
    assert c.call(b"get q/t=1" + b"0" * 1100 + b"\r\n") == TOO_LONG
    assert c.is_closed()
    assert [pending.get("q") for _ in range(3)] == [
        b"VALUE q 0 4096\r\n" + b"x" * 4096 + b"\r\nEND\r\n",
        b"VALUE q 0 1500\r\n" + b"p" * 1500 + b"\r\nEND\r\n",
        b"VALUE q 0 1000\r\n" + b"y" * 1000 + b"\r\nEND\r\n",
    ]


def test_reload_reports_host_port_and_data_dir_changes_as_needing_a_restart(bare, tmp_path):
    port, other_port = distinct_ports(2)
    data_dir, other_dir = tmp_path / "d", tmp_path / "d2"
    proc = bare("r", server_file(port, data_dir), port)
    c = proc.client()
    assert c.set("q", b"x") == STORED
    changed = server_file(other_port, other_dir, 'host = "127.0.0.2"')
    proc.write_config(changed + '[queues."q"]\nmax_items = 1\n')
    assert c.call(b"reload\r\n") == RELOADED
    log = proc.read_log()
    warning = [line for line in log.splitlines() if "restart" in line]
    assert warning, log
    assert all(key in " ".join(warning) for key in ("host", "port", "data_dir")), warning
    # The rest of the file applied; the listener and the data directory did not move.
    assert c.set("q", b"y") == NOT_STORED
    assert answers(port) and not answers(other_port)
    assert c.set("r", b"z") == STORED
    assert (data_dir / "r").is_dir() and not other_dir.exists()


def test_example_config_starts_a_server_with_the_default_settings(erq_factory):
    text = (ROOT / "erq" / "example.toml").read_text()
    proc = erq_factory(config=text)  # the fixture's --port/--data-dir/--admin-port win
    c = proc.client()
    assert c.set("jobs", b"x") == STORED
    assert queue_config(c, "jobs") == DEFAULT_CONFIG
    assert c.get("jobs") == b"VALUE jobs 0 1\r\nx\r\nEND\r\n"
    assert c.call(b"flush_all\r\n") == OK  # compat = "erq"
    assert c.call(b"reload\r\n") == RELOADED
    assert proc.stop() == 0
    noise = [
        line
        for line in proc.read_log().splitlines()
        if (" WARNING " in line or " ERROR " in line) and "pure-Python build" not in line
    ]
    assert noise == []


TOO_MANY_QUEUES = b"SERVER_ERROR too many queues (max_queues = 3)\r\n"


def test_max_queues_refuses_a_new_queue_and_keeps_serving_the_others(erq_factory):
    """Every set or get naming a new queue makes a directory, a segment and its descriptors:
    a client must not make them without end. At max_queues a request that would create one
    more is refused with SERVER_ERROR (the connection stays usable); the queues that exist
    work on; a deletion makes room; a reload or a restart applies a new limit, and a restart
    serves every queue on disk even past it."""
    proc = erq_factory(config="[server]\nmax_queues = 3\n")
    c = proc.client()
    assert [c.set(f"q{i}", b"x") for i in range(3)] == [STORED] * 3
    assert c.set("q3", b"x") == TOO_MANY_QUEUES
    assert c.call(b"get q4\r\n") == TOO_MANY_QUEUES
    assert c.call(b"get q4/t=5000\r\n") == TOO_MANY_QUEUES  # at once, not after 5 s
    assert c.call(b"get q4/peek\r\n") == TOO_MANY_QUEUES
    assert c.call(b"monitor q4 1\r\n") == TOO_MANY_QUEUES
    assert c.call(b"get q4/close\r\n") == END  # makes no queue, so it is not refused
    assert c.set("q0", b"y") == STORED  # the queues that exist work on
    assert c.get("q1") == b"VALUE q1 0 1\r\nx\r\nEND\r\n"
    assert queue_names(c) == {"q0", "q1", "q2"}
    assert c.call(b"delete q2\r\n") == DELETED
    assert c.set("q3", b"z") == STORED  # room again
    proc.write_config("[server]\nmax_queues = 4\n")
    assert c.call(b"reload\r\n") == RELOADED
    assert c.set("q4", b"w") == STORED
    assert c.set("q5", b"w") == TOO_MANY_QUEUES.replace(b"= 3", b"= 4")
    proc.write_config("[server]\nmax_queues = 2\n")
    proc.restart()
    c = proc.client()
    assert c.get("q4") == b"VALUE q4 0 1\r\nw\r\nEND\r\n"  # all four are served
    assert c.set("q5", b"w") == TOO_MANY_QUEUES.replace(b"= 3", b"= 2")
    assert "4 queues in the data directory, more than max_queues = 2" in proc.read_log()


def test_reload_to_a_shorter_expiry_sweep_applies_it_from_then(erq_factory):
    """An expiry_sweep cut by a reload took effect only once the old period had run out (an
    audit: 20 s -> 200 ms, the expired item swept ~19.7 s after the reload)."""
    proc = erq_factory(config='[server]\nexpiry_sweep = "60s"\n')
    c = proc.client()
    # The first sweep that expires comes about a second after the start: set the item after
    # it (a late one finds the item not yet expired), so that only a minute-away one is due.
    time.sleep(1.1)
    assert c.set("q", b"soon", exptime=1) == STORED
    time.sleep(1.2)  # expired now, and no sweep due for a minute
    assert c.stats()["queue_q_items"] == "1"
    proc.write_config('[server]\nexpiry_sweep = "200ms"\n')
    assert c.call(b"reload\r\n") == RELOADED
    stats = poll(
        lambda: (s := c.stats())["queue_q_items"] == "0" and s,
        "the expired item swept after the reload",
        timeout=5.0,
    )
    assert stats["queue_q_expired_items"] == "1"
