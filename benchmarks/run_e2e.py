#!/usr/bin/env python3
"""End-to-end benchmark: erq (Cython and pure-Python builds) against memcached ``-t 1``.

    python benchmarks/run_e2e.py [--qload PATH] [--repeat 3] [--quick] [--restart-full]

qload (the C load generator in ``../shared/tools/qload``) drives every server over loopback,
server pinned to one core and qload to another; each server is started fresh on a free port for
each repetition, and each figure is the median of the repetitions, beside memcached's from the
same sitting. Writes ``benchmarks/RESULTS.md`` and prints it. erq itself never needs qload.

When the 64 KiB scenario or ``fsync_always`` runs, the machine's ceilings behind their bars are
measured last (``ceilings.py``, a file in the scratch directory, on the file system of the
servers' data directories) and reported under those sections: the sustained write bandwidth
with an fdatasync every 100 ms, through the page cache and around it (``O_DIRECT``, the disk's
own), as the most 64 KiB sets/s it allows such a journal and as a ratio to memcached's; and
one writer's fdatasync rate, with the 50-connection rate the
20x bar needs beside erq's own at the default fsync period (scenario ``set_c50``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceilings import direct_write_bandwidth, disk_write_bandwidth, fdatasync_rate  # noqa: E402
from e2e_harness import (  # noqa: E402
    DEFAULT_QLOAD,
    REPO,
    BenchError,
    Launcher,
    Pinning,
    QLoad,
    Server,
    cleanup,
    command_line,
    cpu_model,
    drop_dir,
    ensure_memcached,
    find_qload,
    git_revision,
    on_signal,
    package_version,
    raise_nofile,
    read_stats,
    read_until_end,
    tempdir,
)
from report import fmt_mib, render, short  # noqa: E402
from scenarios import (  # noqa: E402
    ERQ_BUILDS,
    GIB,
    KIB,
    MEMCACHED,
    MIB,
    PARSER_GROUP,
    SCENARIO_KEYS,
    SCENARIOS,
    SEGMENT_BYTES,
    SPECIAL_KEYS,
    Ceilings,
    FsyncResult,
    Memory,
    MemoryResult,
    MicroResult,
    Plan,
    RestartResult,
    Results,
    Run,
    Scenario,
    rotated,
)

# ---------------------------------------------------------------------------------------------
# The measurements


@dataclass
class Bench:
    launcher: Launcher
    qload: QLoad
    res: Results
    began: float = field(default_factory=time.monotonic)

    @property
    def plan(self) -> Plan:
        return self.res.plan

    def timed(self, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
        return ("--seconds", f"{self.plan.seconds:g}") + extra

    def bound(self) -> float:
        return max(10.0, 3 * self.plan.seconds + 10)

    def say(self, what: str, server: str, text: str) -> None:
        print(f"[{time.monotonic() - self.began:6.1f}s] {what:<18} {server:<9} {text}", flush=True)

    def fresh(self, name: str, **kwargs) -> Server | None:
        """A started and warmed-up server, or None (noted) when it could not start."""
        server = None
        try:
            server = self.launcher.start(name, **kwargs)
            warm_up(server)
            return server
        except (BenchError, OSError) as exc:
            detail = str(exc)
            if server is not None:
                detail += f"; server log: {server.log_tail(6)}"
                server.close(crash=True)
            self.res.notes.append(f"{name} failed to start: {' / '.join(detail.splitlines())}")
            self.say("start", name, f"FAILED: {detail}")
            return None

    def scenario(self, sc: Scenario) -> None:
        """Fresh server per repetition; servers interleaved so drift hits them all alike, in an
        order that turns by one each repetition, so that each takes each place in turn: on
        this VM a run that writes into memory the run before it freed is faster (64 KiB sets:
        8.5k sets/s for the first erq build after a pause, 11.6k for the next)."""
        per = self.res.runs.setdefault(sc.key, {})
        for rep in range(self.plan.repeat):
            for name in rotated(self.res.servers, rep):
                cpu = self.launcher.pinning.server_cpu if sc.same_core else None
                server = self.fresh(name)
                if server is None:
                    per.setdefault(name, []).append(Run(failure="server did not start"))
                    continue
                try:
                    if sc.prefill:
                        fill = self.timed() if name != MEMCACHED else ("--count", "1000")
                        pre = self.qload.run(server, sc.prefill + fill, max_seconds=self.bound())
                        if pre.problems(name != MEMCACHED):
                            self.res.notes.append(f"{sc.key} prefill, {name}: {short(pre)}")
                    args = sc.memcached_args if name == MEMCACHED and sc.memcached_args else sc.args
                    run = self.qload.run(
                        server, self.timed(args), max_seconds=self.bound(), cpu=cpu
                    )
                finally:
                    server.close()
                per.setdefault(name, []).append(run)
                self.say(sc.key, name, f"rep {rep + 1}: {short(run)}")

    def fsync_always(self) -> None:
        """Group commit: the 50-connection set rate over the 1-connection one, fsync always."""
        config = self.launcher.erq_config('fsync = "always"\n')
        for name in self.res.erq_builds:
            out = self.res.fsync.setdefault(name, FsyncResult())
            for rep in range(self.plan.repeat):
                server = self.fresh(name, config=config)
                if server is None:
                    continue
                try:
                    for runs, conns in ((out.one, "1"), (out.fifty, "50")):
                        args = ("--mode", "set", "--pipeline", "1", "--conns", conns)
                        run = self.qload.run(
                            server, self.timed(args), max_seconds=self.bound(), queue=f"q{conns}"
                        )
                        runs.append(run)
                        self.say(
                            "fsync_always", name, f"rep {rep + 1}, {conns} conns: {short(run)}"
                        )
                finally:
                    server.close()

    def micro(self) -> None:
        """The hot paths' micro-benchmarks on both builds (``pytest benchmarks/
        --benchmark-only``), pinned to the server's CPU, repeated like every figure; the
        parser bar reads them."""
        out = self.res.micro = MicroResult()
        report = os.path.join(tempdir("micro"), "micro.json")
        cmd = self.launcher.pinning.prefix(self.launcher.pinning.server_cpu) + [
            sys.executable, "-m", "pytest", str(REPO / "benchmarks"), "--benchmark-only",
            f"--benchmark-json={report}", "-q", "-p", "no:cacheprovider",
        ]  # fmt: skip
        env = {
            k: v for k, v in os.environ.items() if k not in ("ERQ_NO_EXTENSIONS", "ERQ_NO_EPOLL")
        }
        for rep in range(self.plan.repeat):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(report)
            done = subprocess.run(
                cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
            )
            if done.returncode != 0 or not os.path.exists(report):
                tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
                out.failure = f"pytest exited {done.returncode}: " + " / ".join(tail)
                self.say("micro", "both", f"FAILED: {out.failure}")
                return
            run: dict[str, dict[str, float]] = {}
            for bench in json.loads(Path(report).read_text())["benchmarks"]:
                impl = bench["params"]["impl"]
                run.setdefault(bench["group"], {})[impl] = bench["stats"]["median"]
            out.runs.append(run)
            got = run.get(PARSER_GROUP, {})
            if got.get("c") and got.get("py"):
                got = f"parser: Cython {got['py'] / got['c']:.2f}x pure Python"
            self.say("micro", "both", f"rep {rep + 1}: {got}")
        for group in out.groups:
            speedup = out.speedup(group)
            self.say("micro", "both", f"{group}: Cython {speedup or 0:.2f}x pure Python")

    def ceilings(self, disk: bool, syncs: bool) -> None:
        """The machine's ceilings behind the 64 KiB and fsync = "always" bars (``ceilings.py``),
        in a directory on the file system of the servers' data directories."""
        quick = self.plan.quick
        out = self.res.ceilings = Ceilings(1.0 if quick else 3.0, 1.0 if quick else 2.0)
        root = tempdir("ceilings")
        try:
            # The fdatasync rate first, so that the writeback and the freeing of the bandwidth
            # runs' files (up to 2 GiB each) cannot slow its small syncs.
            for rep in range(self.plan.repeat if syncs else 0):
                try:
                    out.syncs.append(fdatasync_rate(root, out.sync_seconds))
                    got = f"{out.syncs[-1]:,.0f} fdatasync/s, one writer"
                except OSError as exc:
                    out.sync_failure = got = str(exc)
                self.say("ceilings", "disk", f"rep {rep + 1}: {got}")
                if out.sync_failure:
                    break
            for rep in range(self.plan.repeat if disk else 0):
                try:
                    cap = GIB if quick else 2 * GIB
                    # Alternated, so that neither variant always runs on memory the other
                    # has just freed.
                    out.disk.append(disk_write_bandwidth(root, out.disk_seconds, cap))
                    out.disk_reused.append(
                        disk_write_bandwidth(root, out.disk_seconds, cap, reuse_cache=True)
                    )
                    out.disk_direct.append(direct_write_bandwidth(root, out.disk_seconds, cap))
                    got = (
                        f"{out.disk[-1] / 1e6:,.0f} MB/s with fdatasync every 100 ms, "
                        f"{out.disk_reused[-1] / 1e6:,.0f} MB/s dropping what each synced, "
                        f"{out.disk_direct[-1] / 1e6:,.0f} MB/s written around the cache"
                    )
                except OSError as exc:
                    out.disk_failure = got = str(exc)
                self.say("ceilings", "disk", f"rep {rep + 1}: {got}")
                if out.disk_failure:
                    break
        finally:
            drop_dir(root)

    def memory(self) -> None:
        """RSS after queueing many 1 KiB items (read-behind), and the cost of idle connections."""
        n_items, n_idle = self.plan.memory_items, self.plan.idle_conns
        fill_config = self.launcher.erq_config('max_memory_size = "64MiB"\n')
        idle_config = self.launcher.erq_config(server=f"max_connections = {n_idle + 16}\n")
        args = ("--mode", "set", "--pipeline", "64", "--size", "1024", "--count", str(n_items))
        for name in self.res.erq_builds:
            out = self.res.memory.setdefault(name, MemoryResult())
            for rep in range(self.plan.repeat):
                root = tempdir(f"memory-{name}")
                data_dir = os.path.join(root, "data")
                server = self.fresh(name, config=fill_config, data_dir=data_dir)
                if server is None:
                    drop_dir(root)
                    continue
                try:
                    run = self.qload.run(server, args, max_seconds=40 if self.plan.quick else 90)
                    time.sleep(0.3)  # past the fsync period, so the reading is the settled one
                    out.fill.append(run)
                    out.fill_memory.append(server.memory())
                    # The same items read back by a restart: what recovery holds, and its peak.
                    server.close(crash=True)
                    server = self.launcher.start(
                        name, config=fill_config, data_dir=data_dir, timeout=120.0
                    )
                    time.sleep(0.3)
                    out.restarted_memory.append(server.memory())
                    out.restarted_items.append(int(server.stats().get("curr_items", "-1")))
                except (BenchError, OSError) as exc:
                    self.res.notes.append(f"{name} memory restart failed: {exc}")
                finally:
                    server.close()
                    drop_dir(root)
                restarted = out.restarted_memory[-1] if out.restarted_memory else Memory()
                self.say(
                    "memory",
                    name,
                    f"rep {rep + 1}: fill {short(run)}, RSS {fmt_mib(out.fill_memory[-1].rss)}; "
                    f"after a SIGKILL and restart {fmt_mib(restarted.rss)} "
                    f"(peak {fmt_mib(restarted.peak)})",
                )
                server = self.fresh(name, config=idle_config)
                if server is None:
                    continue
                try:
                    before = server.memory()
                    held = hold_idle_connections(server, n_idle, deadline_s=60.0)
                    out.idle.append((before, held[1], held[0]))
                finally:
                    server.close()
                self.say(
                    "memory",
                    name,
                    f"rep {rep + 1}: {held[0]} idle connections held, RSS "
                    f"{fmt_mib(before.rss)} -> {fmt_mib(held[1].rss)}",
                )

    def restart(self) -> None:
        """Write, drain to the live size, then time restarts after SIGTERM and after SIGKILL."""
        p = self.plan
        n_written, n_live = p.restart_written // p.restart_item, p.restart_live // p.restart_item
        budget = 900.0 if p.restart_full else 120.0
        shape = ("--size", str(p.restart_item), "--pipeline", "64")
        for name in self.res.erq_builds:
            out = self.res.restart.setdefault(name, RestartResult())
            root = tempdir(f"restart-{name}")
            free = shutil.disk_usage(root).free
            if free < p.restart_written + 4 * SEGMENT_BYTES:
                out.failure = f"only {free / GIB:.1f} GiB free in {root}"
                continue
            data_dir = os.path.join(root, "data")
            server = self.fresh(name, data_dir=data_dir)
            if server is None:
                out.failure = "server did not start"
                continue
            try:
                out.write = self.qload.run(
                    server, ("--mode", "set", "--count", str(n_written)) + shape, max_seconds=budget
                )
                out.drain = self.qload.run(
                    server,
                    ("--mode", "get", "--count", str(n_written - n_live)) + shape,
                    max_seconds=budget,
                )
                self.say("restart", name, f"write {short(out.write)}; drain {short(out.drain)}")
                out.live_items = int(server.stats().get("curr_items", "-1"))
                out.disk_before, out.settle_s = settled_size(data_dir, limit_s=p.settle_limit_s)
                for how in ("SIGTERM", "SIGKILL"):
                    for _ in range(p.repeat):
                        server.close(crash=how == "SIGKILL", timeout=120.0)
                        server = self.launcher.start(name, data_dir=data_dir, timeout=120.0)
                        out.ready[how].append(server.ready_s)
                        out.items_after.append(int(server.stats().get("curr_items", "-1")))
                        self.say(
                            "restart",
                            name,
                            f"after {how}: ready in {server.ready_s:.3f} s, "
                            f"{out.items_after[-1]} items",
                        )
                out.disk_after, _ = settled_size(data_dir, limit_s=p.settle_limit_s)
            except (BenchError, OSError) as exc:
                out.failure = str(exc).splitlines()[0]
            finally:
                server.close()
                drop_dir(root)


def warm_up(server: Server) -> None:
    """One set and get on a queue of its own, so that one-time work (erq imports its journal
    lazily, on the first queue: ~0.1 s) is not billed to the first requests of a timed run."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"set warmup 0 0 1\r\nx\r\nget warmup\r\n")
        buf = read_until_end(sock, "warm-up")
    if not buf.startswith(b"STORED\r\n"):
        raise BenchError(f"warm-up set answered {buf[:80]!r}")


def hold_idle_connections(server: Server, count: int, deadline_s: float) -> tuple[int, Memory]:
    """Open ``count`` connections that send nothing; return how many the server holds, and RSS.

    The first connection is the control one: after each batch it asks ``stats`` until the server
    has accepted the whole batch, so the reading is taken with every connection accepted. All are
    closed before returning.
    """
    socks: list[socket.socket] = []
    deadline = time.monotonic() + deadline_s
    held = 0
    try:
        control = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        socks.append(control)
        while len(socks) < count and time.monotonic() < deadline:
            for _ in range(min(500, count - len(socks))):
                socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            while time.monotonic() < deadline:
                held = int(read_stats(control).get("curr_connections", "0"))
                if held >= len(socks):
                    break
                time.sleep(0.01)
        time.sleep(0.3)
    except OSError:
        pass
    finally:
        memory = server.memory()
        for sock in socks:
            sock.close()
    return held, memory


def settled_size(path: str, limit_s: float) -> tuple[int, float]:
    """Size of ``path`` once background compaction stops changing it: unchanged for 3 s, which
    spans the server's 1 s sweep that starts a compaction, with no snapshot being written (a
    ``.tmp`` file, whose size also stands still while it is fsync'd), at most ``limit_s``; and
    the seconds that took."""
    began = time.monotonic()
    size = dir_bytes(path)
    stable_since = began
    while time.monotonic() - began < limit_s:
        time.sleep(0.5)
        now = dir_bytes(path)
        if now != size or snapshot_in_progress(path):
            size, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= 3.0:
            break
    return size, time.monotonic() - began


def snapshot_in_progress(path: str) -> bool:
    return any(name.endswith(".tmp") for _root, _dirs, files in os.walk(path) for name in files)


def dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add("--qload", help=f"the qload binary, or its source directory (default {DEFAULT_QLOAD})")
    add("--repeat", type=int, default=3, help="repetitions per figure, median reported (3)")
    add("--quick", action="store_true", help="short runs; scaled-down memory and restart figures")
    add("--seconds", type=float, help="length of each timed qload run (3; --quick: 0.5)")
    add("--scenarios", help="comma-separated subset of " + ",".join(SCENARIO_KEYS + SPECIAL_KEYS))
    add("--erq-builds", default=",".join(ERQ_BUILDS), help="erq builds to measure (cython,python)")
    add("--no-memcached", action="store_true", help="skip the reference (then no ratios)")
    add("--no-journal", action="store_true", help="erq with journal = false (diagnostic only)")
    add("--restart-full", action="store_true", help="restart after 10 GiB written, 1 GiB live")
    add("--restart-item-size", type=int, default=8 * KIB, help="restart data item size (8 KiB)")
    add("--memory-items", type=int, help="1 KiB items for the memory figure (1,000,000)")
    add("--idle-conns", type=int, help="idle connections for the memory figure (10,000)")
    add("--output", default=str(REPO / "benchmarks" / "RESULTS.md"), help="report file")
    ns = ap.parse_args(argv)
    if ns.repeat < 1:
        ap.error("--repeat must be at least 1")
    return ns


def build_plan(ns: argparse.Namespace) -> Plan:
    quick = ns.quick
    if ns.restart_full:
        written, live = 10 * GIB, 1 * GIB
    else:
        written, live = (128 * MIB, 16 * MIB) if quick else (1 * GIB, 128 * MIB)
    return Plan(
        seconds=ns.seconds or (0.5 if quick else 3.0),
        repeat=ns.repeat,
        quick=quick,
        memory_items=ns.memory_items or (50_000 if quick else 1_000_000),
        idle_conns=ns.idle_conns or (2_000 if quick else 10_000),
        restart_written=written,
        restart_live=live,
        restart_item=ns.restart_item_size,
        restart_full=ns.restart_full,
    )


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        return run_all(ns, sys.argv[1:] if argv is None else argv)
    except BenchError as exc:
        print(f"run_e2e: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()


def run_all(ns: argparse.Namespace, argv: list[str]) -> int:
    plan = build_plan(ns)
    wanted = ns.scenarios.split(",") if ns.scenarios else list(SCENARIO_KEYS + SPECIAL_KEYS)
    if set(wanted) - set(SCENARIO_KEYS + SPECIAL_KEYS):
        raise BenchError(f"unknown scenario in {ns.scenarios!r}")
    builds = [b for b in ns.erq_builds.split(",") if b]
    if not builds or not set(builds) <= set(ERQ_BUILDS):
        raise BenchError(f"--erq-builds takes a subset of {','.join(ERQ_BUILDS)}")
    qload_path, qload_how = find_qload(ns.qload)
    pinning = Pinning.choose()
    notes: list[str] = []
    nofile = raise_nofile(plan.idle_conns + 1024)
    if nofile < plan.idle_conns + 256:
        plan.idle_conns = max(0, nofile - 256)
        notes.append(f"RLIMIT_NOFILE is {nofile}: idle connections reduced to {plan.idle_conns}.")
    memcached = None if ns.no_memcached else ensure_memcached()
    launcher = Launcher(pinning, memcached, journal=not ns.no_journal)
    if ns.no_journal:
        notes.append(
            "**erq ran with `journal = false` (--no-journal): a diagnostic, not comparable with "
            "the bars; the fsync and restart figures were skipped.**"
        )
        wanted = [w for w in wanted if w not in ("fsync_always", "restart")]
    if plan.repeat < 3:
        notes.append(f"--repeat {plan.repeat}: fewer than 3 repetitions per figure.")
    if not ns.no_memcached and memcached is None:
        notes.append("**memcached is not available (not installed, not root): no ratios.**")

    # Every server must start and identify itself before anything is measured.
    servers = []
    for name in builds + ([MEMCACHED] if memcached else []):
        try:
            launcher.start(name).close()
            servers.append(name)
        except BenchError as exc:
            notes.append(f"**{name} NOT measured: {str(exc).splitlines()[0]}**")
            print(f"run_e2e: {name} is not measured: {exc}", file=sys.stderr)
    if not any(s != MEMCACHED for s in servers):
        raise BenchError("no erq build could be started: " + " ".join(notes))

    bench = Bench(launcher, QLoad(qload_path, pinning), Results(plan, servers, wanted, notes))
    print(
        f"qload: {qload_how}\npinning: {pinning.how}\nservers: {', '.join(servers)}\n"
        f"timed runs of {plan.seconds:g} s, {plan.repeat} repetitions",
        flush=True,
    )
    for sc in SCENARIOS:
        if sc.key in wanted:
            bench.scenario(sc)
    if "fsync_always" in wanted:
        bench.fsync_always()
    if "memory" in wanted:
        bench.memory()
    if "restart" in wanted:
        bench.restart()
    if "micro" in wanted:
        bench.micro()
    if "set_64k" in wanted or "fsync_always" in wanted:
        # Last, so that its writes (up to 2 GiB, then deleted) are behind every server run.
        bench.ceilings(disk="set_64k" in wanted, syncs="fsync_always" in wanted)

    took = time.monotonic() - bench.began
    text = render(bench.res, report_header(bench, argv, qload_how, memcached, took))
    Path(ns.output).write_text(text)
    print("\n" + text + f"\nwritten to {ns.output}")
    return 0


def report_header(
    bench: Bench, argv: list[str], qload_how: str, memcached: str | None, took: float
) -> str:
    p = bench.plan
    erq = command_line([sys.executable, "-c", "import erq; print(erq.__version__)"])
    kind = "quick run: short runs, scaled-down memory and restart" if p.quick else "full run"
    return "\n".join(
        [
            "# erq end-to-end benchmark results",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- command: `{shlex.join(['python', 'benchmarks/run_e2e.py', *argv])}` ({kind}; "
            f"took {took / 60:.1f} min)",
            f"- machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
            f"{cpu_model()}, Linux {platform.release()}; {bench.launcher.pinning.how}",
            f"- versions: erq {erq} (git {git_revision()}), "
            f"{command_line([memcached, '-V']) if memcached else 'memcached: not available'}, "
            f"Python {platform.python_version()}, uvloop {package_version('uvloop')}, "
            f"Cython {package_version('Cython')}",
            f"- qload: {qload_how}",
            f"- method: each figure is the median of {p.repeat} runs of {p.seconds:g} s, each against "
            "a freshly started server (the servers take turns, their order turned by one each "
            "repetition; loopback, free port; after each server stops, its "
            "files are removed and the disk is synced, so that no run pays for the previous "
            "one's writeback). erq runs its default configuration "
            "(journal on, fsync every 100 ms) unless a section says otherwise and keeps qload's "
            "loss/duplicate checks on; memcached runs `-t 1 -m 2048` with `--no-verify` (it is not "
            "a queue). Server CPU = the server's user+sys time during the qload run over the "
            "interval qload measured (its `elapsed_s`; 100% = one core); server RSS = VmRSS right after the run. A ratio is erq's median over "
            "memcached's from this sitting.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
