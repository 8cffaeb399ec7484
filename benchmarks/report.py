"""The Markdown of ``RESULTS.md``: :func:`render` turns the :class:`~scenarios.Results` of a
``run_e2e.py`` run into its tables, bars and notes, with ``PROFILE.md`` appended."""

from __future__ import annotations

from ceilings import ADD_OVERHEAD
from scenarios import (
    BARS,
    KIB,
    MEMCACHED,
    MIB,
    PROFILE,
    SCENARIOS,
    SEGMENT_BYTES,
    Memory,
    Results,
    Run,
    fmt_ratio,
    med,
    median,
)


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
        median([m.peak for m in samples]),
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
                    "reference"
                    if server == MEMCACHED
                    else "–"
                    if ratio is None
                    else fmt_ratio(ratio),
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
                "–" if speedup is None else fmt_ratio(speedup),
                " / ".join(fmt_ratio(x) for x in micro.speedups(group)),
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
            "–" if r.ratio() is None else fmt_ratio(r.ratio()),
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


def _mb_runs(figures: list[float]) -> str:
    """The median bandwidth and each run's, in MB/s."""
    runs = " / ".join(f"{b / 1e6:,.0f}" for b in figures)
    return f"{median(figures) / 1e6:,.0f} MB/s (runs: {runs} MB/s)"


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
    out += [
        f"- Through the page cache, as a journal keeps it: {_mb_runs(c.disk)} made durable: "
        "64 KiB blocks written into a preallocated, mapped file, fdatasync every 100 ms.",
        f"- At {record:,} journal bytes per set (the 64 KiB value + the {ADD_OVERHEAD}-byte "
        f"ADD record header), that is at most {fmt_ops(sets)} sets/s.",
    ]
    reused = median(c.disk_reused)
    if reused is not None:
        out.append(
            f"- The same writer dropping each synced range from the page cache, so that new "
            f"pages reuse its memory: {_mb_runs(c.disk_reused)}, "
            f"{fmt_ops(reused / record)} sets/s. The gap is what growing the page cache into "
            "memory not touched lately costs here (on a VM, memory the host must back again), "
            "not the disk's speed (benchmarks/PROFILE.md, scenario 7)."
        )
    direct = median(c.disk_direct)
    if direct is not None:
        out.append(
            f"- The disk itself, written around the page cache (`O_DIRECT`, 1 MiB blocks, "
            f"fdatasync every 100 ms): {_mb_runs(c.disk_direct)}, "
            f"{fmt_ops(direct / record)} sets/s: no journal that makes every byte durable can "
            "sustain more, however it writes, even at no cost in CPU."
        )
    per = res.runs.get("set_64k", {})
    ref = med(per.get(MEMCACHED, []), "ops_per_s")
    if ref:
        bar = next(b for b in BARS if b.key == "set_64k")
        out.append(
            f"- Ceiling for a journal that syncs every 100 ms and keeps its pages cached: "
            f"{fmt_ratio(sets / ref)} memcached ({fmt_ops(ref)} sets/s)"
            + (f"; dropping them: {fmt_ratio(reused / record / ref)}" if reused else "")
            + (f"; the disk's own: {fmt_ratio(direct / record / ref)}" if direct else "")
            + f"; the bar asks {bar.threshold:.2f}×."
        )
    above = [b for b in res.erq_builds if (med(per.get(b, []), "ops_per_s") or 0) > sets]
    if above:
        out.append(
            f"\nerq ({', '.join(above)}) measured above the first: within a run of "
            f"{res.plan.seconds:g} s, data the periodic fdatasync has not yet written can wait "
            "in the page cache, and the writer's memory may be warm from the run before."
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


def _fmt_restarted(r) -> str:
    if not r.restarted_memory:
        return "–"
    m = median_memory(r.restarted_memory)
    items = ", ".join(f"{n:,}" for n in r.restarted_items)
    return f"{fmt_mem(m)}; peak {fmt_mib(m.peak)}; {items}"


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
                _fmt_restarted(r),
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
        f"connection, pipeline 64), RSS read after the fill, and again once a restart after a "
        "SIGKILL has read the same items back (with the restarted process's peak, VmHWM); then, "
        "on a fresh server, "
        f"{p.idle_conns:,} connections opened and left idle. RSS is VmRSS; anon/file is its "
        "split (RssAnon, RssFile: mapped journal segments count as file)._\n",
        table(
            [
                "server",
                "items",
                "RSS after the fill",
                "RSS after a SIGKILL and restart (peak; items back)",
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
