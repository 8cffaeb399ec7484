"""An erq server from this checkout on a free loopback port, for the benchmark scripts that
drive one themselves (``many_queues.py``, ``queue_churn.py``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinned(cpu: int | None) -> list[str]:
    """A command prefix that keeps a process on ``cpu`` (nothing without taskset or a cpu)."""
    if cpu is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cpu)]


def start_erq(
    data_dir: str, *, cpu: int | None = None, what: str = "benchmark"
) -> tuple[subprocess.Popen, int]:
    """Start ``erq serve`` (journal on, defaults) and wait until its port answers."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = subprocess.Popen(
        [*pinned(cpu), sys.executable, "-m", "erq", "serve", "--port", str(port),
         "--admin-port", "0", "--data-dir", data_dir, "--log-level", "WARNING"],
        env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
            return server, port
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit(f"{what}: the server did not start") from None
            time.sleep(0.05)


@contextlib.contextmanager
def running_erq(
    *, cpu: int | None = None, what: str = "benchmark"
) -> Iterator[tuple[subprocess.Popen, int]]:
    """``start_erq`` on a temporary data directory; stopped (SIGTERM) and removed at exit."""
    with tempfile.TemporaryDirectory() as tmp:
        server, port = start_erq(f"{tmp}/data", cpu=cpu, what=what)
        try:
            yield server, port
        finally:
            server.terminate()
            server.wait(30)


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]
