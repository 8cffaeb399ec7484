"""``tcp_keepalive``: a client whose host died or left the network without closing its
connection is found gone by the kernel's probes, and its connection closes like any other: its
open reads go back to the head of their queues (PROTOCOL section 5)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erq import keepalive

from support import RELOADED, config, start

TESTS = Path(__file__).resolve().parent
HZ = 100  # /proc/net/tcp gives timers in USER_HZ ticks


def keepalive_timer(server_port: int, client_port: int) -> tuple[int, float]:
    """The server-side socket's timer for one client (/proc/net/tcp): its kind (2: keepalive,
    0: none) and the seconds until it fires, once the client has acknowledged what the server
    sent (until then the timer is the retransmission's, kind 1)."""
    deadline = time.monotonic() + 5
    while True:
        with open("/proc/net/tcp") as table:
            rows = [row.split() for row in list(table)[1:]]
        for fields in rows:
            if fields[1].endswith(f":{server_port:04X}") and fields[2].endswith(
                f":{client_port:04X}"
            ):
                kind, when = fields[5].split(":")
                if int(kind, 16) != 1 or time.monotonic() > deadline:
                    return int(kind, 16), int(when, 16) / HZ
                break
        else:
            raise AssertionError(f"no server socket for client port {client_port}")
        time.sleep(0.01)


def client_port(client) -> int:
    return client.sock.getsockname()[1]


def test_the_options_probe_three_times_a_third_of_the_idle_time_apart():
    with socket.socket() as sock:

        class Transport:
            def get_extra_info(self, name: str):
                return sock if name == "socket" else None

        keepalive.enable(Transport(), 299_001)  # rounded up to whole seconds
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if sys.platform.startswith("linux"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 300
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 100
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == keepalive.PROBES
            # Data unacknowledged is given up on after as long as probes take: 300 + 3 x 100 s.
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 600_000
    assert keepalive.options(2)[2][2] == 1  # never an interval of 0


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc/net/tcp")
def test_every_client_connection_is_probed_after_the_idle_time_set(erq_factory):
    server = erq_factory()  # the default: 300 s
    first = server.client()
    assert first.call(b"version\r\n").startswith(b"VERSION")  # accepted and served
    kind, when = keepalive_timer(server.port, client_port(first))
    assert kind == 2 and 290 <= when <= 300, (kind, when)
    server.stop()

    server = start(erq_factory, server='tcp_keepalive = "42s"')
    old = server.client()
    assert old.call(b"version\r\n").startswith(b"VERSION")
    kind, when = keepalive_timer(server.port, client_port(old))
    assert kind == 2 and 35 <= when <= 42, (kind, when)
    # A reload applies to the connections made after it; those open keep theirs.
    server.write_config(config(server='tcp_keepalive = "none"'))
    assert old.call(b"reload\r\n") == RELOADED
    new = server.client()
    assert new.call(b"version\r\n").startswith(b"VERSION")
    assert keepalive_timer(server.port, client_port(new))[0] == 0
    kind, when = keepalive_timer(server.port, client_port(old))
    assert kind == 2 and when <= 42, (kind, when)


def _own_network_namespace() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip") and sys.platform == "linux"):
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(
    not _own_network_namespace(), reason="needs unshare -rn (user and network namespaces) and ip"
)
@pytest.mark.parametrize("mode", ["idle", "in-flight"])
def test_a_client_whose_host_vanished_is_closed_and_its_open_read_comes_back(impl, tmp_path, mode):
    # In a network namespace of its own, so that taking its loopback down cuts the worker off
    # as a dead host or a lost network would: no FIN, no RST, nothing answers the probes.
    # idle: the worker holds a read handed to it before; in-flight: it is handed the item
    # once cut off, so the VALUE is never acknowledged (keepalive does not probe then: the
    # kernel retransmits, ~15 min by default, unless TCP_USER_TIMEOUT says otherwise).
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        ["unshare", "-rn", sys.executable, str(TESTS / "vanished_client.py"), impl, tmp_path, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # tcp_keepalive = 1s: probed after 1 s idle, gone after three unanswered probes 1 s apart;
    # in flight, gone 4 s after the VALUE went out (the item moves to q about 1 s in).
    assert 3 <= result["gone_after"] < 15, result
    assert result["reply"] == "VALUE q 0 4\r\nwork\r\nEND\r\n", result  # back at the head
    assert result["curr_connections"] == 1 and result["canceled"] == "1", result
