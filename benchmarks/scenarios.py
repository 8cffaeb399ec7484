"""What ``run_e2e.py`` measures, the DESIGN.md section 6 bar each figure is held to, and the report.

A :class:`Scenario` is one qload shape run against every server; the erq-only measurements
(group commit, memory, restart, the hot paths' micro-benchmarks) are procedures in
``run_e2e.py`` whose results land in the dataclasses below, as do the machine's ceilings
(``ceilings.py``). :func:`render` turns a
:class:`Results` into the Markdown of ``RESULTS.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ceilings import ADD_OVERHEAD

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


def _x(value: float) -> str:
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
            shown, need = _x(value), f"{self.op} {self.threshold:g}×"
        else:
            shown, need = f"{value:.2f} {self.unit}", f"{self.op} {self.threshold:g} {self.unit}"
        if self.op == ">=":
            if value >= self.threshold:
                return f"met ({shown}, {need}; {_x(value / self.threshold)} the bar)"
            more = _x(self.threshold / value) if value > 0 else "∞×"
            return f"**NOT met** ({shown}, {need}; needs {more} more)"
        if value <= self.threshold:
            return f"met ({shown}, {need})"
        return f"**NOT met** ({shown}, {need}; {_x(value / self.threshold)} over)"


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
    Bar("memory_idle", "extra RSS with the idle connections", "<=", 100.0, "MiB"),
    Bar("restart_ready", "restart: ready (answers version) within", "<=", 5.0, "s"),
    Bar("restart_disk", "journal on disk / (2 × live bytes + 2 segments)", "<=", 1.0),
)


# ---------------------------------------------------------------------------------------------
# Results


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
    cpu_pct: float | None = None  # server user+sys over qload's wall time; 100 = one core
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
    idle: list[tuple[Memory, Memory, int]] = field(default_factory=list)  # before, with, held

    def fill_rss(self) -> float | None:
        return median([m.rss for m in self.fill_memory])

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
        if bar.key == "memory_idle":
            return self.memory[build].idle_extra() if build in self.memory else None
        r = self.restart.get(build)
        if r is None:
            return None
        if bar.key == "restart_ready":
            return median(r.ready["SIGTERM"] + r.ready["SIGKILL"])
        return r.disk_ratio(self.plan.restart_item)


# ---------------------------------------------------------------------------------------------
# Report


def fmt_ops(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def fmt_us(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f}"


def fmt_mib(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f} MiB"


def fmt_s(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f} s"


def median_memory(samples: list[Memory]) -> Memory:
    """Field by field median of several readings."""
    return Memory(
        median([m.rss for m in samples]),
        median([m.anon for m in samples]),
        median([m.file for m in samples]),
    )


def fmt_mem(m: Memory) -> str:
    if m.rss is None:
        return "–"
    return f"{m.rss:,.1f} MiB (anon {m.anon or 0:,.1f}, file {m.file or 0:,.1f})"


def short(run: Run) -> str:
    """One line for the progress log."""
    if run.failure:
        return f"FAILED: {run.failure[:160]}"
    bad = ", ".join(run.problems(bool(run.data.get("verified"))))
    return (
        f"{fmt_ops(run.get('ops_per_s'))} ops/s p50 {fmt_us(run.get('p50_us'))} "
        f"p99 {fmt_us(run.get('p99_us'))} µs" + (f" [{bad}]" if bad else "")
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def check_cell(server: str, runs: list[Run | None]) -> str:
    problems = [p for r in runs if r is not None for p in r.problems(server != MEMCACHED)]
    if problems:
        return "**" + "; ".join(dict.fromkeys(problems)) + "**"
    if server == MEMCACHED:
        return "errors 0 (not a queue: not verified)"
    return "lost 0, dup 0, errors 0"


def label(server: str) -> str:
    return server if server == MEMCACHED else f"erq ({server})"


def render(res: Results, header: str) -> str:
    out = [header]
    for sc in SCENARIOS:
        per = res.runs.get(sc.key)
        if not per:
            continue
        out.append(f"\n### {sc.title}\n")
        if sc.note:
            out.append(f"_{sc.note}_\n")
        rows = []
        for server, runs in per.items():
            ratio = res.ratio(sc.key, server) if server != MEMCACHED else None
            cpu = median([r.cpu_pct for r in runs])
            rows.append(
                [
                    label(server),
                    fmt_ops(med(runs, "ops_per_s")),
                    fmt_us(med(runs, "p50_us")),
                    fmt_us(med(runs, "p99_us")),
                    "–" if cpu is None else f"{cpu:.0f}%",
                    fmt_mib(median([r.rss_mib for r in runs])),
                    "reference" if server == MEMCACHED else "–" if ratio is None else _x(ratio),
                    " / ".join("fail" if r.failure else fmt_ops(r.get("ops_per_s")) for r in runs),
                    check_cell(server, runs),
                ]
            )
        vs = "p99 vs memcached" if sc.metric == "latency" else "ops/s vs memcached"
        cols = ["server", "ops/s", "p50 µs", "p99 µs", "server CPU", "server RSS", vs]
        out.append(table(cols + ["ops/s of each run", "check"], rows))
        if sc.key == "set_64k":
            out += _render_disk_ceiling(res)
    out += _render_fsync(res) + _render_memory(res) + _render_restart(res) + _render_micro(res)
    out.append("\n### Bars (DESIGN.md section 6)\n")
    out.append(
        "_Medians from this sitting. The bars are the Cython build's targets; the pure-Python "
        "build is judged too, for scale._\n"
    )
    rows = []
    for bar in BARS:
        if bar.source not in res.selected:
            continue
        for build in res.erq_builds:
            if bar.key in ("cython_vs_python", "micro_parser") and build != "cython":
                continue
            value = res.bar_value(bar, build)
            verdict = bar.judge(value)
            scaled = (bar.key.startswith("memory") and res.plan.quick) or (
                bar.key.startswith("restart") and not res.plan.restart_full
            )
            if value is not None and scaled:
                verdict += " — scaled-down run"
            rows.append([bar.what, build, verdict])
    out.append(table(["bar", "erq build", "verdict"], rows))
    if res.notes:
        out.append("\n### Notes\n")
        out += [f"- {n}" for n in res.notes]
    if PROFILE.exists():
        # Where a bar is missed, the profile behind it and what would close it (kept by hand
        # in PROFILE.md, since it comes from py-spy/perf sessions rather than from this run).
        body = PROFILE.read_text().split("\n", 1)[1].strip()
        out.append("\n## Where the time goes (from benchmarks/PROFILE.md)\n")
        out.append(body.replace("\n## ", "\n### "))
    return "\n".join(out) + "\n"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1e6:,.1f} µs" if seconds >= 1e-6 else f"{seconds * 1e9:,.0f} ns"


def _render_micro(res: Results) -> list[str]:
    micro = res.micro
    if micro is None:
        return []
    out = [
        "\n### Micro-benchmarks of the hot paths, both builds\n",
        "_`pytest benchmarks/ --benchmark-only` (pytest-benchmark), pinned to the server's CPU, "
        f"run {len(micro.runs)} times: the median time of one call over pytest-benchmark's "
        "rounds, its median over the runs, and the median of the runs' speed-ups (each taken "
        "within one run)._\n",
    ]
    if micro.failure:
        return out + [f"**Not measured: {micro.failure}**"]
    rows = []
    for group, times in micro.groups.items():
        speedup = micro.speedup(group)
        rows.append(
            [
                group,
                fmt_time(times.get("c")),
                fmt_time(times.get("py")),
                "–" if speedup is None else _x(speedup),
                " / ".join(_x(x) for x in micro.speedups(group)),
            ]
        )
    header = ["benchmark", "Cython", "pure Python", "Cython speed-up", "speed-up of each run"]
    return out + [table(header, rows)]


def _render_fsync(res: Results) -> list[str]:
    if not res.fsync:
        return []
    rows = [
        [
            label(build),
            fmt_ops(med(r.one, "ops_per_s")),
            fmt_us(med(r.one, "p99_us")),
            fmt_ops(med(r.fifty, "ops_per_s")),
            fmt_us(med(r.fifty, "p99_us")),
            "–" if r.ratio() is None else _x(r.ratio()),
            check_cell(build, r.one + r.fifty),
        ]
        for build, r in res.fsync.items()
    ]
    cols = ["server", "1 conn ops/s", "1 conn p99 µs", "50 conns ops/s", "50 conns p99 µs"]
    return [
        '\n### 8. fsync = "always", set, pipeline 1: 1 connection vs 50 (erq only)\n',
        table(cols + ["50 / 1", "check"], rows),
    ] + _render_sync_ceiling(res)


def _ceiling_head(figures: list[float], seconds: float, failure: str) -> list[str]:
    out = []
    if figures:
        runs = f"median of {len(figures)} runs" if len(figures) > 1 else "one run"
        out.append(
            f"\n**Machine ceiling** (this sitting, `benchmarks/ceilings.py`, {runs} of "
            f"{seconds:g} s):\n"
        )
    if failure:
        out.append(f"\n**Machine ceiling: a run failed: {failure}**\n")
    return out


def _render_disk_ceiling(res: Results) -> list[str]:
    """Under the 64 KiB scenario: the most sets/s a journal synced every 100 ms can sustain."""
    c = res.ceilings
    if c is None or not (c.disk or c.disk_failure):
        return []
    out = _ceiling_head(c.disk, c.disk_seconds, c.disk_failure)
    bandwidth = median(c.disk)
    if bandwidth is None:
        return out
    record = 64 * KIB + ADD_OVERHEAD
    sets = bandwidth / record
    runs = " / ".join(f"{b / 1e6:,.0f}" for b in c.disk)
    out += [
        f"- This disk made {bandwidth / 1e6:,.0f} MB/s durable (runs: {runs} MB/s): 64 KiB "
        "blocks written into a preallocated, mapped file, fdatasync every 100 ms.",
        f"- At {record:,} journal bytes per set (the 64 KiB value + the {ADD_OVERHEAD}-byte "
        f"ADD record header), that is at most {fmt_ops(sets)} sets/s.",
    ]
    per = res.runs.get("set_64k", {})
    ref = med(per.get(MEMCACHED, []), "ops_per_s")
    if ref:
        bar = next(b for b in BARS if b.key == "set_64k")
        out.append(
            f"- Ceiling for any journal that syncs every 100 ms on this disk: {_x(sets / ref)} "
            f"memcached ({fmt_ops(ref)} sets/s); the bar asks {bar.threshold:.2f}×."
        )
    above = [b for b in res.erq_builds if (med(per.get(b, []), "ops_per_s") or 0) > sets]
    if above:
        out.append(
            f"\nerq ({', '.join(above)}) measured above that: within a run of "
            f"{res.plan.seconds:g} s, data the periodic fdatasync has not yet written can wait "
            "in the page cache; a sustained load is bounded by the disk."
        )
    return out


def _render_sync_ceiling(res: Results) -> list[str]:
    """Under the fsync = "always" section: one writer's fdatasync rate, and what 20× needs."""
    c = res.ceilings
    if c is None or not (c.syncs or c.sync_failure):
        return []
    out = _ceiling_head(c.syncs, c.sync_seconds, c.sync_failure)
    rate = median(c.syncs)
    if rate is not None:
        runs = " / ".join(fmt_ops(r) for r in c.syncs)
        out.append(
            f"- One writer appending a {ADD_OVERHEAD + 10}-byte record (the ADD record of a "
            "10 B item) to a preallocated, mapped file, fdatasync after each: "
            f"{fmt_ops(rate)} fdatasync/s (runs: {runs}), the bound on one connection's rate "
            'with fsync = "always".'
        )
    bar = next(b for b in BARS if b.key == "fsync_always")
    for build, r in res.fsync.items():
        one = med(r.one, "ops_per_s")
        if one is None:
            continue
        line = (
            f"- {label(build)}: the {bar.threshold:g}× bar needs {fmt_ops(bar.threshold * one)} "
            f"ops/s at 50 connections ({bar.threshold:g} × {fmt_ops(one)})"
        )
        periodic = med(res.runs.get("set_c50", {}).get(build, []), "ops_per_s")
        if periodic is not None:
            line += (
                "; the same load with fsync every 100 ms (scenario 3, this sitting) reaches "
                f"{fmt_ops(periodic)} ops/s"
            )
        out.append(line + ".")
    return out


def _render_memory(res: Results) -> list[str]:
    if not res.memory:
        return []
    p = res.plan
    rows = []
    for build, r in res.memory.items():
        stored = median([f.get("sets") for f in r.fill if not f.failure])
        rows.append(
            [
                label(build),
                f"{fmt_ops(stored)} stored",
                fmt_mem(median_memory(r.fill_memory)),
                ", ".join(str(held) for _, _, held in r.idle) or "–",
                fmt_mem(median_memory([b for b, _, _ in r.idle])),
                fmt_mib(r.idle_extra()),
                check_cell(build, list(r.fill)),
            ]
        )
    scaled = " — scaled down by --quick" if p.quick else ""
    return [
        f"\n### 9. Memory (erq only){scaled}\n",
        f'_{p.memory_items:,} items of 1 KiB queued with `max_memory_size = "64MiB"` (1 '
        f"connection, pipeline 64), RSS read after the fill; then, on a fresh server, "
        f"{p.idle_conns:,} connections opened and left idle. RSS is VmRSS; anon/file is its "
        "split (RssAnon, RssFile: mapped journal segments count as file)._\n",
        table(
            [
                "server",
                "items",
                "RSS after the fill",
                "idle conns held",
                "RSS before them",
                "extra RSS with them",
                "check",
            ],
            rows,
        ),
    ]


def _render_restart(res: Results) -> list[str]:
    if not res.restart:
        return []
    p = res.plan
    size = "full size" if p.restart_full else "scaled down (full size: --restart-full)"
    rows = []
    for build, r in res.restart.items():
        if r.write is None:
            rows.append([label(build), f"**{r.failure}**"] + ["–"] * 5)
            continue
        written = (r.write.get("sets") or 0) * p.restart_item
        bound = 2 * r.live_items * p.restart_item + 2 * SEGMENT_BYTES
        rows.append(
            [
                label(build),
                f"{written / MIB:,.0f} MiB written, {r.live_items:,} items = "
                f"{r.live_items * p.restart_item / MIB:,.1f} MiB live",
                f"{r.disk_before / MIB:,.1f} MiB before (settled in {r.settle_s:.1f} s), "
                f"{r.disk_after / MIB:,.1f} MiB after "
                f"(bound {bound / MIB:,.1f} MiB)",
                fmt_s(median(r.ready["SIGTERM"])),
                fmt_s(median(r.ready["SIGKILL"])),
                ", ".join(str(n) for n in r.items_after),
                check_cell(build, [r.write, r.drain]) + (f"; **{r.failure}**" if r.failure else ""),
            ]
        )
    return [
        f"\n### 10. Restart (erq only) — {size}\n",
        f"_{p.restart_written / MIB:,.0f} MiB written in {p.restart_item // KIB} KiB items, "
        f"drained to {p.restart_live / MIB:,.0f} MiB live, then restarted {p.repeat}× after "
        f"SIGTERM and {p.repeat}× after SIGKILL; ready = from spawn until the port answers "
        "`version`. Journal on disk = apparent size of the data directory (preallocated "
        f"segments count in full), read once compaction stopped shrinking it "
        f"(≤ {p.settle_limit_s:,.0f} s) and "
        "again after the restarts._\n",
        table(
            [
                "server",
                "data",
                "journal on disk",
                "ready after SIGTERM",
                "ready after SIGKILL",
                "items after each restart",
                "check",
            ],
            rows,
        ),
    ]
