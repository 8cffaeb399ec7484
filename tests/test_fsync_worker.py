"""FsyncWorker: one job of descriptors at a time on its own thread, an errno per descriptor,
readiness through fileno(), and no thread left behind by close() or a dropped worker."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import selectors
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvloop

from conftest import impl_module

THREAD_NAME = "erq-fsync"


def worker_class(impl: str) -> type:
    return impl_module(impl, "_fsync", "journal._fsync_py").FsyncWorker


def worker_threads(impl: str) -> set[int]:
    """Ids of the live worker threads of this process. The C build's is a plain pthread,
    named through prctl, so it shows only in /proc; the twin's is a threading.Thread."""
    if impl == "py":
        return {t.ident for t in threading.enumerate() if t.name == THREAD_NAME}
    tids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            comm = Path(f"/proc/self/task/{task}/comm").read_text()
            stat = Path(f"/proc/self/task/{task}/stat").read_text()
        except FileNotFoundError:  # exited meanwhile
            continue
        if comm == THREAD_NAME + "\n" and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            tids.add(int(task))
    return tids


def started_thread(impl: str, before: set[int]) -> int:
    (new,) = worker_threads(impl) - before
    return new


def thread_ended(impl: str, ident: int, timeout: float = 10.0) -> bool:
    """Whether the thread is gone. pthread_join returns once the thread has left user space;
    the kernel drops its /proc entry a moment later, so the C case looks until a deadline."""
    deadline = time.monotonic() + timeout
    while ident in worker_threads(impl):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def readable(fd: int, timeout: float | None) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(timeout))


# The worker serves Linux only (elsewhere a segment needs msync, and group commit runs its
# batches in the executor), and these tests follow its thread through /proc.
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the fsync worker is used on Linux only"
)


@pytest.fixture
def make_worker(impl):
    cls = worker_class(impl)
    made = []

    def make():
        worker = cls()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.close()


@pytest.fixture
def files(tmp_path):
    """Three regular files with unsynced data; returns a function opening fresh descriptors."""
    paths = []
    for k in range(3):
        path = tmp_path / f"f{k}"
        path.write_bytes(b"data %d" % k)
        paths.append(path)

    def open_all() -> list[int]:
        return [os.open(p, os.O_RDWR) for p in paths]

    return open_all


def dir_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def pipe_reader() -> int:
    """A descriptor on which fdatasync and fsync fail with EINVAL."""
    r, w = os.pipe()
    os.close(w)
    return r


def test_a_job_syncs_every_descriptor_and_reports_zeros(make_worker, files, tmp_path):
    worker = make_worker()
    fds = files()
    dirs = [dir_fd(tmp_path)]
    worker.submit(fds, dirs)
    assert readable(worker.fileno(), None)
    assert worker.collect() == [0, 0, 0, 0]
    assert not any(is_open(fd) for fd in fds + dirs)  # the worker owned and closed them


def test_a_bad_descriptor_reports_its_errno_without_disturbing_the_others(
    make_worker, files, tmp_path
):
    worker = make_worker()
    good = files()
    closed = os.open(tmp_path / "f0", os.O_RDONLY)
    os.close(closed)  # nothing opens a descriptor before the job runs, so the number stays free
    fds = [good[0], pipe_reader(), good[1], closed, good[2]]
    dirs = [pipe_reader(), dir_fd(tmp_path)]
    worker.submit(fds, dirs)
    assert worker.collect(wait=True) == [0, errno.EINVAL, 0, errno.EBADF, 0, errno.EINVAL, 0]
    assert not any(is_open(fd) for fd in fds + dirs)


def test_a_file_or_directory_deleted_before_its_sync_reports_enoent(make_worker, tmp_path):
    """Synced, but no restart can find it: not durable. A name that merely ends like the
    kernel's mark of a deleted file (" (deleted)") is still a name."""
    worker = make_worker()
    gone = tmp_path / "gone"
    gone.write_bytes(b"data")
    named = tmp_path / "f (deleted)"
    named.write_bytes(b"data")
    gone_dir = tmp_path / "d (deleted)"
    gone_dir.mkdir()
    named_dir = tmp_path / "kept (deleted)"
    named_dir.mkdir()
    fds = [os.open(gone, os.O_RDWR), os.open(named, os.O_RDWR)]
    dirs = [dir_fd(gone_dir), dir_fd(named_dir)]
    gone.unlink()
    gone_dir.rmdir()
    worker.submit(fds, dirs)
    assert worker.collect(wait=True) == [errno.ENOENT, 0, errno.ENOENT, 0]


# Runs jobs on one named file under strace, between two marker stats, in a fresh process.
_TRACED_SYNCS = """
import importlib, os, sys
name = "erq._fast._fsync" if sys.argv[1] == "c" else "erq.journal._fsync_py"
worker = importlib.import_module(name).FsyncWorker()
fd = os.open(sys.argv[2], os.O_RDWR)
for marker in ("begin", "end"):
    try:
        os.stat("/erq-trace-" + marker)
    except FileNotFoundError:
        pass
    if marker == "begin":
        for _ in range(5):
            worker.submit([os.dup(fd)], [])
            assert worker.collect(wait=True) == [0]
worker.close()
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (ci/test.sh installs it)")
def test_the_deletion_check_after_a_sync_does_not_stat_a_named_file(impl, tmp_path):
    """An fstat reads the timestamps; with multigrain timestamps (Linux 6.13 on) that makes
    the next write through a mapping dirty the inode, and fdatasync on ext4 without a journal
    then writes the inode block too: a third I/O per sync (erq/journal/unlinked.py). The
    check reads /proc/self/fd instead, and asks the inode only to confirm a deletion."""
    path = tmp_path / "segment"
    path.write_bytes(b"data")
    log = tmp_path / "trace"
    done = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(log), "-e", "trace=%%stat,readlink,readlinkat",
         sys.executable, "-c", _TRACED_SYNCS, impl, str(path)],
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    begin = next(i for i, line in enumerate(lines) if "/erq-trace-begin" in line)
    end = next(i for i, line in enumerate(lines) if "/erq-trace-end" in line)
    traced = lines[begin + 1 : end]
    links = [line for line in traced if "/proc/self/fd/" in line]
    assert len(links) == 5, traced  # the check ran once a sync, on the dup'd descriptor
    stats = [line for line in traced if "stat" in line and "/proc/self/fd/" not in line]
    assert stats == [], traced


def test_fileno_turns_readable_when_the_job_ends_and_collect_drains_it(make_worker, files):
    worker = make_worker()
    fd = worker.fileno()
    assert not readable(fd, 0)
    assert worker.collect() is None  # no job
    worker.submit(files(), [])
    assert worker.busy
    assert readable(fd, None)
    assert readable(fd, 0)  # stays readable until collected
    assert worker.collect() == [0, 0, 0]
    assert not readable(fd, 0) and not worker.busy
    assert worker.collect() is None
    worker.submit([], [])  # the next job signals again
    assert readable(fd, None)
    assert worker.collect() == []
    assert not readable(fd, 0)


def test_polling_collect_never_leaves_a_stale_notification(impl, make_worker):
    worker = make_worker()
    for _ in range(2000 if impl == "c" else 50):  # the twin's thread waits for the GIL
        worker.submit([], [])
        while worker.collect() is None:  # the job may not have run yet: None, not stale
            pass
        assert not readable(worker.fileno(), 0)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_loop_learns_of_finished_jobs_through_add_reader(make_worker, files, loop_kind):
    loop = asyncio.new_event_loop() if loop_kind == "asyncio" else uvloop.new_event_loop()
    worker = make_worker()
    results = []

    async def main():
        done = loop.create_future()

        def ready():
            out = worker.collect()
            if out is not None:
                results.append(out)
                if len(results) == 3:
                    done.set_result(None)
                else:
                    worker.submit(files(), [])

        loop.add_reader(worker.fileno(), ready)
        worker.submit(files(), [])
        await done
        loop.remove_reader(worker.fileno())

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert results == [[0, 0, 0]] * 3


def test_submit_while_a_job_is_in_flight_raises_and_takes_nothing(make_worker, files):
    worker = make_worker()
    worker.submit([], [])
    extra = files()
    with pytest.raises(RuntimeError, match="in flight"):
        worker.submit(extra, [])
    assert readable(worker.fileno(), None)
    with pytest.raises(RuntimeError, match="in flight"):  # finished but not collected
        worker.submit(extra, [])
    assert all(is_open(fd) for fd in extra)  # still the caller's
    assert worker.collect() == []
    worker.submit(extra, [])
    assert worker.collect(wait=True) == [0, 0, 0]


def test_bad_arguments_raise_before_the_worker_takes_anything(make_worker, files):
    worker = make_worker()
    fds = files()
    with pytest.raises(TypeError):
        worker.submit(fds + ["3"], [])
    with pytest.raises(TypeError):
        worker.submit(tuple(fds), [])
    with pytest.raises(OverflowError):
        worker.submit(fds + [1 << 40], [])
    assert not worker.busy and all(is_open(fd) for fd in fds)
    worker.submit(fds, [])
    assert worker.collect(wait=True) == [0, 0, 0]


def test_jobs_of_any_size_follow_each_other(make_worker, tmp_path):
    worker = make_worker()
    path = tmp_path / "f"
    path.write_bytes(b"x")
    for n in (1, 200, 3, 0, 500):
        fds = [os.open(path, os.O_RDONLY) for _ in range(n)]
        worker.submit(fds[: n // 2], fds[n // 2 :])
        assert worker.collect(wait=True) == [0] * n


def test_close_finishes_the_job_in_flight_joins_and_is_idempotent(impl, files):
    before = worker_threads(impl)
    worker = worker_class(impl)()
    thread = started_thread(impl, before)
    fd = worker.fileno()
    fds = files()
    worker.submit(fds, [])
    worker.close()
    assert not any(is_open(f) for f in fds)  # the job ran before the thread stopped
    assert not is_open(fd)
    assert thread_ended(impl, thread)
    worker.close()
    for call in (worker.fileno, worker.collect, lambda: worker.submit([], [])):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_a_dropped_worker_stops_its_thread(impl, files):
    before = worker_threads(impl)
    worker = worker_class(impl)()
    thread = started_thread(impl, before)
    fds = files()
    worker.submit(fds, [])
    cycle = [worker]
    cycle.append(cycle)  # only the cyclic collector can free it
    del worker, cycle
    gc.collect()
    assert not any(is_open(f) for f in fds)
    assert thread_ended(impl, thread)
