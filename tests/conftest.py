"""Shared fixtures: both implementations, real server processes, raw-socket clients.

Every behavioural test takes ``impl`` (directly or through ``server``), so it runs once on
the Cython build ("c") and once on the pure-Python twins ("py"). With the default
``--c-extensions`` a missing extension is a failure, never a silent skip.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erq._compat import FAST_MODULES

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--c-extensions",
        action=argparse_bool(),
        default=True,
        help="test the Cython build too and fail if it is missing (default on; --no-c-extensions)",
    )


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def _impl_params(config: pytest.Config) -> list[str]:
    return ["c", "py"] if config.getoption("--c-extensions") else ["py"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", _impl_params(metafunc.config), indirect=True, scope="session")


@pytest.fixture(scope="session")
def impl(request: pytest.FixtureRequest) -> str:
    """'c' or 'py'. For 'c' the extensions must import (a failed build fails the run)."""
    if request.param == "c":
        for name in FAST_MODULES:
            importlib.import_module(f"erq._fast.{name}")  # ImportError -> the test errors
        from erq._compat import COMPILED_TWINS, compiled_twins_built

        assert compiled_twins_built(), f"compiled twins {COMPILED_TWINS} not built"
    return request.param


def impl_module(impl: str, fast: str, twin: str):
    """Import the Cython module ``erq._fast.<fast>`` or its twin ``erq.<twin>``."""
    return importlib.import_module(f"erq._fast.{fast}" if impl == "c" else f"erq.{twin}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ErqProcess:
    """An erq server in a subprocess, on 127.0.0.1 and a free port, with its own data dir."""

    launcher = ("-m", "erq")  # how the interpreter runs the command line ("serve", ...)
    stdin = None  # the server's stdin (subprocess.PIPE to talk to a launcher)

    def __init__(
        self,
        impl: str,
        data_dir: Path,
        config: str | None = None,
        args: list[str] | None = None,
        env: dict | None = None,
        preexec_fn=None,
    ) -> None:
        self.impl = impl
        self.preexec_fn = preexec_fn  # run in the child before erq starts (resource limits)
        self.data_dir = data_dir
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = data_dir.parent / f"{data_dir.name}.toml"
            self.config_path.write_text(config)
        self.args = args or []
        self.extra_env = env or {}
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    def write_config(self, text: str) -> None:
        assert self.config_path is not None
        self.config_path.write_text(text)

    def start(self, wait: bool = True) -> ErqProcess:
        env = dict(os.environ)
        env.pop("ERQ_NO_EXTENSIONS", None)
        if self.impl == "py":
            env["ERQ_NO_EXTENSIONS"] = "1"
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.extra_env)
        cmd = [
            sys.executable,
            *self.launcher,
            "serve",
            "--port",
            str(self.port),
            "--admin-port",
            "0",
            "--data-dir",
            str(self.data_dir),
        ]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        cmd += self.args
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.data_dir.parent,
            preexec_fn=self.preexec_fn,
            stdin=self.stdin,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"erq exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"erq did not start in {timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        self.log.close()
        return code

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def restart(self) -> ErqProcess:
        self.stop()
        return self.start()

    def client(self, timeout: float = 5.0) -> RawClient:
        return RawClient(self.port, timeout)


class RawClient:
    """A raw-socket memcache client that reads replies byte-exactly."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def line(self) -> bytes:
        """One reply line including its \\r\\n."""
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed; buffered {self.buf!r}")
        i = self.buf.index(b"\r\n") + 2
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError(f"closed; buffered {self.buf!r}")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def until(self, terminator: bytes = b"END\r\n") -> bytes:
        """Everything up to and including the first reply line equal to ``terminator``."""
        out = b""
        while True:
            line = self.line()
            out += line
            if line == terminator:
                return out
            if line.startswith(b"VALUE "):
                size = int(line.split()[3])
                out += self.read_exact(size + 2)

    def call(self, request: bytes, terminator: bytes | None = None) -> bytes:
        self.send(request)
        return self.until(terminator) if terminator else self.line()

    def get(self, key: str) -> bytes:
        return self.call(f"get {key}\r\n".encode(), b"END\r\n")

    def set(self, queue: str, data: bytes, flags: int = 0, exptime: int = 0) -> bytes:
        return self.call(
            b"set %s %d %d %d\r\n%s\r\n" % (queue.encode(), flags, exptime, len(data), data)
        )

    def is_closed(self, timeout: float = 2.0) -> bool:
        """True when the server has closed the connection (EOF) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def stats(self) -> dict[str, str]:
        out = {}
        for line in self.call(b"stats\r\n", b"END\r\n").split(b"\r\n"):
            parts = line.split(b" ", 2)
            if len(parts) == 3 and parts[0] == b"STAT":
                out[parts[1].decode()] = parts[2].decode()
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def erq_factory(impl: str, tmp_path: Path):
    """Start servers of the parametrised implementation; all are stopped at teardown."""
    started: list[ErqProcess] = []

    def make(config: str | None = None, name: str = "data", start: bool = True, **kw) -> ErqProcess:
        proc = ErqProcess(impl, tmp_path / name, config, **kw)
        (tmp_path / name).mkdir(exist_ok=True)
        started.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in started:
        proc.stop(signal.SIGKILL)


@pytest.fixture
def server(erq_factory) -> ErqProcess:
    """A running server with embedded defaults."""
    return erq_factory()


@pytest.fixture
def client(server: ErqProcess):
    c = server.client()
    yield c
    c.close()
