"""What ``run_e2e.py`` measures, the DESIGN.md section 6 bar each figure is held to, and the report.

A :class:`Scenario` is one qload shape run against every server; the erq-only measurements
(group commit, memory, restart, the hot paths' micro-benchmarks) are procedures in
``run_e2e.py`` whose results land in the dataclasses below, as do the machine's ceilings
(``ceilings.py``). ``report.py`` turns a :class:`Results` into the Markdown of
``RESULTS.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
# Default journal segment size (DESIGN.md section 4): the "+ 2 segments" of the disk bar.
SEGMENT_BYTES = 64 * MIB

PROFILE = Path(__file__).with_name("PROFILE.md")
MEMCACHED = "memcached"
ERQ_BUILDS = ("cython", "python")


def _q(args: str) -> tuple[str, ...]:
    return tuple(args.split())


@dataclass(frozen=True)
class Scenario:
    """One load shape. ``args`` are qload options without host, port, queue, duration, bounds."""

    key: str
    title: str
    args: tuple[str, ...]
    # A set run that fills the queue (erq: as long as the measured run) or creates the key
    # (memcached) before ``args`` runs.
    prefill: tuple[str, ...] | None = None
    # memcached is not a queue: where a flag only makes sense for a queue, it runs this instead.
    memcached_args: tuple[str, ...] | None = None
    # Server and qload on the same core (one-connection latency on a VM: see the qload README).
    same_core: bool = False
    # "throughput" compares ops/s; "latency" compares p99 (lower is better).
    metric: str = "throughput"
    note: str = ""


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "set_p64",
        "1. set, 1 connection, pipeline 64, 10 B",
        _q("--mode set --conns 1 --pipeline 64 --size 10"),
    ),
    Scenario(
        "get_p64",
        "2. get draining a deep queue, 1 connection, pipeline 64, 10 B",
        _q("--mode get --conns 1 --pipeline 64 --size 10"),
        prefill=_q("--mode set --conns 1 --pipeline 64 --size 10"),
        note="erq: the queue is first filled by a set run as long as the measured run, then "
        "drained (ops/s up to the last item); memcached: the same gets of one prefilled key.",
    ),
    Scenario(
        "set_c50",
        "3. set, 50 connections, pipeline 1, 10 B",
        _q("--mode set --conns 50 --pipeline 1 --size 10"),
    ),
    Scenario(
        "get_c50",
        "4. get, 50 connections, pipeline 1, 10 B (prefilled)",
        _q("--mode get --conns 50 --pipeline 1 --size 10"),
        prefill=_q("--mode set --conns 1 --pipeline 64 --size 10"),
        note="prefilled by a pipelined set run as long as the measured run.",
    ),
    Scenario(
        "mixed",
        "5. 10 producers + 10 consumers, 1 KiB, get q/t=1000",
        _q("--mode mixed --conns 20 --producers 10 --size 1024 --blocking-timeout 1000"),
        memcached_args=_q("--mode mixed --conns 20 --producers 10 --size 1024"),
        note="memcached runs the same shape without /t=1000 (a different key there): its "
        "consumers get the key its producers set.",
    ),
    Scenario(
        "pingpong",
        "6a. one-connection set+get round trip, server and qload on different cores",
        _q("--mode pingpong --conns 1 --pipeline 1 --size 10"),
        metric="latency",
    ),
    Scenario(
        "pingpong_same_core",
        "6b. one-connection set+get round trip, server and qload on the same core",
        _q("--mode pingpong --conns 1 --pipeline 1 --size 10"),
        same_core=True,
        metric="latency",
        note="on a VM, cross-core round trips mostly measure the cross-core wake-up; this does not.",
    ),
    Scenario(
        "set_64k",
        "7. set, 64 KiB items, 1 connection, pipeline 64",
        _q(f"--mode set --conns 1 --pipeline 64 --size {64 * KIB}"),
    ),
)

SCENARIO_KEYS = tuple(s.key for s in SCENARIOS)
SPECIAL_KEYS = ("fsync_always", "memory", "restart", "micro")  # erq-only procedures
# The micro-benchmark group the parser bar reads (benchmarks/test_parser_bench.py).
PARSER_GROUP = "parser: 4 KiB pipeline"


# ---------------------------------------------------------------------------------------------
# Bars


def fmt_ratio(value: float) -> str:
    """A ratio with enough digits that "1.00× over" never hides which side of 1 it is on."""
    return f"{value:.2f}×" if abs(value - 1) >= 0.005 else f"{value:.4f}×"


@dataclass(frozen=True)
class Bar:
    """A DESIGN.md section 6 target: ``value op threshold``, value a ratio or a size/time."""

    key: str
    what: str
    op: str  # ">=" or "<="
    threshold: float
    unit: str = "×"  # "×" for ratios, else "MiB" or "s"

    @property
    def source(self) -> str:
        """The scenario or procedure whose results this bar reads."""
        if bar_key := {"cython_vs_python": "set_p64"}.get(self.key):
            return bar_key
        prefixed = self.key.startswith(("memory", "restart", "micro"))
        return self.key.split("_")[0] if prefixed else self.key

    def judge(self, value: float | None) -> str:
        """``met`` / ``NOT met``, and by how much."""
        if value is None:
            return "not measured"
        if self.unit == "×":
            shown, need = fmt_ratio(value), f"{self.op} {self.threshold:g}×"
        else:
            shown, need = f"{value:.2f} {self.unit}", f"{self.op} {self.threshold:g} {self.unit}"
        if self.op == ">=":
            if value >= self.threshold:
                return f"met ({shown}, {need}; {fmt_ratio(value / self.threshold)} the bar)"
            more = fmt_ratio(self.threshold / value) if value > 0 else "∞×"
            return f"**NOT met** ({shown}, {need}; needs {more} more)"
        if value <= self.threshold:
            return f"met ({shown}, {need})"
        return f"**NOT met** ({shown}, {need}; {fmt_ratio(value / self.threshold)} over)"


BARS: tuple[Bar, ...] = (
    Bar("set_p64", "set, 1 conn, pipeline 64: erq / memcached ops/s", ">=", 0.50),
    Bar("get_p64", "get draining, 1 conn, pipeline 64: erq / memcached ops/s", ">=", 1.5),
    Bar("set_c50", "set, 50 conns: erq / memcached ops/s", ">=", 0.90),
    Bar("get_c50", "get, 50 conns: erq / memcached ops/s", ">=", 0.90),
    Bar("mixed", "10 + 10, 1 KiB, t=1000: erq / memcached ops/s", ">=", 0.80),
    Bar("pingpong", "round trip p99, different cores: erq / memcached", "<=", 1.5),
    Bar("pingpong_same_core", "round trip p99, same core: erq / memcached", "<=", 1.5),
    Bar("set_64k", "64 KiB set, pipeline 64: erq / memcached ops/s", ">=", 0.50),
    Bar("cython_vs_python", "pipelined set (scenario 1): Cython / pure-Python", ">=", 3.0),
    Bar(
        "micro_parser", "parser micro-benchmark (4 KiB pipeline): Cython / pure-Python", ">=", 10.0
    ),
    Bar("fsync_always", 'fsync = "always": 50 conns / 1 conn set rate', ">=", 20.0),
    Bar("memory_fill", "RSS after the fill, max_memory_size = 64MiB", "<=", 100.0, "MiB"),
    Bar(
        "memory_restart", "RSS once ready after a SIGKILL and restart over them", "<=", 100.0, "MiB"
    ),
    Bar("memory_idle", "extra RSS with the idle connections", "<=", 100.0, "MiB"),
    Bar("restart_ready", "restart: ready (answers version) within", "<=", 5.0, "s"),
    Bar("restart_disk", "journal on disk / (2 × live bytes + 2 segments)", "<=", 1.0),
)


# ---------------------------------------------------------------------------------------------
# Results


def rotated(names: list[str], turn: int) -> list[str]:
    """``names`` turned left by ``turn``: the servers' order in repetition ``turn``, so that
    over as many repetitions as servers each runs once in each place."""
    if not names:
        return []
    k = turn % len(names)
    return names[k:] + names[:k]


def median(values: list[float | None]) -> float | None:
    """Median of the values that exist (an even count averages the middle two)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


@dataclass
class Run:
    """One qload run against one server, with the server's CPU and memory around it."""

    data: dict = field(default_factory=dict)  # qload's JSON line
    cpu_pct: float | None = None  # server user+sys over qload's measured interval; 100 = a core
    rss_mib: float | None = None  # server VmRSS right after the run
    failure: str = ""

    def get(self, key: str) -> float | None:
        value = self.data.get(key)
        return float(value) if isinstance(value, int | float) else None

    def problems(self, verified: bool) -> list[str]:
        """What went wrong in this run; empty when it is clean."""
        if self.failure:
            return [self.failure]
        keys = ["errors", "abandoned"]
        if verified:
            keys += ["lost", "duplicates", "bad_values", "foreign"]
        out = [f"{k} {self.data[k]}" for k in keys if self.data.get(k)]
        if self.data.get("first_error"):
            out.append(f"first error: {self.data['first_error']!r}")
        return out


def med(runs: list[Run], key: str) -> float | None:
    return median([r.get(key) for r in runs if not r.failure])


@dataclass
class Memory:
    """VmRSS and its split: anonymous memory vs mapped files (an mmap'd journal counts in RSS)."""

    rss: float | None = None
    anon: float | None = None
    file: float | None = None
    peak: float | None = None  # VmHWM: the most RSS the process has had


@dataclass
class FsyncResult:
    one: list[Run] = field(default_factory=list)
    fifty: list[Run] = field(default_factory=list)

    def ratio(self) -> float | None:
        one, fifty = med(self.one, "ops_per_s"), med(self.fifty, "ops_per_s")
        return fifty / one if one and fifty else None


@dataclass
class MemoryResult:
    fill: list[Run] = field(default_factory=list)
    fill_memory: list[Memory] = field(default_factory=list)
    restarted_memory: list[Memory] = field(default_factory=list)  # after SIGKILL and restart
    restarted_items: list[int] = field(default_factory=list)
    idle: list[tuple[Memory, Memory, int]] = field(default_factory=list)  # before, with, held

    def fill_rss(self) -> float | None:
        return median([m.rss for m in self.fill_memory])

    def restarted_rss(self) -> float | None:
        return median([m.rss for m in self.restarted_memory])

    def idle_extra(self) -> float | None:
        return median([w.rss - b.rss for b, w, _ in self.idle if w.rss is not None and b.rss])


@dataclass
class RestartResult:
    write: Run | None = None
    drain: Run | None = None
    live_items: int = 0
    disk_before: int = 0
    disk_after: int = 0
    settle_s: float = 0.0  # wait after the drain until the journal stopped shrinking
    ready: dict[str, list[float]] = field(default_factory=lambda: {"SIGTERM": [], "SIGKILL": []})
    items_after: list[int] = field(default_factory=list)
    failure: str = ""

    def disk_ratio(self, item_size: int) -> float | None:
        if not self.items_after:
            return None
        bound = 2 * self.live_items * item_size + 2 * SEGMENT_BYTES
        return max(self.disk_before, self.disk_after) / bound


@dataclass
class MicroResult:
    """``pytest benchmarks/ --benchmark-only``, run several times: per run, each group's
    median time per build, in seconds.

    A speed-up is taken within a run (the two builds' figures a few seconds apart) and the
    median of the runs' speed-ups reported: on this shared machine the speed of a core can
    change by ~1.7x between two benchmarks, which one run alone takes for the builds'."""

    runs: list[dict[str, dict[str, float]]] = field(default_factory=list)  # group -> impl -> s
    failure: str = ""

    @property
    def groups(self) -> dict[str, dict[str, float]]:
        """Each group's median time over the runs, per build."""
        times: dict[str, dict[str, list[float]]] = {}
        for run in self.runs:
            for group, per_impl in run.items():
                for impl, seconds in per_impl.items():
                    times.setdefault(group, {}).setdefault(impl, []).append(seconds)
        return {g: {i: median(ts) for i, ts in per.items()} for g, per in times.items()}

    def speedups(self, group: str) -> list[float]:
        """How many times faster the Cython build ran the group than the pure one, per run."""
        out = []
        for run in self.runs:
            times = run.get(group, {})
            c, py = times.get("c"), times.get("py")
            if c and py:
                out.append(py / c)
        return out

    def speedup(self, group: str) -> float | None:
        """The median of the runs' speed-ups."""
        speedups = self.speedups(group)
        return median(speedups) if speedups else None


@dataclass
class Ceilings:
    """The machine's limits behind two bars (``ceilings.py``), one figure per repetition."""

    disk_seconds: float  # length of each disk bandwidth run
    sync_seconds: float  # length of each fdatasync rate run
    disk: list[float] = field(default_factory=list)  # bytes/s, fdatasync every 100 ms
    # bytes/s, the same with each synced range dropped from the page cache (memory reused)
    disk_reused: list[float] = field(default_factory=list)
    # bytes/s the disk itself takes: O_DIRECT 1 MiB writes, fdatasync every 100 ms
    disk_direct: list[float] = field(default_factory=list)
    syncs: list[float] = field(default_factory=list)  # fdatasync/s of one writer
    disk_failure: str = ""
    sync_failure: str = ""


@dataclass
class Plan:
    """Sizes and durations of this invocation (full, or scaled down by --quick)."""

    seconds: float
    repeat: int
    quick: bool
    memory_items: int
    idle_conns: int
    restart_written: int
    restart_live: int
    restart_item: int
    restart_full: bool

    @property
    def settle_limit_s(self) -> float:
        """How long the restart figure waits for compaction to stop shrinking the journal
        after the drain: 15 s, or longer when the drain leaves gigabytes to rewrite (a snapshot
        copies live data at ~100-200 MB/s on these disks)."""
        return max(15.0, self.restart_written / 100e6)


@dataclass
class Results:
    plan: Plan
    servers: list[str]
    selected: list[str]  # scenario and procedure keys this invocation ran
    notes: list[str] = field(default_factory=list)
    runs: dict[str, dict[str, list[Run]]] = field(default_factory=dict)  # scenario -> server
    fsync: dict[str, FsyncResult] = field(default_factory=dict)  # erq build -> result
    memory: dict[str, MemoryResult] = field(default_factory=dict)
    restart: dict[str, RestartResult] = field(default_factory=dict)
    ceilings: Ceilings | None = None
    micro: MicroResult | None = None

    @property
    def erq_builds(self) -> list[str]:
        return [s for s in self.servers if s != MEMCACHED]

    def ratio(self, key: str, build: str) -> float | None:
        """erq / memcached in one scenario: ops/s, or p99 for latency scenarios."""
        sc = next(s for s in SCENARIOS if s.key == key)
        per = self.runs.get(key, {})
        if build not in per or MEMCACHED not in per:
            return None
        metric = "p99_us" if sc.metric == "latency" else "ops_per_s"
        mine, ref = med(per[build], metric), med(per[MEMCACHED], metric)
        return mine / ref if mine is not None and ref else None

    def bar_value(self, bar: Bar, build: str) -> float | None:
        if bar.key in SCENARIO_KEYS:
            return self.ratio(bar.key, build)
        if bar.key == "cython_vs_python":
            per = self.runs.get("set_p64", {})
            c, py = med(per.get("cython", []), "ops_per_s"), med(per.get("python", []), "ops_per_s")
            return c / py if c and py else None
        if bar.key == "fsync_always":
            return self.fsync[build].ratio() if build in self.fsync else None
        if bar.key == "micro_parser":
            return self.micro.speedup(PARSER_GROUP) if self.micro else None
        if bar.key == "memory_fill":
            return self.memory[build].fill_rss() if build in self.memory else None
        if bar.key == "memory_restart":
            return self.memory[build].restarted_rss() if build in self.memory else None
        if bar.key == "memory_idle":
            return self.memory[build].idle_extra() if build in self.memory else None
        r = self.restart.get(build)
        if r is None:
            return None
        if bar.key == "restart_ready":
            return median(r.ready["SIGTERM"] + r.ready["SIGKILL"])
        return r.disk_ratio(self.plan.restart_item)
