"""The processes an end-to-end benchmark run starts, and their cleanup: the servers (erq's
builds and memcached, each started fresh, pinned, on a free port), qload and its runs, and the
facts about the machine that RESULTS.md states. Used by ``run_e2e.py``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from localserver import free_port
from scenarios import MEMCACHED, Memory, Run

REPO = Path(__file__).resolve().parent.parent
DEFAULT_QLOAD = REPO.parent / "shared" / "tools" / "qload" / "qload"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A server or tool that could not be run; the message says what to do about it."""


# ---------------------------------------------------------------------------------------------
# Cleanup: every process and directory this run creates is registered here and released on any
# exit (normal, exception, SIGTERM, Ctrl-C).

_PROCS: list[subprocess.Popen] = []
_DIRS: list[str] = []


def cleanup() -> None:
    for proc in _PROCS:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _PROCS.clear()
    for path in _DIRS:
        shutil.rmtree(path, ignore_errors=True)
    _DIRS.clear()


def on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def tempdir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=f"erq-bench-{prefix}-")
    _DIRS.append(path)
    return path


def drop_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path in _DIRS:
        _DIRS.remove(path)


# ---------------------------------------------------------------------------------------------
# Machine


@dataclass(frozen=True)
class Pinning:
    server_cpu: int | None
    client_cpu: int | None
    how: str

    @staticmethod
    def choose() -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if shutil.which("taskset") is None:
            return Pinning(None, None, "not pinned (taskset not found)")
        if len(cpus) < 2:
            return Pinning(None, None, f"not pinned (only {len(cpus)} CPU available)")
        return Pinning(cpus[0], cpus[1], f"server on CPU {cpus[0]}, qload on CPU {cpus[1]}")

    def prefix(self, cpu: int | None) -> list[str]:
        return [] if cpu is None else ["taskset", "-c", str(cpu)]


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (the servers started later inherit it); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))  # root may raise hard
            return wanted
        except (ValueError, OSError):
            wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line(cmd: list[str]) -> str:
    """First line of a command's output, or ``unknown``."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_revision() -> str:
    rev = command_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    diff = subprocess.run(
        ["git", "-C", str(REPO), "diff-index", "--quiet", "HEAD", "--"], capture_output=True
    )
    return rev + (" + uncommitted changes" if diff.returncode else "")


# ---------------------------------------------------------------------------------------------
# qload: the binary, or built from its source into a temporary directory (the shared
# directory is read-only).


def find_qload(option: str | None) -> tuple[Path, str]:
    given = Path(option) if option else DEFAULT_QLOAD
    for path in [given / "qload", given] if given.is_dir() else [given]:
        if path.is_file() and os.access(path, os.X_OK):
            return path.resolve(), str(path.resolve())
    source = given if given.is_dir() else given.parent
    if not (source / "qload.c").is_file():
        raise BenchError(
            f"qload not found at {given} and no qload.c beside it: pass --qload PATH "
            "(the binary, or the directory holding qload.c)"
        )
    if shutil.which("make") is None:
        raise BenchError(f"qload must be built from {source}, but make is not installed")
    build = Path(tempdir("qload"))
    for name in ("qload.c", "Makefile"):
        shutil.copy(source / name, build / name)
    proc = subprocess.run(["make", "-C", str(build)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not (build / "qload").is_file():
        raise BenchError(f"building qload failed:\n{proc.stdout}{proc.stderr}")
    return build / "qload", f"built from {source} with make (temporary copy)"


# ---------------------------------------------------------------------------------------------
# Servers


def ensure_memcached() -> str | None:
    """Path of memcached, installing the Debian package when running as root."""
    if shutil.which("memcached") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return shutil.which("memcached")
    print("memcached not found: apt-get install -y memcached", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "memcached"]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        subprocess.run(install, env=env, capture_output=True, timeout=900)
    return shutil.which("memcached")


def read_until_end(sock: socket.socket, what: str) -> bytes:
    """The replies on ``sock`` up to and including the ``END`` line that closes them."""
    buf = b""
    while not buf.endswith(b"END\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError(f"connection closed during {what}")
        buf += chunk
    return buf


def read_stats(sock: socket.socket) -> dict[str, str]:
    """Send ``stats`` on an open connection and parse the reply."""
    sock.sendall(b"stats\r\n")
    buf = read_until_end(sock, "stats")
    stats = {}
    for line in buf.decode("utf-8", "replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "STAT":
            stats[parts[1]] = parts[2]
    return stats


@dataclass
class Server:
    """One running server process: an erq build or memcached."""

    name: str  # "cython" | "python" | "memcached"
    proc: subprocess.Popen
    port: int
    scratch: str  # log and config of this start; removed by close()
    ready_s: float = 0.0

    def cpu_ticks(self) -> int | None:
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime (stat fields 14 and 15)

    def memory(self) -> Memory:
        values = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024
        except OSError:
            pass
        return Memory(
            values.get("VmRSS"), values.get("RssAnon"), values.get("RssFile"), values.get("VmHWM")
        )

    def stats(self) -> dict[str, str]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            return read_stats(sock)

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = Path(self.scratch, "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self, *, crash: bool = False, timeout: float = 60.0) -> None:
        """Stop (SIGTERM, or SIGKILL for a crash), remove the scratch directory, and let the
        disk settle (``sync``): the next run must not pay for this one's writeback and the
        freeing of its files, which on a ``discard`` mount is work for the device as well.

        memcached keeps no state and its SIGTERM path takes a second: it is always killed.
        """
        if self.proc.poll() is None:
            crash = crash or self.name == MEMCACHED
            self.proc.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc in _PROCS:
            _PROCS.remove(self.proc)
        drop_dir(self.scratch)
        if hasattr(os, "sync"):
            os.sync()


def wait_ready(proc: subprocess.Popen, port: int, started: float, timeout: float) -> float:
    """Seconds from ``started`` until the port accepts and answers ``version``."""
    while True:
        if proc.poll() is not None:
            raise BenchError(f"server exited with status {proc.returncode} during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(b"version\r\n")
                if sock.recv(256).startswith(b"VERSION"):
                    return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > timeout:
            raise BenchError(f"no answer to `version` on port {port} within {timeout:.0f} s")
        time.sleep(0.002)


@dataclass
class Launcher:
    """Starts every server the same way: pinned, loopback, free port, fresh directories."""

    pinning: Pinning
    memcached: str | None
    journal: bool = True

    def erq_config(self, queue: str = "", server: str = "") -> str:
        if not self.journal:
            queue += "journal = false\n"
        return (f"[server]\n{server}" if server else "") + (
            f"[queues.default]\n{queue}" if queue else ""
        )

    def start(
        self,
        name: str,
        *,
        config: str = "",
        data_dir: str | None = None,
        cpu: int | None = None,
        timeout: float = 60.0,
    ) -> Server:
        port, scratch = free_port(), tempdir(name)
        env = dict(os.environ)
        if name == MEMCACHED:
            if self.memcached is None:
                raise BenchError("memcached is not installed")
            argv = [self.memcached, "-t", "1", "-U", "0", "-l", "127.0.0.1", "-p", str(port)]
            argv += ["-m", "2048"] + (["-u", "root"] if os.geteuid() == 0 else [])
        else:
            argv = [sys.executable, "-m", "erq", "serve", "--port", str(port), "--admin-port", "0"]
            argv += ["--data-dir", data_dir or os.path.join(scratch, "data")]
            argv += ["--log-level", "WARNING"]
            text = config or self.erq_config()
            if text:
                Path(scratch, "erq.toml").write_text(text)
                argv += ["--config", os.path.join(scratch, "erq.toml")]
            env.pop("ERQ_NO_EXTENSIONS", None)
            if name == "python":
                env["ERQ_NO_EXTENSIONS"] = "1"
        cpu = self.pinning.server_cpu if cpu is None else cpu
        with open(os.path.join(scratch, "server.log"), "wb") as log:
            started = time.monotonic()
            proc = subprocess.Popen(
                self.pinning.prefix(cpu) + argv,
                cwd=str(REPO),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _PROCS.append(proc)
        server = Server(name, proc, port, scratch)
        try:
            server.ready_s = wait_ready(proc, port, started, timeout)
            impl = server.stats().get("implementation") if name != MEMCACHED else None
            if name != MEMCACHED and impl != name:
                hint = " (extensions not built? `python setup.py build_ext --inplace`)"
                raise BenchError(
                    f"started as the {name} build but reports `STAT implementation {impl}`"
                    + (hint if name == "cython" else "")
                )
        except (BenchError, OSError) as exc:
            tail = server.log_tail()
            server.close(crash=True)
            raise BenchError(f"{name}: {exc}\n{tail}") from None
        return server


# ---------------------------------------------------------------------------------------------
# qload runs


@dataclass
class QLoad:
    path: Path
    pinning: Pinning
    commands: list[str] = field(default_factory=list)

    def run(
        self,
        server: Server,
        args: tuple[str, ...],
        *,
        max_seconds: float,
        cpu: int | None = None,
        queue: str = "q",
    ) -> Run:
        """One qload run; server CPU% is over the interval qload measured, RSS is read right
        after."""
        cpu = self.pinning.client_cpu if cpu is None else cpu
        argv = [str(self.path), "--port", str(server.port), "--queue", queue, *args]
        argv += ["--max-seconds", f"{max_seconds:g}"]
        if server.name == MEMCACHED:
            argv.append("--no-verify")  # not a queue: lost/duplicates would mean nothing
        cmd = self.pinning.prefix(cpu) + argv
        self.commands.append(f"{server.name}: {shlex.join(cmd)}")
        run = Run()
        ticks, began = server.cpu_ticks(), time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max_seconds + 60)
        except subprocess.TimeoutExpired:
            run.failure = f"qload still running {max_seconds + 60:.0f} s after its start"
            return run
        wall = time.monotonic() - began
        if server.proc.poll() is not None:
            run.failure = f"server exited ({server.proc.returncode}): {server.log_tail(4)}"
            return run
        after = server.cpu_ticks()
        run.rss_mib = server.memory().rss
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            run.failure = f"qload exit {proc.returncode}: {proc.stderr.strip()[:300]}"
        else:
            run.data = json.loads(lines[-1])
        if ticks is not None and after is not None:
            # Over the interval qload measured, not its whole life: at the end of scenario 5
            # its consumers wait out their t=1000 on an empty queue, a second of wall time in
            # which the server has nothing to do (it read 73% for a server that was busy 98%
            # of the run). What the server spends outside the interval (accepting the
            # connections, answering those waits) is a few milliseconds.
            interval = run.data.get("elapsed_s") if run.data else None
            run.cpu_pct = 100.0 * (after - ticks) / CLK_TCK / (interval or wall)
        return run
