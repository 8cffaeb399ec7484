"""``erq bench``: how fast erq is on this machine, and proof that it works end to end, for a user
who has only ``pip install erq`` (no repository, no C load generator).

It starts its own server (or drives a running one), runs the set, get and pingpong scenarios
with the load generator of :mod:`erq.loadgen`, and reports ops/s, latency, and the server's CPU
and RSS. Every reply is checked: the run fails (exit 1) on any wrong one.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from . import datadir
from .loadgen import (
    BenchError,
    GetLoad,
    Load,
    PingPongLoad,
    SetLoad,
    Timing,
    Values,
    command,
    delete_queue,
    drive,
    read_stats,
)

__all__ = ["BenchError", "BenchOptions", "Bench", "LocalServer", "ScenarioResult", "main"]

SCENARIOS = ("set", "get", "pingpong")

DESCRIPTION = """\
Measure a memcache-protocol queue server and check every reply on the way.

With no --host/--port, erq bench starts its own erq server (embedded defaults: journal on, fsync
period default) on a free 127.0.0.1 port with a temporary data directory, runs the scenarios,
stops it with SIGTERM and deletes the directory; the table then also shows the server's CPU
seconds and RSS. With --host/--port it drives a server that is already running (erq, Kestrel;
memcached for set and pingpong) and starts nothing. The bench deletes its queue before each
scenario and at the end: do not point --queue at a queue that holds anything of value.

Scenarios (default: all):
  set       --conns connections, each keeping --pipeline sets of --size bytes in flight
  get       drain a queue the bench pre-filled (to about twice what the set rate would take in
            --seconds); only gets that returned an item count. Every value is checked: the one
            the bench put, in FIFO order per connection, never twice, none lost when drained.
            It needs queue semantics (memcached's get does not remove: it fails here).
  pingpong  one connection: set, then get it back, one request at a time (round-trip latency)

Latency is per request when --pipeline is 1 (and always for pingpong), else per pipelined
batch (from writing the batch to its last reply).

A Python load generator is slower than the server on pipelined runs: those figures are a floor
(compare "bench CPU s" with "server CPU s"). The measurement to compare erq with other servers
is benchmarks/run_e2e.py in the repository, which uses a C load generator.

Exit status: 0 when every reply was right; 1 on a wrong value, an error reply, a lost
connection, a timeout, or a server of its own that did not start or stop cleanly (with a
message on stderr); 2 on bad arguments."""

# A self-started server's temporary directory: SCRATCH_PREFIX<random>, holding SCRATCH_LOCK,
# which its bench keeps locked (make_scratch).
SCRATCH_PREFIX = "erq-bench-"
SCRATCH_LOCK = "bench.lock"
PREFILL_FACTOR = 2.0  # pre-fill for twice the time the set rate would need: gets may be faster
PREFILL_MAX_ITEMS = 2_000_000
PREFILL_MAX_BYTES = 256 << 20
PREFILL_PIPELINE = 64
START_TIMEOUT = 30.0  # seconds for a self-started server to answer `version`
STOP_TIMEOUT = 30.0  # seconds for it to exit after SIGTERM


# ---- a server of our own -----------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _stop_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send the server SIGTERM when the bench dies.

    The bench stops its server itself, but a bench that is SIGKILLed cannot: without this its
    server would serve on, orphaned. (Its temporary directory is left behind, for the next
    bench to remove: see remove_stale_scratch.) None where there is no prctl: there the server
    outlives a killed bench, as any child would."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the bench died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def make_scratch() -> tuple[str, int]:
    """A new temporary directory for one bench, and the descriptor of the lock on its
    SCRATCH_LOCK, held for the bench's life: the kernel lets go of it however the bench ends,
    SIGKILL included. The lock file is locked before it takes its name, so a lock file that
    another bench can lock belongs to a bench that is gone."""
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
    lock = os.path.join(scratch, SCRATCH_LOCK)
    fd = os.open(lock + ".new", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(lock + ".new", lock)
    return scratch, fd


def remove_stale_scratch(tmp: str | None = None) -> int:
    """Remove the temporary directories that killed benches left (SIGKILL gives a bench no
    chance to): those whose SCRATCH_LOCK no process holds and whose server has let go of its
    data directory. Another bench's live directory, and one without a lock file (another
    erq's, or not a bench's at all), are left alone. Returns how many were removed."""
    tmp = tmp if tmp is not None else tempfile.gettempdir()
    try:
        entries = [e for e in os.scandir(tmp) if e.name.startswith(SCRATCH_PREFIX)]
    except OSError:
        return 0
    removed = 0
    for entry in entries:
        try:
            fd = os.open(os.path.join(entry.path, SCRATCH_LOCK), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # no lock file (or not ours to read)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its bench is running
        try:
            if not datadir.in_use(Path(entry.path, "data")):  # its server is still stopping
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        finally:
            os.close(fd)
    return removed


class LocalServer:
    """An erq server for one bench run: a subprocess on a free loopback port with a temporary
    data directory and embedded defaults; ``close`` stops it with SIGTERM and removes it all.
    What killed benches left in the temporary directory goes first."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        remove_stale_scratch()
        self.scratch, self._scratch_lock = make_scratch()
        self.log_path = os.path.join(self.scratch, "server.log")

    def start(self) -> LocalServer:
        """Start the server and wait until it answers ``version`` (BenchError if it does not)."""
        with socket.socket() as s:
            s.bind((self.host, 0))
            self.port = s.getsockname()[1]
        data_dir = os.path.join(self.scratch, "data")
        argv = [sys.executable, "-m", "erq", "serve", "--host", self.host, "--port", str(self.port)]
        argv += ["--admin-port", "0", "--data-dir", data_dir, "--log-level", "WARNING"]
        # Embedded defaults: no ERQ_CONFIG or ERQ_<key> of the caller's; the build choice stays.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ERQ_")}
        for build_choice in ("ERQ_NO_EXTENSIONS", "ERQ_NO_EPOLL"):
            if build_choice in os.environ:
                env[build_choice] = os.environ[build_choice]
        # Serve the very erq that runs this bench, wherever it was imported from.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.scratch,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches the bench, which stops it
                preexec_fn=_stop_with_parent(os.getpid()),
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"the erq server exited with status {self.proc.returncode} while starting"
                    + self.log_tail()
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                    sock.sendall(b"version\r\n")
                    if sock.recv(256).startswith(b"VERSION"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the erq server did not answer within {START_TIMEOUT:g} s" + self.log_tail()
                )
            time.sleep(0.01)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds so far, from /proc (None where there is no /proc)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return ("\nserver log (last lines):\n" + "\n".join(text[-lines:])) if text else ""

    def close(self) -> None:
        """SIGTERM, then wait; BenchError when it does not exit cleanly. Always cleans up."""
        proc, self.proc = self.proc, None
        problem = ""
        try:
            if proc is not None:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                        problem = f"did not exit within {STOP_TIMEOUT:g} s of SIGTERM (killed)"
                if not problem and proc.returncode != 0:
                    problem = f"exited with status {proc.returncode} on SIGTERM"
                if problem:
                    raise BenchError(f"the erq server {problem}{self.log_tail()}")
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
            if self._scratch_lock >= 0:
                os.close(self._scratch_lock)
                self._scratch_lock = -1


# ---- scenarios ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchOptions:
    scenarios: tuple[str, ...] = SCENARIOS
    conns: int = 1
    pipeline: int = 64
    size: int = 10
    seconds: float = 3.0
    queue: str = field(default_factory=lambda: f"erq-bench-{os.getpid()}")
    timeout: float = 10.0


@dataclass
class ScenarioResult:
    """One scenario's figures (``ops``: sets stored, gets that returned an item, or requests)."""

    scenario: str
    conns: int
    pipeline: int
    ops: int
    elapsed_s: float
    ops_per_s: float
    latency_per: str  # "request" | "batch of <P>"
    p50_us: float | None
    p99_us: float | None
    client_cpu_s: float
    server_cpu_s: float | None = None
    server_rss_mib: float | None = None
    details: dict[str, object] = field(default_factory=dict)


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100) of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _result(
    name: str, conns: int, pipeline: int, ops: int, t: Timing, server_cpu: float | None
) -> ScenarioResult:
    lat = sorted(t.latencies)
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    return ScenarioResult(
        scenario=name,
        conns=conns,
        pipeline=pipeline,
        ops=ops,
        elapsed_s=round(t.elapsed, 6),
        ops_per_s=round(ops / t.elapsed, 1) if t.elapsed > 0 else 0.0,
        latency_per="request" if pipeline == 1 else f"batch of {pipeline}",
        p50_us=None if p50 is None else round(p50 * 1e6, 1),
        p99_us=None if p99 is None else round(p99 * 1e6, 1),
        client_cpu_s=round(t.client_cpu, 3),
        server_cpu_s=None if server_cpu is None else round(server_cpu, 3),
    )


class Bench:
    """Runs the chosen scenarios against one target, each on a freshly deleted queue."""

    def __init__(
        self, opts: BenchOptions, host: str, port: int, server: LocalServer | None = None
    ) -> None:
        self.opts = opts
        self.host = host
        self.port = port
        self.server = server
        self.queue = opts.queue.encode()
        self.values = Values(opts.size)
        self.set_rate: float | None = None

    def run(self, on_result: Callable[[ScenarioResult], None] | None = None) -> None:
        """Every scenario in canonical order; the queue is deleted at the end, success or not."""
        failed = True
        try:
            for name in SCENARIOS:
                if name in self.opts.scenarios:
                    delete_queue(self.host, self.port, self.queue, self.opts.timeout)
                    result = getattr(self, f"_{name}")()
                    if self.server is not None:
                        rss = self.server.rss_mib()
                        result.server_rss_mib = None if rss is None else round(rss, 1)
                    if on_result is not None:
                        on_result(result)
            failed = False
        finally:
            try:
                delete_queue(self.host, self.port, self.queue, self.opts.timeout)
            except BenchError:
                if not failed:  # else the first failure is the one to report
                    raise

    def _cpu(self) -> float | None:
        return self.server.cpu_seconds() if self.server is not None else None

    def _drive(self, load: Load, conns: int, seconds: float) -> tuple[Timing, float | None]:
        """Run ``load`` for the figures; also the server CPU seconds it took, when known."""
        before = self._cpu()
        t = drive(load, self.host, self.port, conns, seconds, self.opts.timeout)
        after = self._cpu()
        return t, None if before is None or after is None else after - before

    def _set(self) -> ScenarioResult:
        o = self.opts
        load = SetLoad(self.queue, self.values, o.pipeline)
        t, cpu = self._drive(load, o.conns, o.seconds)
        result = _result("set", o.conns, o.pipeline, load.stored, t, cpu)
        self.set_rate = result.ops_per_s
        return result

    def _prefill(self) -> int:
        """Fill the queue in counter order on one connection, deep enough for ``seconds`` of
        gets (estimated from the set rate, measured now if the set scenario did not run)."""
        o = self.opts
        pipeline = max(o.pipeline, PREFILL_PIPELINE)
        cap = min(PREFILL_MAX_ITEMS, max(1, PREFILL_MAX_BYTES // o.size), self.values.capacity)
        if cap < 1:
            raise BenchError(f"the get scenario needs --size of at least 2 (got {o.size})")
        filled = 0
        rate = self.set_rate
        if not rate:
            probe = SetLoad(self.queue, self.values, pipeline, cap)
            t = drive(probe, self.host, self.port, 1, min(o.seconds, 0.5), o.timeout)
            filled = probe.stored
            rate = filled / t.elapsed if t.elapsed > 0 else 0.0
        target = min(cap, max(filled, math.ceil(rate * o.seconds * PREFILL_FACTOR), o.conns))
        if target > filled:
            rest = SetLoad(self.queue, self.values, pipeline, target)
            rest.issued = filled
            # bounded: a server slower than its measured rate leaves a shallower queue, reported
            drive(rest, self.host, self.port, 1, PREFILL_FACTOR * o.seconds + 5.0, o.timeout)
            filled += rest.stored
        return filled

    def _get(self) -> ScenarioResult:
        o = self.opts
        filled = self._prefill()
        load = GetLoad(self.queue, self.values, o.pipeline, o.conns, filled)
        t, cpu = self._drive(load, o.conns, o.seconds)
        if load.drained and load.items != filled:
            raise BenchError(
                f"lost items: the queue ran empty after {load.items} of the {filled} values put"
            )
        result = _result("get", o.conns, o.pipeline, load.items, t, cpu)
        result.details = {"prefilled": filled, "empty": load.empty, "drained": load.drained}
        return result

    def _pingpong(self) -> ScenarioResult:
        load = PingPongLoad(self.queue, self.values)
        t, cpu = self._drive(load, 1, self.opts.seconds)
        result = _result("pingpong", 1, 1, load.sets + load.gets, t, cpu)
        result.details = {"sets": load.sets, "gets": load.gets}
        return result


# ---- output ------------------------------------------------------------------------------------
def _num(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def format_table(results: list[ScenarioResult], self_started: bool) -> str:
    """One row per scenario; server CPU and RSS only for a server the bench started."""
    head = ["scenario", "conns", "pipeline", "ops", "ops/s", "p50 us", "p99 us", "latency per"]
    head += ["bench CPU s"] + (["server CPU s", "server RSS MiB"] if self_started else [])
    rows = [head]
    for r in results:
        row = [r.scenario, str(r.conns), str(r.pipeline), f"{r.ops:,}", _num(r.ops_per_s)]
        row += [_num(r.p50_us, 1), _num(r.p99_us, 1), r.latency_per, _num(r.client_cpu_s, 2)]
        if self_started:
            row += [_num(r.server_cpu_s, 2), _num(r.server_rss_mib, 1)]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    for r in results:
        if r.scenario == "get":
            d = r.details
            how = "drained it" if d["drained"] else "stopped at the time limit"
            lines.append(f"get: pre-filled {d['prefilled']:,} items, {how}")
    if any(r.pipeline > 1 for r in results):
        lines.append(
            "note: on pipelined runs this Python load generator is slower than the server, so\n"
            "      those figures are a floor; to compare servers, use benchmarks/run_e2e.py in\n"
            "      the repository (C load generator)."
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``erq bench`` command line (erq.cli hands it the arguments after ``bench``)."""
    p = argparse.ArgumentParser(
        prog="erq bench",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``erq bench`` options (cli.py stays a dispatcher)."""
    p.add_argument("--host", help="drive this running server (default: start our own)")
    p.add_argument("--port", "-p", type=int, help="its port (default 22133 with --host)")
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        dest="scenarios",
        help="run this scenario (repeatable; default: all)",
    )
    p.add_argument("--conns", type=_positive(int), default=1, help="connections (default 1)")
    p.add_argument(
        "--pipeline", type=_positive(int), default=64, help="requests in flight (default 64)"
    )
    p.add_argument("--size", type=_positive(int), default=10, help="value bytes (default 10)")
    p.add_argument("--seconds", type=_positive(float), default=3.0, help="per scenario (default 3)")
    p.add_argument("--queue", help="queue name (default erq-bench-<pid>; deleted by the bench)")
    p.add_argument(
        "--timeout",
        type=_positive(float),
        default=10.0,
        help="fail when the server is silent this long (default 10 s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, not a table")


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not v > 0 or (kind is float and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return v

    return parse


def main(ns: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``erq bench``: 0 when every reply was right, 1 with a message on stderr otherwise."""
    out = out or sys.stdout
    err = err or sys.stderr
    opts = BenchOptions(
        scenarios=tuple(ns.scenarios or SCENARIOS),
        conns=ns.conns,
        pipeline=ns.pipeline,
        size=ns.size,
        seconds=ns.seconds,
        timeout=ns.timeout,
        **({"queue": ns.queue} if ns.queue else {}),
    )
    if not opts.queue or any(c in opts.queue for c in " /.~+") or len(opts.queue) > 250:
        print(f"erq bench: bad queue name {opts.queue!r}", file=err)
        return 2
    self_started = ns.host is None and ns.port is None
    report: dict[str, object] = {"ok": False, "target": {}, "options": asdict(opts)}
    results: list[ScenarioResult] = []
    server = LocalServer() if self_started else None
    error = ""
    previous = _interrupt_on_sigterm()
    try:
        if server is not None:
            server.start()
            host, port = server.host, server.port
        else:
            host, port = ns.host or "127.0.0.1", ns.port or 22133
        report["target"] = _describe(host, port, server, opts.timeout)
        if not ns.json:
            print(_heading(report["target"], opts), file=out, flush=True)
        Bench(opts, host, port, server).run(results.append)
    except BenchError as exc:
        error = str(exc)
        if server is not None and server.proc is not None and server.proc.poll() is not None:
            error += f" (the erq server exited with status {server.proc.returncode})"
            error += server.log_tail()
    except KeyboardInterrupt:
        error = "interrupted"
    finally:
        if server is not None:
            try:
                server.close()
            except BenchError as exc:
                error = f"{error}\n{exc}" if error else str(exc)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    report["scenarios"] = [asdict(r) for r in results]
    report["ok"] = not error
    if error:
        report["error"] = error
    if ns.json:
        print(json.dumps(report), file=out)
    elif results:
        print(format_table(results, self_started), file=out)
    if error:
        print(f"erq bench: FAILED: {error}", file=err)
        return 1
    return 0


def _interrupt_on_sigterm() -> Callable | int | None:
    """SIGTERM to the bench interrupts it like Ctrl-C, so its server is still stopped and its
    directory removed; returns the handler to restore (None outside the main thread)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _describe(host: str, port: int, server: LocalServer | None, timeout: float) -> dict:
    line, _ = command(host, port, b"version\r\n", timeout)
    if not line.startswith(b"VERSION "):
        raise BenchError(f"not a memcache-protocol server? `version` answered {line!r}")
    target: dict[str, object] = {"host": host, "port": port, "self_started": server is not None}
    target["version"] = line.decode("utf-8", "replace").removeprefix("VERSION ")
    target["implementation"] = None
    target["pid"] = server.pid if server is not None else None
    if server is not None:
        target["implementation"] = read_stats(host, port, timeout).get("implementation")
    return target


def _heading(target: dict, opts: BenchOptions) -> str:
    who = f"server {target['version']}"
    if target["implementation"]:
        who += f" ({target['implementation']})"
    if target["self_started"]:
        where = f"started by the bench on {target['host']}:{target['port']}, embedded defaults"
    else:
        where = f"at {target['host']}:{target['port']}"
    return (
        f"erq bench: {who} {where}\n"
        f"{opts.size}-byte values, {opts.seconds:g} s per scenario, queue {opts.queue}\n"
    )
