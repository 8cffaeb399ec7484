"""The two builds answer the same traffic with the same bytes.

The per-request layers are one source compiled twice, but Cython is not Python: C integer
types, ``except`` clauses, ``bint`` conversions and hand-written C (the parser, the wire, the
ring, the journal codec) can each make the compiled build answer differently. Random client
traffic (valid and invalid requests, pipelined, cut at random points, over several connections
that close, half-close and abort reliable reads; a few server and queue configurations, read-
behind and fanout among them) goes through the protocol layer of each build in its own process
(``protocol_driver.py``); the replies, the queues' counts and what their journals give back
must be equal byte for byte. Deterministic (seeded): ``ERQ_DIFF_SEED`` picks other traffic.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "protocol_driver.py"

CONFIGS = (
    "",
    "[server]\nmax_item_size = 64\nmax_open_reads = 2\nmax_line = 1024\n[queues.default]\n"
    'max_items = 5\n[queues."b"]\ndiscard_old_when_full = true\nmax_items = 3\n',
    '[server]\ncompat = "kestrel"\n[queues."c"]\nmax_size = 100\njournal = false\n',
    "[queues.default]\nmax_memory_size = 160\n",  # read-behind after a few items
)
NAMES = ("a", "a", "a", "b", "b", "c", "a+x", "b+y")
BAD_NAMES = ("x" * 251, "q\xe9", "q*", "")
OPTIONS = ("", "", "", "", "", "/open", "/open", "/close/open", "/open", "/close", "/abort", "/peek", "/close/open", "/t=60000",
           "/open/t=60000", "/t=0", "/bogus", "/t=x", "/open/peek", "/abort/open")  # fmt: skip


def _name(rng: random.Random) -> str:
    return rng.choice(BAD_NAMES) if rng.random() < 0.04 else rng.choice(NAMES)


def _data(rng: random.Random) -> bytes:
    size = rng.choice((0, 1, 5, 10, 40, 63, 64, 65, 100, 300))
    alphabet = b"abcxyz\r\n \x00\xff"
    return bytes(rng.choice(alphabet) for _ in range(size))


def _request(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.015:  # a request after which the server closes the connection
        fatal = ("quit", "\x80binary", "x" * 1030, "set a 0 0", "set a 0 0 -5", "set a 0 0 1x")
        return (rng.choice(fatal) + "\r\n").encode()
    if r < 0.45:
        data = _data(rng)
        flags = rng.choice((0, 0, 0, 0, 7, 4294967295, 4294967296, -1, "x"))
        exptime = rng.choice((0, 0, 0, 0, 0, -1, "z"))
        count = len(data) if rng.random() < 0.98 else len(data) + rng.choice((-1, 1, 5))
        noreply = " noreply" if rng.random() < 0.15 else ""
        line = f"set {_name(rng)} {flags} {exptime} {count}{noreply}\r\n".encode()
        return line + data + b"\r\n"
    if r < 0.85:
        keys = [_name(rng) + rng.choice(OPTIONS) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        return (rng.choice(("get", "get", "gets")) + " " + " ".join(keys) + "\r\n").encode()
    other = (
        f"delete {_name(rng)}",
        f"flush {_name(rng)}",
        "flush_all",
        f"flush_expired {_name(rng)}",
        "flush_all_expired",
        "version",
        f"dump_config {_name(rng)}",
        "dump_config",
        f"confirm {_name(rng)} {rng.choice((0, 1, 2, 5, -1))}",
        rng.choice(("status", "status UP", "status READONLY", "status QUIESCENT", "status NO")),
        "status UP",
        "verbosity 1",
        "incr a 1",
        "touch a 10",
        "gat 10 a",
        "frobnicate",
        "",
        "get",
        "set a 0 0 99999999999999999999999",
        "x" * 10,
    )
    return (rng.choice(other) + rng.choice(("\r\n", "\r\n", "\n"))).encode("utf-8")


def make_case(rng: random.Random) -> dict:
    events: list = []
    for _ in range(rng.randint(20, 80)):
        conn = rng.choice((1, 1, 2, 3))
        r = rng.random()
        if r < 0.02:
            events.append(["close", conn])  # the next event of this number is a new client
            continue
        if r < 0.03:
            events.append(["eof", conn])
            continue
        data = b"".join(_request(rng) for _ in range(rng.choice((1, 1, 1, 2, 4))))
        cuts = sorted(
            rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.choice((0, 0, 1, 3))))
        )
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            events.append(["data", conn, data[start:end].hex()])
    return {"config": rng.choice(CONFIGS), "events": events}


def run_build(cases: list[dict], pure: bool) -> dict:
    env = dict(os.environ)
    env.pop("ERQ_NO_EXTENSIONS", None)
    if pure:
        env["ERQ_NO_EXTENSIONS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(DRIVER)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def show(entries: list) -> str:
    return "\n".join(
        f"  conn {conn}: {text if text == 'closed' else bytes.fromhex(text)!r}"
        for conn, text in entries
    )


@pytest.mark.parametrize("batch", range(4))
def test_both_builds_answer_random_traffic_alike(batch, request):
    if not request.config.getoption("--c-extensions"):
        pytest.skip("--no-c-extensions: there is one build to run")
    seed = int(os.environ.get("ERQ_DIFF_SEED", "20261129")) + batch
    rng = random.Random(seed)
    cases = [make_case(rng) for _ in range(40)]
    compiled, pure = run_build(cases, pure=False), run_build(cases, pure=True)
    assert (compiled["implementation"], pure["implementation"]) == ("cython", "python")
    for index, (case, c, py) in enumerate(
        zip(cases, compiled["results"], pure["results"], strict=True)
    ):
        if c == py:
            continue
        at = next(
            (i for i, (x, y) in enumerate(zip(c["out"], py["out"], strict=False)) if x != y), None
        )
        if at is None:
            at = min(len(c["out"]), len(py["out"]))
        requests = [
            (e[0], e[1], bytes.fromhex(e[2]) if e[0] == "data" else b"") for e in case["events"]
        ]
        pytest.fail(
            f"seed {seed}, case {index}, config {case['config']!r}\n"
            f"requests: {requests!r}\n"
            f"compiled, from reply {at}:\n{show(c['out'][at : at + 4])}\n"
            f"pure, from reply {at}:\n{show(py['out'][at : at + 4])}\n"
            f"counts {c['counts']} / {py['counts']}\n"
            f"recovered {c['recovered']} / {py['recovered']}"
        )
